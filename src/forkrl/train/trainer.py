"""The RL recipe: prompts → rollouts → rewards → advantages → token selection → loss → optimizer step.

One `Trainer.train()` call runs `trainer.total_steps` steps. Each step:

1. draws `rollout.prompts_per_round` (default `prompts_per_step`) / world_size prompts per process
   and samples G responses each
   (batch-invariant per-row seeds, so the same prompt gets the same response whatever the split);
2. scores them (task reward + overlong shaping); with dynamic sampling, drops groups whose task
   scores are all equal and samples more prompts until the batch is full or the rounds run out;
3. computes group-relative advantages;
4. computes old-policy log-probs, except with exactly one update per batch (then π_old = π_θ);
5. for each mini-batch: picks the forking tokens (`selection.*`), accumulates the normalized loss
   over micro-batches, clips the gradient and steps (a NaN/inf step is skipped and counted).

A single process is the same code path with world size 1; under `torchrun` gradients are
averaged across processes (DDP's all-reduce, or FSDP2's reduce-scatter with
`trainer.strategy=fsdp2`) and the loss denominators are global, so the update equals the
one-process update on the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from forkrl import fast_paths
from forkrl.algo.advantages import compute_advantages
from forkrl.algo.losses import PolicyLossInput, compute_policy_loss, loss_denominators
from forkrl.config import Config, ConfigError, dump_config, load_config
from forkrl.distributed import is_distributed
from forkrl.metrics import MetricSums
from forkrl.models.loading import load_policy
from forkrl.models.scoring import ResponseScorer
from forkrl.ops.selection import select_tokens
from forkrl.rollout.base import Rollout, SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.data import PromptExample, PromptSampler
from forkrl.tasks.rewards import overlong_penalty
from forkrl.train.checkpoint import (
    CheckpointError,
    all_finite,
    check_shapes,
    parse_resume_target,
    restore_rng_state,
    save_checkpoint,
    select_checkpoint,
)
from forkrl.train.fsdp import gathered, shard_scorer
from forkrl.train.inputs import checked_tokenizer, load_training_examples, make_rewarder
from forkrl.train.logging import RunLogger
from forkrl.train.run_dir import RunDirectory
from forkrl.train.signals import GracefulStop

PERCENTILES = tuple(range(0, 101, 10))


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. too many consecutive NaN/inf steps); names the cause."""


class TrainingInterrupted(TrainingStopped):
    """SIGTERM/SIGINT: the step in progress was finished and checkpointed; `--resume` continues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@dataclass
class StepBatch:
    """The responses one process trains on in one step (groups of G contiguous rows)."""

    rollout: Rollout
    examples: list[PromptExample]
    """One per response row."""
    task_scores: torch.Tensor
    """`[N]` reward function scores (accuracy for 0/1 verifiers)."""
    rewards: torch.Tensor
    """`[N]` task score + overlong shaping: what the advantages are computed from."""
    advantages: torch.Tensor
    """`[N]`."""


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (rank, world, device)."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("trainer.device = 'cuda' but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


class Trainer:
    def __init__(self, cfg: Config, resume_from: str | os.PathLike | None = None, run_dir: RunDirectory | None = None):
        """`resume_from`: a run directory (its newest valid checkpoint) or one `checkpoints/step_N`.
        `run_dir`: the locked `RunDirectory` of `cfg.output_dir` (see `run_training`); without
        one, the directory is only checked (a new run needs it empty), not locked."""
        self.cfg = cfg
        fast_paths.reset()  # this run's record of the fast paths it used or declined
        self.rank, self.world, self.device = init_distributed(cfg.trainer.device)
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        r, o = cfg.rollout, cfg.optim
        for key, value in (
            ("rollout.prompts_per_step", r.prompts_per_step),
            ("optim.mini_batch_size", o.mini_batch_size),
            ("rollout.prompts_per_round", r.prompts_per_round),
        ):
            if value % self.world:
                raise TrainingStopped(f"{key} = {value} must be divisible by the number of processes ({self.world})")
        self.prompts_per_rank = r.prompts_per_step // self.world
        self.round_prompts_per_rank = (r.prompts_per_round or r.prompts_per_step) // self.world
        self.mini_prompts_per_rank = o.mini_batch_size // self.world
        self.updates_per_step = (r.prompts_per_step // o.mini_batch_size) * o.epochs
        self.group = dist.group.WORLD if is_distributed() else None

        # Everything that does not need the model is checked before it loads (minutes for an 8B
        # model), and nothing is written to the run directory until the model has loaded too.
        self.run = run_dir or RunDirectory(cfg.output_dir, "resume" if resume_from is not None else "new")
        if self.is_main and run_dir is None:
            self.run.check()
        resume_path = resume_state = resume_shapes = None
        if resume_from is not None:
            resume_path, resume_state, resume_shapes = self._select_checkpoint(resume_from)
        self.tokenizer = checked_tokenizer(cfg)
        self.examples = load_training_examples(cfg, self.tokenizer)
        self.rewarder = make_rewarder(cfg)

        torch.manual_seed(cfg.seed)
        on_gpu = self.device.type == "cuda"
        dtype = cfg.model.dtype
        # "auto": fp32 master weights everywhere, with bf16 autocast on GPU (see README).
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and dtype == "auto" else contextlib.nullcontext()
        )
        self.model, self.tokenizer = self._load_policy(
            cfg.model.name,
            dtype="float32" if dtype == "auto" else dtype,
            device=self.device,
            trust_remote_code=cfg.model.trust_remote_code,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            attn_implementation=cfg.model.attn_implementation,
            lora_rank=cfg.model.lora_rank,
            lora_alpha=cfg.model.lora_alpha,
            lora_target_modules=cfg.model.lora_target_modules,
        )
        self.ref_model = None
        if cfg.loss.ref_kl_coef > 0:
            self.ref_model, _ = self._load_policy(
                cfg.model.name, dtype="float32" if dtype == "auto" else dtype, device=self.device
            )
            self.ref_model.eval().requires_grad_(False)
        # The checkpoint's weights go in before any wrapping (FSDP2 then shards them).
        if resume_path is not None:
            expected = {k: v.shape for k, v in self.model.state_dict().items()}
            try:
                check_shapes(resume_path, resume_shapes, expected)
            except CheckpointError as err:
                raise TrainingStopped(str(err)) from err
            self._load_weights(resume_path)
        # policy_scorer: the model as one module (for no-grad scoring); scorer: what the update calls.
        self.policy_scorer = ResponseScorer(self.model)
        self.ref_scorer = ResponseScorer(self.ref_model) if self.ref_model is not None else None
        self.sharded = self.world > 1 and cfg.trainer.strategy == "fsdp2"
        if self.sharded:
            shard_scorer(self.policy_scorer, self.model)
            if self.ref_scorer is not None:
                shard_scorer(self.ref_scorer, self.ref_model)
            self.scorer = self.policy_scorer
        elif self.world > 1:
            self.scorer = torch.nn.parallel.DistributedDataParallel(
                self.policy_scorer, device_ids=[self.device.index] if on_gpu else None
            )
        else:
            self.scorer = self.policy_scorer
        self.backend = HFGenerationBackend(
            self.model, self.tokenizer, batch_size=r.generation_batch_size, decode_phase=r.decode_phase
        )

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        total_updates = cfg.trainer.total_steps * self.updates_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: _lr_factor(i, o.warmup_steps, total_updates, o.schedule)
        )

        self.sampler = PromptSampler(len(self.examples), cfg.seed, self.rank, self.world)
        self.step = 0
        self.bad_steps = 0
        self.bad_cause = ""
        if resume_path is not None:
            self._resume_state(resume_state)
        self.stop = GracefulStop()
        self.logger = None
        if self.is_main:
            self.run.prepare(dump_config(cfg), resume_step=self.step if resume_path is not None else None)
            self.logger = RunLogger(self.run_dir, cfg.trainer.tensorboard, cfg.trainer.wandb_project)

    # ------------------------------------------------------------------ setup helpers

    def _select_checkpoint(self, resume_from: str | os.PathLike):
        """(path, trainer state, tensor shapes) of the validated checkpoint to resume from."""
        run_dir, step_dir = parse_resume_target(resume_from)
        try:
            return select_checkpoint(run_dir, step_dir)
        except CheckpointError as err:
            raise TrainingStopped(str(err)) from err

    @staticmethod
    def _load_policy(name: str, **kwargs):
        try:
            return load_policy(name, **kwargs)
        except (OSError, ValueError, ImportError) as err:  # a missing repo or file, a bad dtype, no peft
            raise ConfigError(f"model.name = {name!r}: {err}") from err

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        if self.cfg.model.lora_rank:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(path / "adapter" / "adapter_model.safetensors"))
        else:
            state = {}
            for shard in sorted(path.glob("*.safetensors")):
                state.update(load_file(shard, device=str(self.device)))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error.
            missing = [k for k in missing if "lm_head" not in k]
            if missing or unexpected:
                raise TrainingStopped(
                    f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
                )

    def _resume_state(self, trainer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # Full (unsharded) optimizer state keyed by parameter name: the same file resumes a run on
        # one process, under DDP or under FSDP2, whatever the process count.
        set_optimizer_state_dict(
            self.policy_scorer,
            self.optimizer,
            optim_state_dict=trainer_state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng_state(trainer_state["rng"])
        self.step = trainer_state["step"]
        self.sampler.load_state_dict(trainer_state["trainer"]["sampler"])
        self.bad_steps = trainer_state["trainer"].get("bad_steps", 0)

    def save(self) -> Path | None:
        """Checkpoint on the main process. With LoRA, the checkpoint's model is a merged copy
        (loadable by `from_pretrained`) and the adapter itself goes to `adapter/` for resuming."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if not self._weights_finite():
            raise TrainingStopped(
                f"the weights hold NaN/inf after step {self.step} and were not checkpointed "
                f"(earlier checkpoints under {self.run_dir / 'checkpoints'} are intact); lower optim.lr "
                "or check the loss"
            )
        path = None
        # Full state dicts in the main process's CPU memory. Under FSDP2 gathering them is a
        # collective (every process calls); otherwise the main process's own copy is the whole.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = model_state = None
        if self.sharded or self.is_main:
            # Keyed by parameter name, so the file resumes under any strategy and process count.
            optimizer_state = get_optimizer_state_dict(self.policy_scorer, self.optimizer, options=full)
        if self.sharded:
            gathered_state = get_model_state_dict(self.policy_scorer, options=full)
            # Tied weights (lm_head = embed_tokens) come back as two tensors; write the first name
            # only, as `save_pretrained` does for the shared parameter.
            first_name: dict[int, str] = {}
            tied = set()
            for name, param in self.model.named_parameters(remove_duplicate=False):
                if id(param) in first_name:
                    tied.add(name)
                else:
                    first_name[id(param)] = name
            model_state = {k.removeprefix("model."): v for k, v in gathered_state.items()}
            model_state = {k: v for k, v in model_state.items() if k not in tied}
        if self.is_main:
            model, extra = self.model, None
            if self.cfg.model.lora_rank:
                import copy

                model = copy.deepcopy(self.model).merge_and_unload()
                extra = lambda tmp: self.model.save_pretrained(tmp / "adapter")  # noqa: E731
            path = save_checkpoint(
                self.run_dir,
                self.step,
                model,
                self.tokenizer,
                optimizer_state,
                self.scheduler,
                {"sampler": self.sampler.state_dict(), "bad_steps": self.bad_steps},
                keep=self.cfg.trainer.keep_checkpoints,
                extra=extra,
                model_state=model_state,
            )
        if is_distributed():
            dist.barrier()
        return path

    def _weights_finite(self) -> bool:
        """No NaN/inf in any trainable weight, on any process (one collective when distributed)."""
        ok = torch.tensor(float(all_finite(p for p in self.model.parameters() if p.requires_grad)))
        if is_distributed():
            ok = ok.to(self.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on some process (all stop together, or a collective would hang)."""
        if not is_distributed():
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # ------------------------------------------------------------------ 1–3: rollouts, rewards, advantages

    def _sample_round(self) -> tuple[Rollout, list[PromptExample]]:
        cfg = self.cfg.rollout
        g = cfg.group_size
        cursor = self.sampler.state_dict()
        start = cursor["epoch"] * cursor["num_prompts"] + cursor["position"]
        indices = self.sampler.next_batch(self.round_prompts_per_rank)
        # Global stream position of each prompt: the same prompt draw gets the same seeds on any
        # number of processes, which makes runs independent of the data-parallel split.
        positions = [start + self.rank + i * self.world for i in range(len(indices))]
        examples = [self.examples[i] for i in indices for _ in range(g)]
        row_seeds = [_mix_seed(self.cfg.seed, pos, j) for pos in positions for j in range(g)]
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            entropy_temperature=tuple(cfg.entropy_temperature) if cfg.entropy_temperature else None,
            row_seeds=row_seeds,
        )
        with self.autocast, gathered(self.policy_scorer if self.sharded else None):
            rollout = self.backend.generate([ex.prompt for ex in examples], params)
        return rollout, examples

    def collect_batch(self, timings: dict[str, float], stats: MetricSums) -> StepBatch | None:
        """Sample, score and (with dynamic sampling) filter until each process has its quota of groups."""
        cfg, g = self.cfg, self.cfg.rollout.group_size
        kept: list[tuple[Rollout, list[PromptExample], torch.Tensor, torch.Tensor]] = []
        num_kept_groups = 0
        reward_calls = reward_failed = 0
        first_failure = None
        for round_index in range(cfg.rollout.max_sampling_rounds):
            t0 = time.perf_counter()
            rollout, examples = self._sample_round()
            timings["generate_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            texts = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
            scored = self.rewarder(texts, examples)
            timings["reward_s"] += time.perf_counter() - t0
            reward_calls += len(texts)
            reward_failed += scored.num_failed
            first_failure = first_failure or scored.first_failure
            # Checked every round: a broken reward stops the run before another generation.
            self._check_reward_failures(reward_failed, reward_calls, first_failure)
            task = torch.tensor(scored.scores, dtype=torch.float32)
            lengths = rollout.response_lengths.cpu()
            shaped = task.clone()
            if cfg.reward.overlong_shaping:
                shaped += overlong_penalty(
                    lengths, cfg.rollout.max_new_tokens, cfg.reward.overlong_cache, cfg.reward.overlong_penalty
                )
            # Statistics of everything sampled (before filtering), as DAPO reports them.
            stats.add("reward", shaped.sum(), len(shaped))
            stats.add("accuracy", task.clamp(0, 1).sum(), len(task))
            stats.add("response_length", lengths.float().sum(), len(lengths))
            stats.add("response_clip_frac", (~rollout.finished.cpu()).float().sum(), len(lengths))
            stats.add("reward_errors", torch.tensor(float(scored.num_errors + scored.num_invalid)), None)
            stats.add("reward_timeouts", torch.tensor(float(scored.num_timeouts)), None)
            grouped = task.view(-1, g)
            informative = ~(grouped == grouped[:, :1]).all(dim=1)
            stats.add("groups_zero_variance", (~informative).float().sum(), None)
            stats.add("groups_sampled", torch.tensor(float(len(informative))), None)
            stats.add("sampling_rounds", torch.tensor(1.0 / self.world), None)
            if self.is_main and round_index == 0 and self.logger is not None:
                self.logger.log_samples(
                    self.step + 1,
                    [
                        {
                            "prompt": examples[i].prompt,
                            "completion": texts[i],
                            "answer": examples[i].answer,
                            "score": float(task[i]),
                            "reward": float(shaped[i]),
                        }
                        for i in range(min(cfg.trainer.log_samples, len(texts)))
                    ],
                )
            keep_groups = informative if cfg.rollout.dynamic_sampling else torch.ones_like(informative)
            rows = keep_groups.repeat_interleave(g)
            if rows.any():
                idx = rows.nonzero().squeeze(1)
                kept.append((_select_rows(rollout, idx), [examples[i] for i in idx.tolist()], task[idx], shaped[idx]))
                num_kept_groups += int(keep_groups.sum())
            if not cfg.rollout.dynamic_sampling:
                break
            # Every process keeps sampling until all have their quota (they must step together).
            least = torch.tensor(float(num_kept_groups))
            if is_distributed():
                dist.all_reduce(least, op=dist.ReduceOp.MIN)
            if least >= self.prompts_per_rank:
                break
        least = torch.tensor(float(min(num_kept_groups, self.prompts_per_rank)))
        if is_distributed():
            dist.all_reduce(least, op=dist.ReduceOp.MIN)
        use_groups = int(least)
        stats.add("groups_trained", torch.tensor(float(use_groups)), None)
        if use_groups == 0:
            return None
        rollout = Rollout.cat([k[0] for k in kept], self.tokenizer.pad_token_id)
        rows = torch.arange(use_groups * g)
        examples = [ex for k in kept for ex in k[1]][: use_groups * g]
        task = torch.cat([k[2] for k in kept])[rows]
        shaped = torch.cat([k[3] for k in kept])[rows]
        rollout = _select_rows(rollout, rows.to(rollout.response_ids.device))
        adv = compute_advantages(shaped, g, cfg.advantage.estimator, cfg.advantage.std_eps)
        return StepBatch(rollout.to(self.device), examples, task, shaped, adv.advantages.to(self.device))

    def _check_reward_failures(self, failed: int, calls: int, example: str | None) -> None:
        """Stop when more than `reward.max_failed_fraction` of this step's reward calls failed
        (summed over processes): a reward that is broken trains on nothing but zeros."""
        counts = torch.tensor([float(failed), float(calls)])
        if is_distributed():
            counts = counts.to(self.device)
            dist.all_reduce(counts)
        failed_all, calls_all = (int(x) for x in counts.tolist())
        limit = self.cfg.reward.max_failed_fraction
        if calls_all and failed_all > limit * calls_all:
            shown = example or "(the failing calls ran on another process; see its log)"
            raise TrainingStopped(
                f"reward {self.cfg.reward.function!r}: {failed_all} of {calls_all} calls failed in step "
                f"{self.step + 1} (more than reward.max_failed_fraction = {limit:g}); for example, {shown}"
            )

    # ------------------------------------------------------------------ 4–5: old log-probs, updates

    def _micro_slices(self, rows: range) -> list[slice]:
        mb = self.cfg.optim.micro_batch_size
        return [slice(i, min(i + mb, rows.stop)) for i in range(rows.start, rows.stop, mb)]

    @torch.no_grad()
    def _score_no_grad(self, scorer, ro: Rollout, rows: slice, grad_norm: bool = False) -> tuple[torch.Tensor, ...]:
        """(logprobs, entropy) of `rows`, plus the log-prob gradient norms with `grad_norm`."""
        with self.autocast:
            return scorer(
                ro.prompt_ids[rows],
                ro.prompt_mask[rows],
                ro.response_ids[rows],
                ro.response_mask[rows],
                self.cfg.rollout.temperature,
                return_grad_norm=grad_norm,
            )

    def _score_all(self, scorer, ro: Rollout, rows: range, grad_norm: bool = False) -> tuple[torch.Tensor, ...]:
        parts = [self._score_no_grad(scorer, ro, s, grad_norm) for s in self._micro_slices(rows)]
        return tuple(torch.cat(outputs) for outputs in zip(*parts))

    def update(self, batch: StepBatch, timings: dict[str, float], stats: MetricSums) -> None:
        cfg, sel = self.cfg, self.cfg.selection
        ro = batch.rollout
        n_rows = ro.batch_size
        g = cfg.rollout.group_size
        mini_rows = self.mini_prompts_per_rank * g
        minis = [range(i, min(i + mini_rows, n_rows)) for i in range(0, n_rows, mini_rows)]
        on_policy = cfg.optim.epochs == 1 and len(minis) == 1
        self.model.train()
        t0 = time.perf_counter()
        old_logp = old_ent = old_gn = ref_logp = None
        # `gradient` selection ranks by ‖∂ log π/∂z‖, returned by the same scoring passes as the entropy
        with_gn = sel.strategy == "gradient"
        if not on_policy:
            old_logp, old_ent, *old_gn = self._score_all(self.policy_scorer, ro, range(n_rows), with_gn)
            old_gn = old_gn[0] if old_gn else None
        if self.ref_model is not None:
            ref_logp, _ = self._score_all(self.ref_scorer, ro, range(n_rows))
        timings["old_logprobs_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(_mix_seed(cfg.seed, self.step, self.rank, 7))
        group = self.group if sel.scope == "global" else None
        for epoch in range(cfg.optim.epochs):
            for mini_index, rows in enumerate(minis):
                micro = self._micro_slices(rows)
                denoms = loss_denominators(
                    [ro.response_mask[s] for s in micro], sel.strategy, sel.ratio, sel.scope, group=self.group
                )
                kept_mask = None
                if sel.scope in ("batch", "global") and sel.strategy != "all":
                    # Rank all of the mini-batch's tokens before the first backward.
                    gn = None
                    if sel.entropy_source == "old" or (old_ent is not None and epoch == 0 and mini_index == 0):
                        ent = old_ent[rows.start : rows.stop] if old_ent is not None else None
                        gn = old_gn[rows.start : rows.stop] if old_gn is not None else None
                    else:
                        ent = None
                    if ent is None:
                        _, ent, *gn = self._score_all(self.policy_scorer, ro, rows, with_gn)
                        gn = gn[0] if gn else None
                    chosen = select_tokens(
                        ent,
                        ro.response_mask[rows.start : rows.stop],
                        sel.strategy,
                        sel.ratio,
                        group=group,
                        generator=generator,
                        grad_norm=gn,
                    )
                    kept_mask = chosen.mask
                    _add_selection_stats(stats, chosen)
                for i, s in enumerate(micro):
                    last = i == len(micro) - 1
                    # Gradients are reduced across processes only on the last micro-batch of the mini-batch.
                    sync = self._gradient_sync(last)
                    with sync:
                        with self.autocast:
                            logp, ent, *gn = self.scorer(
                                ro.prompt_ids[s],
                                ro.prompt_mask[s],
                                ro.response_ids[s],
                                ro.response_mask[s],
                                cfg.rollout.temperature,
                                return_grad_norm=with_gn
                                and kept_mask is None
                                and (sel.entropy_source == "current" or old_ent is None),
                            )
                        mask = ro.response_mask[s]
                        if kept_mask is not None:
                            kept = kept_mask[s.start - rows.start : s.stop - rows.start]
                        elif sel.strategy == "all":
                            kept = None
                        else:
                            current = sel.entropy_source == "current" or old_ent is None
                            source = ent if current else old_ent[s]
                            gn_source = (gn[0] if gn else None) if current else (None if old_gn is None else old_gn[s])
                            chosen = select_tokens(
                                source, mask, sel.strategy, sel.ratio, generator=generator, grad_norm=gn_source
                            )
                            kept = chosen.mask
                            _add_selection_stats(stats, chosen)
                        inp = PolicyLossInput(
                            logprobs=logp,
                            old_logprobs=logp.detach() if old_logp is None else old_logp[s],
                            advantages=batch.advantages[s],
                            response_mask=mask,
                            kept_mask=kept,
                            entropy=ent,
                            ref_logprobs=None if ref_logp is None else ref_logp[s],
                        )
                        out = compute_policy_loss(inp, cfg.loss, denoms, generator)
                        out.loss.backward()
                    stats.update(out.metrics)
                self._optimizer_step(stats)
        timings["update_s"] += time.perf_counter() - t0

    def _gradient_sync(self, last: bool):
        if self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            self.scorer.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.scorer.no_sync()

    def _optimizer_step(self, stats: MetricSums) -> None:
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        # One host sync per optimizer step: the skip decision (identical on every rank after DDP).
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            self.bad_steps = 0
            self.bad_cause = ""
            stats.add("grad_norm", grad_norm, 1)
        else:
            self.bad_steps += 1
            stats.add("skipped_updates", torch.tensor(1.0 / self.world), None)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(grad_norm):
            self.bad_cause = "optimizer steps had a NaN/inf loss or gradient and were skipped"
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            path = self.save()
            raise TrainingStopped(
                f"{self.bad_steps} consecutive {self.bad_cause}; stopping "
                f"(trainer.max_bad_steps = {self.cfg.trainer.max_bad_steps}). "
                f"The weights are those of the last good step, saved at {path or self.run_dir}."
            )

    def evaluate(self) -> dict[str, float]:
        """Acc@k / Len@k on `data.eval_files` (main process; the others wait), as `eval/<file>/…` metrics."""
        metrics: dict[str, float] = {}
        # Under FSDP2 every process gathers the weights; the main one evaluates with them.
        with gathered(self.policy_scorer if self.sharded else None):
            if self.is_main:
                metrics = self._evaluate_main()
        if is_distributed():
            dist.barrier()
        return metrics

    def _evaluate_main(self) -> dict[str, float]:
        """Acc@k / Len@k on `data.eval_files` with this process's (full) weights."""
        cfg, metrics = self.cfg, {}
        from forkrl.eval.accuracy import evaluate_with_run_config, write_eval_report

        with self.autocast:
            report = evaluate_with_run_config(self.model, self.tokenizer, cfg)
        write_eval_report(report, self.run_dir / "eval" / f"step_{self.step:06d}")
        for result in report.results:
            metrics[f"eval/{result.name}/acc_at_k"] = result.acc_at_k
            metrics[f"eval/{result.name}/len_at_k"] = result.len_at_k
        return metrics

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Run to `trainer.total_steps` and return the last step's metrics. A SIGTERM/SIGINT ends
        the run after the step in progress, checkpointed (`TrainingInterrupted`)."""
        progress = _progress(self.is_main, self.cfg.trainer.total_steps, self.step)
        try:
            with self.stop:
                return self._train_loop(progress)
        finally:
            progress.close()
            self.close()

    def close(self) -> None:
        """Stop the reward workers and close the logs (the run directory's lock belongs to its owner)."""
        self.rewarder.close()
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def _train_loop(self, progress: _progress) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        while self.step < cfg.trainer.total_steps:
            t_step = time.perf_counter()
            timings = {"generate_s": 0.0, "reward_s": 0.0, "old_logprobs_s": 0.0, "update_s": 0.0}
            stats = MetricSums()
            batch = self.collect_batch(timings, stats)
            self.step += 1
            if batch is not None:
                self.update(batch, timings, stats)
                _add_entropy_percentiles(stats, batch.rollout)
                tokens = batch.rollout.response_mask.sum()
                stats.add("tokens_trained", tokens.float(), None)
            metrics = stats.compute(self.group)
            step_s = time.perf_counter() - t_step
            generated = (
                metrics.get("response_length", 0.0) * metrics.get("groups_sampled", 0.0) * cfg.rollout.group_size
            )
            metrics.update({k: v for k, v in timings.items()})
            metrics.update(
                {"step_s": step_s, "tokens_per_s": generated / step_s, "lr": self.scheduler.get_last_lr()[0]}
            )
            if batch is None:
                metrics["skipped_no_informative_groups"] = 1.0
            if cfg.trainer.eval_every and cfg.data.eval_files and self.step % cfg.trainer.eval_every == 0:
                metrics.update(self.evaluate())
            metrics.update(fast_paths.step_flags())  # fast_path/<name>: 1 used, 0 declined (warned once)
            if self.logger is not None:
                self.logger.log(self.step, metrics)
            progress.advance(self.step, metrics)
            last = metrics
            if batch is None:
                self._count_step_without_groups(metrics)
            if (
                cfg.trainer.save_every
                and self.step % cfg.trainer.save_every == 0
                and self.step < cfg.trainer.total_steps
            ):
                self.save()
            if self._any_process(self.stop.requested):
                path = self.save()
                signum = self.stop.signum or signal.SIGTERM
                raise TrainingInterrupted(
                    signum,
                    f"stopped by {signal.Signals(signum).name} after step {self.step}; checkpoint saved at "
                    f"{path or self.run_dir}; continue with: forkrl train --resume {self.run_dir}",
                )
        self.save()
        return last

    def _count_step_without_groups(self, metrics: dict[str, float]) -> None:
        """A step with no trainable group is a bad step: `trainer.max_bad_steps` in a row stop the run."""
        self.bad_steps += 1
        self.bad_cause = (
            "training steps had no trainable group (every group's rewards were equal; last step: "
            f"accuracy {metrics.get('accuracy', float('nan')):.3f}, "
            f"{metrics.get('reward_errors', 0):.0f} reward errors, {metrics.get('reward_timeouts', 0):.0f} timeouts)"
        )
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            path = self.save()
            raise TrainingStopped(
                f"{self.bad_steps} consecutive {self.bad_cause}; stopping "
                f"(trainer.max_bad_steps = {self.cfg.trainer.max_bad_steps}; checkpoint {path or self.run_dir})"
            )


def _select_rows(ro: Rollout, idx: torch.Tensor) -> Rollout:
    return Rollout(**{f.name: getattr(ro, f.name)[idx.to(getattr(ro, f.name).device)] for f in fields(ro)})


def _add_selection_stats(stats: MetricSums, chosen) -> None:
    thr = chosen.threshold
    ok = ~torch.isnan(thr)
    stats.add("entropy_threshold", torch.where(ok, thr, torch.zeros_like(thr)), ok.float())


def _add_entropy_percentiles(stats: MetricSums, ro: Rollout) -> None:
    """Percentiles 0, 10, …, 100 of this process's response-token entropies (old policy, Eq. 1)."""
    values = ro.sampler_entropy[ro.response_mask.bool()].float()
    if values.numel() == 0:
        return
    q = torch.quantile(values.cpu()[:16_000_000], torch.tensor([p / 100 for p in PERCENTILES]))
    for p, v in zip(PERCENTILES, q):
        stats.add(f"entropy_p{p}", v, 1)
    stats.add("entropy_frac_below_0.01", (values < 1e-2).float().sum(), values.numel())


def _lr_factor(i: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and i < warmup:
        return (i + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (i - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _progress:
    """A rich progress bar with ETA on the main process, nothing elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.bar.add_task("", total=total, completed=start)
            self.bar.start()

    def advance(self, step: int, m: dict[str, float]) -> None:
        if self.bar is None:
            return
        desc = (
            f"acc {m.get('accuracy', float('nan')):.3f}  ent {m.get('entropy', float('nan')):.3f}  "
            f"kept {m.get('kept_frac', float('nan')):.2f}  len {m.get('response_length', float('nan')):.0f}"
        )
        self.bar.update(self.task, completed=step, description=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
        trainer = Trainer(cfg, resume_from=resume, run_dir=run)
        return trainer.train()


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
