"""Produce every figure of docs/analysis.md on the toy model (CPU; about 15–25 minutes on 2 cores).

    python docs/make_analysis.py --out runs/analysis_docs --figures docs/figures

Runs two short trainings from the shipped toy base model (top-20% forking tokens and all tokens,
saving a middle checkpoint), stores the base model's responses to held-out problems, scores them
under the later checkpoints, runs every `forkrl analyze` command, and copies the PNGs into
`--figures`. Every step is the public API a user would call.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from forkrl.analysis.compare import run_compare
from forkrl.analysis.entropy import run_entropy
from forkrl.analysis.evolution import run_evolution
from forkrl.analysis.law import run_law
from forkrl.analysis.overlap import run_overlap
from forkrl.analysis.shift import run_shift
from forkrl.analysis.store import StoreOptions, run_score, run_store
from forkrl.analysis.temperature import run_temperature
from forkrl.tasks.countdown import generate_problems, write_problems_jsonl
from forkrl.toy.demo import SHIPPED_MODEL
from forkrl.train.trainer import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/analysis_docs")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per training run")
    parser.add_argument("--problems", type=int, default=64, help="held-out problems in the rollout store")
    args = parser.parse_args()
    out, figures = Path(args.out), Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    build = json.loads((SHIPPED_MODEL / "toy_build.json").read_text())["config"]
    max_tokens = build["eval_max_new_tokens"]
    write_problems_jsonl(out / "train.jsonl", generate_problems(4096, 0, "train", unique=False))
    write_problems_jsonl(out / "test.jsonl", generate_problems(args.problems, build["eval_seed"], "test"))

    runs = {}
    for name, strategy, ratio in (("top20", "top", 0.2), ("all", "all", 1.0)):
        runs[name] = out / f"run_{name}"
        if not (runs[name] / "checkpoints").is_dir():
            run_training(None, [
                f"model.name={SHIPPED_MODEL}", f"data.train_files=[{out / 'train.jsonl'}]", "data.template=countdown",
                "reward.function=countdown", "reward.overlong_shaping=false", f"output_dir={runs[name]}",
                "rollout.prompts_per_step=32", "rollout.group_size=8", f"rollout.max_new_tokens={max_tokens}",
                "rollout.generation_batch_size=256", f"selection.strategy={strategy}", f"selection.ratio={ratio}",
                "optim.lr=5e-4", "optim.mini_batch_size=16", "optim.micro_batch_size=64", "optim.weight_decay=0",
                f"trainer.total_steps={args.steps}", f"trainer.save_every={args.steps // 2}",
                "trainer.keep_checkpoints=3", "trainer.device=cpu", "model.dtype=float32",
            ])  # fmt: skip
    ckpts = sorted((runs["top20"] / "checkpoints").iterdir())
    store = out / "store"
    if not store.is_dir():
        options = StoreOptions(k=8, max_new_tokens=max_tokens, batch_size=256, reward="countdown", template="countdown")
        run_store(str(SHIPPED_MODEL), str(store), data=str(out / "test.jsonl"), options=options, device="cpu")
        for ckpt in ckpts:
            run_score(str(store), str(ckpt), name=ckpt.name, device="cpu")
    a = out / "analysis"
    run_entropy(store, a / "entropy", min_count=20)
    run_overlap(store, a / "overlap", columns=["entropy", *[f"entropy_{c.name}" for c in ckpts]],
                labels=["base", *[c.name for c in ckpts]])  # fmt: skip
    run_shift(store, a / "shift", before="entropy", after=f"entropy_{ckpts[-1].name}")
    run_evolution(runs["top20"], a / "evolution")
    run_law([runs["top20"], runs["all"]], a / "law")
    run_compare([runs["top20"], runs["all"]], a / "compare", smooth=3)
    run_temperature(str(SHIPPED_MODEL), str(out / "test.jsonl"), a / "temperature", t_high_values=[0.6, 1.0, 1.4],
                    t_low_values=[0.6, 1.0, 1.4], entropy_json=str(a / "entropy" / "entropy.json"), k=4,
                    max_new_tokens=max_tokens, batch_size=256, reward="countdown", template="countdown",
                    device="cpu")  # fmt: skip
    for png in a.rglob("*.png"):
        shutil.copy(png, figures / png.name)
    print(f"figures in {figures}: {sorted(p.name for p in figures.glob('*.png'))}")


if __name__ == "__main__":
    main()
