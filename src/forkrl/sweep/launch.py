"""Running a sweep's jobs: local processes, each on its share of the cores, or Slurm jobs via submitit.

Both launchers start each job (`forkrl.sweep.runner.execute_job`) in a process of its own and keep
at most `jobs` in flight. Locally every job gets `cores // jobs` threads (torch, OpenMP and MKL),
so the jobs together never ask for more threads than the machine has (`cores` is this process's
CPU affinity, which respects cgroup/taskset limits). Under submitit the job asks Slurm for that
many CPUs (`cpus_per_task`), and submitit's `local` cluster runs the same code on this machine,
which is how the tests exercise it.

A SIGTERM or Ctrl-C to the sweep is passed on to the running jobs, whose trainers finish the step
in progress and checkpoint (`forkrl train`'s graceful stop); the next `forkrl sweep` with the same
arguments resumes them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forkrl.sweep.runner import SweepJob, job_to_json, thread_env

LAUNCHERS = ("local", "submitit")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """`cores // jobs`, at least 1 (more jobs than cores then run one thread each)."""
    return max(1, (cores or available_cores()) // max(1, jobs))


@dataclass
class Outcome:
    """How a job ended."""

    ok: bool
    message: str = ""
    """For a failure: the error's last line."""
    log: str = ""
    """Where its output went."""


class _LocalHandle:
    """A job in a child process `python -m forkrl.sweep.runner JOB_JSON`, output appended to a log file."""

    def __init__(self, job: SweepJob, log: Path):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log, "a", encoding="utf-8")  # closed in poll()
        self._log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.label}\n")
        self._log_file.flush()
        env = {**os.environ, **thread_env(job.threads), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forkrl.sweep.runner", job_to_json(job)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def poll(self) -> Outcome | None:
        code = self.proc.poll()
        if code is None:
            return None
        self._log_file.close()
        if code == 0:
            return Outcome(True, log=str(self.log))
        return Outcome(False, _last_error(self.log) or f"exit code {code}", str(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _SubmititHandle:
    """A job submitted through a submitit executor (Slurm, or the `local` cluster)."""

    def __init__(self, executor, job: SweepJob):
        from forkrl.sweep.runner import execute_job

        self.job = executor.submit(execute_job, job)
        self.log = str(self.job.paths.stderr)

    def poll(self) -> Outcome | None:
        if not self.job.done():
            return None
        try:
            self.job.result()
        except Exception as err:  # submitit re-raises the job's error (or reports a failed/cancelled job)
            lines = [line for line in str(err).splitlines() if line.strip()]
            return Outcome(False, lines[-1].strip() if lines else type(err).__name__, self.log)
        return Outcome(True, log=self.log)

    def stop(self) -> None:
        if not self.job.done():
            self.job.cancel(check=False)

    def wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while not self.job.done() and time.time() < deadline:
            time.sleep(0.2)


def _last_error(log: Path) -> str:
    """The last `error: ...` line of a job's log (or its last line)."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def make_executor(folder: Path, cluster: str | None, threads: int, slurm: dict[str, str] | None = None):
    """A submitit `AutoExecutor` in `folder` asking for `threads` CPUs per job; `slurm` adds its parameters:
    submitit's generic ones as they are (`timeout_min`, `gpus_per_node`, `mem_gb`, ...), others as
    `slurm_<key>` (`partition` -> `slurm_partition`)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"cpus_per_task": threads, "name": "forkrl-sweep"}
    generic = set(submitit.AutoExecutor._typed_parameters())  # timeout_min, gpus_per_node, mem_gb, ...
    for key, value in (slurm or {}).items():
        params[key if key in generic or key.startswith("slurm_") else f"slurm_{key}"] = _number(value)
    executor.update_parameters(**params)
    return executor


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_jobs(
    jobs: list[SweepJob],
    start: Callable[[SweepJob], object],
    parallel: int,
    report: Callable[[str, SweepJob, Outcome | None, float], None],
    poll_s: float = 0.2,
) -> dict[str, Outcome]:
    """Run `jobs` in order with at most `parallel` in flight; `report(event, job, outcome, eta_s)` on
    every start ("running") and end ("done" / "failed"). Returns each job's outcome by label.

    SIGTERM / SIGINT stop the running jobs gracefully (their trainers checkpoint) and re-raise as
    `KeyboardInterrupt` once they have exited.
    """
    pending = list(jobs)
    running: dict[str, tuple[SweepJob, object, float]] = {}
    outcomes: dict[str, Outcome] = {}
    durations: list[float] = []
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def eta() -> float:
        if not durations:
            return float("nan")
        mean = sum(durations) / len(durations)
        now = time.time()
        left = sum(max(0.0, mean - (now - t0)) for _, _, t0 in running.values()) + mean * len(pending)
        return left / max(1, parallel)

    try:
        while pending or running:
            if stop["signal"] is not None:
                for _, handle, _ in running.values():
                    handle.stop()
                for _, handle, _ in running.values():
                    handle.wait(300)
                raise KeyboardInterrupt(f"stopped by {signal.Signals(stop['signal']).name}")
            while pending and len(running) < parallel:
                job = pending.pop(0)
                running[job.label] = (job, start(job), time.time())
                report("running", job, None, eta())
            for label in list(running):
                job, handle, t0 = running[label]
                outcome = handle.poll()
                if outcome is None:
                    continue
                del running[label]
                outcomes[label] = outcome
                if outcome.ok and job.kind == "train":
                    durations.append(time.time() - t0)
                report("done" if outcome.ok else "failed", job, outcome, eta())
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcomes
