import os
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


def test_omp_wait_policy(monkeypatch):
    from forkrl.cli import _omp_wait_policy

    cores = 2
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    idle, one_busy = (lambda: 0.1), (lambda: 1.0)
    # Alone on idle cores: the library's default (spinning) is kept.
    assert _omp_wait_policy(idle) is None
    # Another job on one of the two cores, now: spinning threads would starve it.
    assert _omp_wait_policy(one_busy) == "PASSIVE"
    # One thread leaves a core free for that job.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _omp_wait_policy(one_busy) is None
    # Two torchrun processes x 2 threads on 2 cores compete with each other.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _omp_wait_policy(idle) == "PASSIVE"
    # The user's explicit choice is never overridden.
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert _omp_wait_policy(one_busy) is None


def test_busy_cores_is_a_core_count():
    from forkrl.cli import _busy_cores

    assert 0.0 <= _busy_cores(0.05) <= (os.cpu_count() or 1) + 1e-9
