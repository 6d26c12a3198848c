"""Held-out evaluation during training (`trainer.eval_every`): Acc@k / Len@k on `data.eval_files`."""

from __future__ import annotations

from pathlib import Path

from forkrl.distributed import barrier
from forkrl.train.setup import PolicyModels


def evaluate_during_training(
    models: PolicyModels, cfg, run_dir: Path, step: int, is_main: bool, backend=None
) -> dict[str, float]:
    """`eval/<file>/acc_at_k` and `len_at_k` of the current weights, written to
    `RUN_DIR/eval/step_N/`. Every process calls: under FSDP2 all gather the weights, the main one
    evaluates with them (with the run's autocast), the others wait; they return {}. `backend`: the
    run's generation backend (an engine already holding the current weights, so a GPU never holds
    two); None samples with the model in process."""
    from forkrl.eval.accuracy import evaluate_with_run_config, write_eval_report

    metrics: dict[str, float] = {}
    with models.full_weights():
        if is_main:
            with models.autocast():
                report = evaluate_with_run_config(models.model, models.tokenizer, cfg, backend=backend)
            write_eval_report(report, run_dir / "eval" / f"step_{step:06d}")
            for result in report.results:
                metrics[f"eval/{result.name}/acc_at_k"] = result.acc_at_k
                metrics[f"eval/{result.name}/len_at_k"] = result.len_at_k
    barrier()
    return metrics
