"""Ray Tune sweeps of the iteration loop: search spaces (space.py), the sweep runner (sweep.py), Table 3 (table3.py)."""
