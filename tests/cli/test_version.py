from typer.testing import CliRunner

import imm_ray
from imm_ray.cli import app


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"imm-ray {imm_ray.__version__}"
