"""The RL recipe: prompts → rollouts → rewards → advantages → token selection → loss → optimizer step.

One `Trainer.train()` call runs `trainer.total_steps` steps. Each step (`Trainer.step_once`):

1. **collect** (`train/collect.py`): draws `rollout.prompts_per_round` (default `prompts_per_step`)
   / world_size prompts per process and samples G responses each through the configured
   generation backend (`rollout.backend`, `rollout/registry.py`), with batch-invariant per-row
   seeds, so the same prompt gets the same response whatever the split;
2. **score**: task reward + overlong shaping (`tasks/rewards.py`); with dynamic sampling, drops
   groups whose task scores are all equal and samples more prompts until the batch is full or the
   rounds run out;
3. **advantages**: group-relative (`algo/advantages.py`);
4. **update** (`train/update.py`): old-policy log-probs (except with exactly one update per batch,
   where π_old = π_θ), then for each mini-batch the forking tokens (`algo/selection.py`), the
   normalized loss over micro-batches (`algo/losses.py`) and one clipped optimizer step
   (`train/optim.py`; a NaN/inf step is skipped and counted);
5. **sync** the backend's weights (`update_weights`), **log** (`train/logging.py`), **evaluate**
   every `trainer.eval_every` steps (`train/evaluation.py`) and **checkpoint** (`train/state.py`).

A single process is the same code path with world size 1; under `torchrun` gradients are
averaged across processes (DDP's all-reduce, or FSDP2's reduce-scatter with
`trainer.strategy=fsdp2`; `train/setup.py`) and the loss denominators are global, so the update
equals the one-process update on the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from forkrl import fast_paths
from forkrl.config import Config, ConfigError, dump_config, load_config
from forkrl.distributed import is_distributed, reduce_scalars
from forkrl.errors import TrainingInterrupted, TrainingStopped
from forkrl.extras import check_config_extras
from forkrl.metrics import MetricSums
from forkrl.rollout.base import Rollout
from forkrl.rollout.registry import BackendContext, build_backend, get_backend, resolved_rollout_correction
from forkrl.train.checkpoint import (
    CheckpointError,
    ResumePoint,
    RNGState,
    all_finite,
    parse_resume_target,
    select_checkpoint,
)
from forkrl.train.collect import BatchCollector, RewardFailures
from forkrl.train.context import TrainContext
from forkrl.train.evaluation import Evaluator
from forkrl.train.inputs import load_inputs
from forkrl.train.logging import RunLogger
from forkrl.train.optim import build_optimizer
from forkrl.train.progress import Progress
from forkrl.train.run_dir import RunDirectory
from forkrl.train.setup import SetupError, init_distributed, load_models
from forkrl.train.signals import GracefulStop
from forkrl.train.state import Checkpointer, OptimizerState
from forkrl.train.update import PolicyUpdater

PERCENTILES = tuple(range(0, 101, 10))


class Trainer:
    """One run of the recipe (module docstring) from a resolved `Config`.

    In: `cfg`; optionally `resume_from` (a run directory, whose newest valid checkpoint is used, or
    one `checkpoints/step_N`) and the locked `RunDirectory` of `cfg.output_dir` (`run_training`
    passes it; without one the directory is only checked, not locked). Out: `train()` returns the
    last step's metrics; the run directory holds `config.yaml`, `metrics.jsonl`, samples,
    TensorBoard logs, evaluations and checkpoints.

    Everything that does not need the model is checked before it loads (minutes for an 8B model),
    and nothing is written to the run directory until the model has loaded too.
    """

    def __init__(self, cfg: Config, resume_from: str | os.PathLike | None = None, run_dir: RunDirectory | None = None):
        self.cfg = cfg
        fast_paths.reset()  # this run's record of the fast paths it used or declined
        try:
            rank, world, device = init_distributed(cfg.trainer.device)
        except SetupError as err:
            raise TrainingStopped(str(err)) from err
        group = torch.distributed.group.WORLD if is_distributed() else None
        self.ctx = TrainContext.create(cfg, rank, world, device, group)
        check_config_extras(cfg)  # wandb, peft, vllm: before the model loads and anything is written
        self.run_dir = run_dir or RunDirectory(cfg.output_dir, "resume" if resume_from is not None else "new")
        if self.ctx.is_main and run_dir is None:
            self.run_dir.check()
        resume = self._select_checkpoint(resume_from) if resume_from is not None else None
        inputs = load_inputs(cfg)
        self.tokenizer, self.rewarder = inputs.tokenizer, inputs.rewarder

        torch.manual_seed(cfg.seed)
        try:
            self.models = load_models(cfg, self.ctx, inputs, resume)
        except SetupError as err:
            raise TrainingStopped(str(err)) from err
        self.model = self.models.model
        self.backend_caps = get_backend(cfg.rollout.backend).capabilities
        self.backend = self._build_backend()
        # `auto` becomes the backend's own choice, and config.yaml records the one used.
        cfg.loss.rollout_correction = resolved_rollout_correction(cfg.loss.rollout_correction, cfg.rollout.backend)
        self.optimizer, self.scheduler = build_optimizer(
            self.models.trainable_parameters(), cfg.optim, cfg.trainer.total_steps * self.ctx.updates_per_step
        )
        self.collector = BatchCollector(cfg, self.ctx, inputs, self.backend, row_seeds=self.backend_caps.row_seeds)
        self.updater = PolicyUpdater(
            cfg, self.ctx, self.models, self.optimizer, self.scheduler, on_optimizer_step=self._after_optimizer_step
        )
        engine = self.backend if self.backend_caps.holds_weights else None
        self.evaluator = Evaluator(cfg, self.ctx, self.models, self.run_dir.path, engine)
        self.step = self.bad_steps = 0
        self.bad_cause = ""
        # What a checkpoint holds besides the weights, each part by its name in trainer_state.pt.
        parts = {
            "optimizer": OptimizerState(self.models, self.optimizer),
            "scheduler": self.scheduler,
            "rng": RNGState(),
            "trainer": self,  # sampler position, bad-step count (`state_dict`)
        }
        self.checkpointer = Checkpointer(
            self.models, self.run_dir.path, parts, keep=cfg.trainer.keep_checkpoints, is_main=self.ctx.is_main
        )
        if resume is not None:
            self.step = self.checkpointer.load(resume.state)
        self.stop = GracefulStop()
        self.logger = None
        if self.ctx.is_main:
            self.run_dir.prepare(dump_config(cfg), resume_step=self.step if resume is not None else None)
            self.logger = RunLogger(self.run_dir.path, cfg.trainer.tensorboard, cfg.trainer.wandb_project)

    # ------------------------------------------------------------------ setup helpers

    def _select_checkpoint(self, resume_from: str | os.PathLike) -> ResumePoint:
        """The validated checkpoint to resume from."""
        run_dir, step_dir = parse_resume_target(resume_from)
        try:
            return select_checkpoint(run_dir, step_dir)
        except CheckpointError as err:
            raise TrainingStopped(str(err)) from err

    def _build_backend(self):
        """The `rollout.backend`, sampling with autocast and (FSDP2) the full weights it needs."""
        models = self.models

        @contextlib.contextmanager
        def forward_context():
            with models.autocast(), models.full_weights():
                yield

        ctx = BackendContext(
            self.model, self.tokenizer, self.cfg.model.name, self.cfg.rollout, self.ctx.device, forward_context,
            weights=lambda: models.full_state_dict().items(), seed=self.cfg.seed,
        )  # fmt: skip
        # Built after the checkpoint's weights went in: an engine's first push is the resumed policy.
        return build_backend(self.cfg.rollout.backend, ctx)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint ("trainer" in trainer_state.pt)."""
        return {"sampler": self.collector.sampler.state_dict(), "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.collector.sampler.load_state_dict(state["sampler"])
        self.bad_steps = state.get("bad_steps", 0)

    def save(self) -> Path | None:
        """Checkpoint the current step (every process calls; the main one writes and returns the path)."""
        if not self._weights_finite():
            raise TrainingStopped(
                f"the weights hold NaN/inf after step {self.step} and were not checkpointed "
                f"(earlier checkpoints under {self.run_dir.path / 'checkpoints'} are intact); lower optim.lr "
                "or check the loss"
            )
        return self.checkpointer.save(self.step)

    def _weights_finite(self) -> bool:
        """No NaN/inf in any trainable weight, on any process (one collective when distributed)."""
        return bool(reduce_scalars([float(all_finite(self.models.trainable_parameters()))], "min")[0])

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on some process (all stop together, or a collective would hang)."""
        return bool(reduce_scalars([float(flag)], "max")[0])

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Run to `trainer.total_steps` and return the last step's metrics. A SIGTERM/SIGINT ends
        the run after the step in progress, checkpointed (`TrainingInterrupted`)."""
        progress = Progress(self.ctx.is_main, self.cfg.trainer.total_steps, self.step)
        last: dict[str, float] = {}
        try:
            with self.stop:
                while self.step < self.cfg.trainer.total_steps:
                    last = self.step_once()
                    progress.advance(self.step, last)
                    self._checkpoint_or_stop()
                self.save()
                return last
        finally:
            progress.close()
            self.close()

    def step_once(self) -> dict[str, float]:
        """One step of the recipe; returns (and logs) its metrics."""
        cfg = self.cfg
        t_step = time.perf_counter()
        stats = MetricSums(self.ctx.device)
        log_samples = None
        if self.logger is not None:
            log_samples = lambda rows: self.logger.log_samples(self.step + 1, rows)  # noqa: E731
        try:
            collected = self.collector.collect(self.step + 1, stats, log_samples)
        except RewardFailures as err:
            raise TrainingStopped(str(err)) from err
        self.step += 1
        batch = collected.batch
        timings = {"generate_s": collected.generate_s, "reward_s": collected.reward_s}
        timings.update(old_logprobs_s=0.0, update_s=0.0)
        if batch is not None:
            update = self.updater.update(batch, self.step, stats)
            timings.update(old_logprobs_s=update.old_logprobs_s, update_s=update.update_s)
            self.backend.update_weights(self.model)
            sampler_entropy = batch.rollout.sampler_entropy
            entropy = update.old_entropy if sampler_entropy is None else sampler_entropy
            _add_entropy_percentiles(stats, entropy, batch.rollout)
            stats.add("tokens_trained", batch.rollout.response_mask.sum().float(), None)
        metrics = stats.compute(self.ctx.group)
        step_s = time.perf_counter() - t_step
        generated = metrics.get("response_length", 0.0) * metrics.get("groups_sampled", 0.0) * cfg.rollout.group_size
        metrics.update(timings)
        metrics.update({"step_s": step_s, "tokens_per_s": generated / step_s, "lr": self.scheduler.get_last_lr()[0]})
        if batch is None:
            metrics["skipped_no_informative_groups"] = 1.0
        if self.evaluator.due(self.step):
            metrics.update(self.evaluator.evaluate(self.step))
        metrics.update(fast_paths.step_flags())  # fast_path/<name>: 1 used, 0 declined (warned once)
        if self.logger is not None:
            self.logger.log(self.step, metrics)
        if batch is None:
            self._count_bad_step(
                "training steps had no trainable group (every group's rewards were equal; last step: "
                f"accuracy {metrics.get('accuracy', float('nan')):.3f}, "
                f"{metrics.get('reward_errors', 0):.0f} reward errors, "
                f"{metrics.get('reward_timeouts', 0):.0f} timeouts)"
            )
        return metrics

    def _checkpoint_or_stop(self) -> None:
        """Periodic checkpoint; on SIGTERM/SIGINT (on any process) checkpoint and stop."""
        every, total = self.cfg.trainer.save_every, self.cfg.trainer.total_steps
        if every and self.step % every == 0 and self.step < total:
            self.save()
        if self._any_process(self.stop.requested):
            path = self.save()
            signum = self.stop.signum or signal.SIGTERM
            raise TrainingInterrupted(
                signum,
                f"stopped by {signal.Signals(signum).name} after step {self.step}; checkpoint saved at "
                f"{path or self.run_dir.path}; continue with: forkrl train --resume {self.run_dir.path}",
            )

    def _after_optimizer_step(self, taken: bool) -> None:
        if taken:
            self.bad_steps, self.bad_cause = 0, ""
        else:
            self._count_bad_step("optimizer steps had a NaN/inf loss or gradient and were skipped")

    def _count_bad_step(self, cause: str) -> None:
        """A skipped optimizer step or a step without a trainable group: `trainer.max_bad_steps` in a
        row stop the run, checkpointed with the weights of the last good step."""
        self.bad_steps += 1
        self.bad_cause = cause
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            path = self.save()
            raise TrainingStopped(
                f"{self.bad_steps} consecutive {self.bad_cause}; stopping "
                f"(trainer.max_bad_steps = {self.cfg.trainer.max_bad_steps}). "
                f"The weights are those of the last good step, saved at {path or self.run_dir.path}."
            )

    def close(self) -> None:
        """Stop the reward workers and the backend's engine, close the logs (the run directory's lock
        belongs to its owner)."""
        self.rewarder.close()
        close_backend = getattr(self.backend, "close", None)
        if close_backend is not None:
            close_backend()
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def _add_entropy_percentiles(stats: MetricSums, entropy: torch.Tensor, ro: Rollout) -> None:
    """Percentiles 0, 10, …, 100 of this process's response-token entropies (old policy, Eq. 1)."""
    values = entropy[ro.response_mask.bool()].float()
    if values.numel() == 0:
        return
    q = torch.quantile(values.cpu()[:16_000_000], torch.tensor([p / 100 for p in PERCENTILES]))
    for p, v in zip(PERCENTILES, q):
        stats.add(f"entropy_p{p}", v, 1)
    stats.add("entropy_frac_below_0.01", (values < 1e-2).float().sum(), values.numel())


def run_training(
    config_path: str | None, overrides: list[str], resume: str | None = None, overwrite: bool = False
) -> dict[str, float]:
    """`forkrl train`: resolve the config, lock the run directory, train; return the last metrics.

    New run: `config_path` + `overrides`; the run directory must be empty, or `overwrite` moves
    the old one aside. Resume (`resume` = RUN_DIR or RUN_DIR/checkpoints/step_N): the run's
    saved `config.yaml` + `overrides` (e.g. `trainer.total_steps=2000`); a config file or an
    `output_dir` override is refused, as the run directory and its config are the run's own.
    """
    if resume is not None:
        cfg = _resume_config(resume, config_path, overrides)
    else:
        cfg = load_config(config_path, overrides)
    np.random.seed(cfg.seed % (2**32))
    # Only the main process writes the run directory, so only it locks it.
    main = int(os.environ.get("RANK", "0")) == 0
    mode = "resume" if resume is not None else ("overwrite" if overwrite else "new")
    run = RunDirectory(cfg.output_dir, mode)
    with run if main else contextlib.nullcontext():
        try:
            trainer = Trainer(cfg, resume_from=resume, run_dir=run)
            return trainer.train()
        except BaseException:
            if main:
                run.undo_start()  # a start that failed before its first step leaves nothing behind
            raise


def _resume_config(resume: str, config_path: str | None, overrides: list[str]) -> Config:
    """The resumed run's saved config with `overrides` applied; changed keys are printed."""
    run_dir, _ = parse_resume_target(resume)
    if config_path is not None:
        raise ConfigError(
            f"--resume {resume} continues with the run's own {run_dir / 'config.yaml'}; give no config file "
            f"({config_path}), and change keys with key=value overrides (e.g. trainer.total_steps=200)"
        )
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {resume}: {saved} not found (is it a forkrl run directory?)")
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "output_dir" and Path(value.strip()).resolve() != run_dir.resolve():
            raise ConfigError(
                f"output_dir = {value.strip()!r}: a resumed run stays in its directory {run_dir}; "
                "copy the directory first to continue it elsewhere"
            )
    before = load_config(str(saved), [f"output_dir={run_dir}"], check_files=False)
    cfg = load_config(str(saved), [*overrides, f"output_dir={run_dir}"])
    changed = _changed_keys(dataclasses.asdict(before), dataclasses.asdict(cfg))
    if changed:
        print(f"resume: overrides change {', '.join(changed)}", flush=True)
    return cfg


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in new.items():
        if isinstance(value, dict):
            out += _changed_keys(old.get(key, {}), value, f"{prefix}{key}.")
        elif old.get(key) != value:
            out.append(f"{prefix}{key} {old.get(key)!r} -> {value!r}")
    return out
