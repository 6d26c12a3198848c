import subprocess
import sys

from typer.testing import CliRunner

from forkrl import __version__
from forkrl.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"forkrl {__version__}"


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


def test_console_entry_point_runs():
    # The installed `forkrl` script resolves to forkrl.cli:main.
    out = subprocess.run([sys.executable, "-m", "forkrl.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
