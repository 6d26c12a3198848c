"""How well each token selection's gradient points where the all-token gradient points, on one fixed batch.

The diagnostic of the toy study (docs/ablation.md): a uniformly random subset of tokens gives an
unbiased estimate of the all-token policy gradient (with the `kept-tokens` normalizer exactly;
with `all-tokens` scaled by ρ), so if `random` ρ = 0.2 degrades training while `top` does not,
either its estimate is too noisy for the fixed-size steps Adam takes, or something is wrong. This
script measures the first: the toy recipe's first optimizer step (the first mini-batch of step 1:
16 prompts × 8 responses of the shipped base model, seed 0, exactly as the trainer samples and
scores them), and for that batch

- the policy gradient with every token (`all`), with `top`, `bottom`, `gradient` and `M` draws of
  `random` (ρ as in the study, per micro-batch like the trainer, `kept-tokens` normalizer);
- the cosine of each to the `all` gradient, and of Adam's first step direction: with zero moments
  Adam's first update is lr·g/(|g| + ε) ≈ lr·sign(g) per coordinate, so the cosine of the signs
  is the agreement of the first steps the optimizer actually takes;
- the cosine of the *mean* of the M random gradients to `all` (→ 1 if the estimate is unbiased).

    python docs/ablation/gradient_agreement.py --out docs/ablation   # ~2-5 min on 1 CPU thread

Writes `gradient_agreement.json` and `gradient_agreement.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from forkrl.algo.losses import PolicyLossInput, compute_policy_loss, loss_denominators
from forkrl.algo.selection import TokenSelector
from forkrl.config import load_config
from forkrl.metrics import MetricSums
from forkrl.ops.token_ranking import select_tokens
from forkrl.toy.recipe import sweep_setup, toy_config_dict
from forkrl.train.trainer import Trainer


def first_mini_batch(seed: int, work: Path) -> tuple[Trainer, object, list[slice]]:
    """A trainer on the toy recipe and the first mini-batch of its step 1 (as micro-batch slices)."""
    overrides = sweep_setup(work / "data", seed)
    cfg_dict = toy_config_dict(seed, work / "run", "unused.jsonl")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(path), [*overrides, "trainer.tensorboard=false"])
    trainer = Trainer(cfg)
    timings = dict.fromkeys(("generate_s", "reward_s", "old_logprobs_s", "update_s"), 0.0)
    batch = trainer.collector.collect(1, timings, MetricSums())
    rows = cfg.optim.mini_batch_size * cfg.rollout.group_size
    mb = cfg.optim.micro_batch_size
    return trainer, batch, [slice(i, min(i + mb, rows)) for i in range(0, rows, mb)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--draws", type=int, default=32, help="random masks drawn (M)")
    parser.add_argument("--out", default="docs/ablation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, batch, micro = first_mini_batch(args.seed, Path(tmp))
        cfg, ro, models = trainer.cfg, batch.rollout, trainer.models
        params = models.trainable_parameters()
        models.model.train()
        outs = [
            models.scorer(ro.prompt_ids[s], ro.prompt_mask[s], ro.response_ids[s], ro.response_mask[s],
                          cfg.rollout.temperature, return_grad_norm=True)
            for s in micro
        ]  # fmt: skip
        generator = torch.Generator().manual_seed(1234)

        def gradient(strategy: str, ratio: float) -> torch.Tensor:
            masks = []
            for s, (_, ent, gn) in zip(micro, outs):
                chosen = select_tokens(ent.detach(), ro.response_mask[s], strategy, ratio, generator=generator,
                                       grad_norm=gn)  # fmt: skip
                masks.append(chosen.mask)
            responses = [ro.response_mask[s] for s in micro]
            kept_count = TokenSelector(strategy, ratio, "microbatch", "current").num_kept(responses)
            denoms = loss_denominators(responses, kept_count)
            loss = 0.0
            for s, (logp, ent, _), kept in zip(micro, outs, masks):
                inp = PolicyLossInput(logp, logp.detach(), batch.advantages[s], ro.response_mask[s], kept, ent)
                loss = loss + compute_policy_loss(inp, cfg.loss, denoms).loss
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            return torch.cat([g.flatten() for g in grads]).double()

        def cos(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

        g_all = gradient("all", 1.0)
        result = {"seed": args.seed, "ratio": args.ratio, "draws": args.draws,
                  "tokens": int(ro.response_mask[: micro[-1].stop].sum()), "parameters": g_all.numel()}  # fmt: skip
        named = {name: gradient(name, r) for name, r in
                 (("top", args.ratio), ("bottom", 1 - args.ratio), ("gradient", args.ratio))}  # fmt: skip
        randoms = [gradient("random", args.ratio) for _ in range(args.draws)]
        for name, g in named.items():
            result[name] = {"cosine": cos(g, g_all), "sign_cosine": cos(g.sign(), g_all.sign()),
                            "norm_ratio": float(g.norm() / g_all.norm())}  # fmt: skip
        r_cos = torch.tensor([cos(g, g_all) for g in randoms])
        r_sign = torch.tensor([cos(g.sign(), g_all.sign()) for g in randoms])
        r_pair = torch.tensor([cos(randoms[i], randoms[i + 1]) for i in range(0, len(randoms) - 1, 2)])
        result["random"] = {
            "cosine_mean": float(r_cos.mean()), "cosine_min": float(r_cos.min()), "cosine_max": float(r_cos.max()),
            "sign_cosine_mean": float(r_sign.mean()),
            "norm_ratio_mean": float(torch.tensor([g.norm() / g_all.norm() for g in randoms]).mean()),
            "cosine_between_draws_mean": float(r_pair.mean()),
            "cosine_of_mean_of_draws": cos(torch.stack(randoms).mean(0), g_all),
        }  # fmt: skip
        result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(r_cos.tolist(), result, out / "gradient_agreement.png")
    print(json.dumps(result, indent=2))


def _plot(random_cosines: list[float], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(random_cosines, bins=16, color="#999999", label=f"random ρ={result['ratio']} ({result['draws']} draws)")
    colors = {"top": "#d62728", "bottom": "#1f77b4", "gradient": "#2ca02c"}
    for name, color in colors.items():
        ax.axvline(result[name]["cosine"], color=color, lw=2, label=f"{name}: {result[name]['cosine']:.2f}")
    ax.axvline(result["random"]["cosine_of_mean_of_draws"], color="k", ls="--",
               label=f"mean of the random draws: {result['random']['cosine_of_mean_of_draws']:.2f}")  # fmt: skip
    ax.set_xlabel("cosine to the all-token policy gradient (first mini-batch, base model)")
    ax.set_ylabel("draws")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
