"""``python -m imm_ray`` is the ``imm-ray`` command."""

from imm_ray.cli import app

if __name__ == "__main__":
    app()
