"""Ray Tune search spaces over the merge α, the DARE drop rate and the iteration count (``config.sweep``).

Pure functions: they build Tune's search-space objects and per-trial config overrides, and run nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from imm_ray.config import ExperimentConfig, SweepSection, validate

PARAMS = ("alpha", "drop_rate", "iterations")


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space; ``alpha`` is the weight of the ORIGINAL base (Eq. 6)."""

    alpha: float
    drop_rate: float
    iterations: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrialParams:
        """Read the point out of a Tune trial config (which may carry other keys)."""
        return cls(float(config["alpha"]), float(config["drop_rate"]), int(config["iterations"]))

    @property
    def sort_key(self) -> tuple[int, float, float]:
        """Table order: by iteration count, then drop rate, then α."""
        return (self.iterations, self.drop_rate, self.alpha)

    @property
    def label(self) -> str:
        """A short, file-name-safe name; four decimals tell random-search draws apart."""
        return f"a{self.alpha:.4g}_p{self.drop_rate:.4g}_T{self.iterations}"

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """This trial's loop config: the sweep's config with the point set and only ``sweep.strategy`` run.

        The values go into the raw mapping and through the same validation as a config file, so a point outside a
        field's range fails like a bad file would (no YAML round trip of floats such as 1e-05).
        """
        raw = config.model_dump(mode="json")
        raw["merge"].update(alpha=self.alpha, drop_rate=self.drop_rate)
        raw["experiment"].update(iterations=self.iterations, strategies=[config.sweep.strategy])
        return validate(raw, f"sweep trial {self.label}")


def search_space(sweep: SweepSection) -> dict[str, Any]:
    """Tune's ``param_space``: grid = every combination of the lists; random = α and drop rate uniform between
    the smallest and largest listed value, iterations a choice from its list."""
    if sweep.search == "grid":
        return {name: tune.grid_search(sorted(set(getattr(sweep, name)))) for name in PARAMS}
    return {
        "alpha": _uniform(sweep.alpha),
        "drop_rate": _uniform(sweep.drop_rate),
        "iterations": _choice(sweep.iterations),
    }


def num_samples(sweep: SweepSection) -> int:
    """A grid is run once (the stages are deterministic, a repeat would only reuse them); random draws
    ``num_samples`` points."""
    return 1 if sweep.search == "grid" else sweep.num_samples


def search_algorithm(sweep: SweepSection, seed: int) -> BasicVariantGenerator:
    """Tune's default variant generator, seeded so a random sweep draws the same points every time.

    The concurrency limit goes here: Tune ignores ``TuneConfig.max_concurrent_trials`` for a generator like this
    one (it warns and runs every trial at once).
    """
    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent_trials)


def _uniform(values: tuple[float, ...]) -> Any:
    low, high = min(values), max(values)
    return low if low == high else tune.uniform(low, high)


def _choice(values: tuple[int, ...]) -> Any:
    choices = sorted(set(values))
    return choices[0] if len(choices) == 1 else tune.choice(choices)
