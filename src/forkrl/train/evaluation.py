"""Held-out evaluation during training (`trainer.eval_every`): Acc@k / Len@k on `data.eval_files`."""

from __future__ import annotations

from pathlib import Path

from forkrl.config import Config
from forkrl.distributed import barrier
from forkrl.train.context import TrainContext
from forkrl.train.setup import PolicyModels


class Evaluator:
    """Evaluates the current weights every `trainer.eval_every` steps (when `data.eval_files` are set).

    `engine`: the run's generation backend when it is an engine already holding the current weights
    (so a GPU never holds two); None samples with the model in process."""

    def __init__(self, cfg: Config, ctx: TrainContext, models: PolicyModels, run_dir: Path, engine=None):
        self.cfg, self.ctx, self.models, self.run_dir, self.engine = cfg, ctx, models, run_dir, engine

    def due(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every and self.cfg.data.eval_files and step % every == 0)

    def evaluate(self, step: int) -> dict[str, float]:
        """`eval/<file>/acc_at_k` and `len_at_k` of the current weights, written to
        `RUN_DIR/eval/step_N/`. Every process calls: under FSDP2 all gather the weights, the main one
        evaluates with them (with the run's autocast), the others wait; they return {}."""
        from forkrl.eval.accuracy import evaluate_with_run_config, write_eval_report

        models = self.models
        metrics: dict[str, float] = {}
        with models.full_weights():
            if self.ctx.is_main:
                with models.autocast():
                    report = evaluate_with_run_config(models.model, models.tokenizer, self.cfg, backend=self.engine)
                write_eval_report(report, self.run_dir / "eval" / f"step_{step:06d}")
                for result in report.results:
                    metrics[f"eval/{result.name}/acc_at_k"] = result.acc_at_k
                    metrics[f"eval/{result.name}/len_at_k"] = result.len_at_k
        barrier()
        return metrics
