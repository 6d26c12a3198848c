"""Acc@k / Len@k on CUDA (`evaluate_model`): a seeded evaluation is a function of its inputs on the
device too, with the policy in float32 and under the trainer's bf16 autocast."""

from __future__ import annotations

import json

from forkrl.eval import evaluate_model
from forkrl.models import load_policy, precision

DEVICE = "cuda"
K = 4
MAX_NEW_TOKENS = 8
ROWS = [("1+1=", "2"), ("2*3=", "6"), ("7-5=", "2"), ("9/3=", "3"), ("4+4=", "8")]


def alnum_reward(completion, example) -> float:
    """1 when the completion holds a letter or digit, else 0: varied, cheap and deterministic."""
    return float(any(c.isalnum() for c in completion))


def check_seeded_eval_on_device(device: str, model_dir: str, tmp_path) -> None:
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    model, tok = load_policy(model_dir, dtype="auto", device=device)
    assert next(model.parameters()).device.type == device

    def run(seed):
        with precision.autocast("auto", device):
            report = evaluate_model(
                model, tok, str(bench), k=K, max_new_tokens=MAX_NEW_TOKENS, reward_fn=alnum_reward,
                batch_size=6, seed=seed, keep_completions=True,
            )  # fmt: skip
        return report.to_json(include_details=True)

    first, again, other = run(0), run(0), run(1)
    assert first["results"] == again["results"]
    (result,) = first["results"]
    assert result["num_questions"] == len(ROWS)
    assert 0.0 <= result["acc_at_k"] <= 100.0 and 1.0 <= result["len_at_k"] <= MAX_NEW_TOKENS
    completions = [c for q in result["questions"] for c in q["completions"]]
    assert len(completions) == len(ROWS) * K
    assert completions != [c for q in other["results"][0]["questions"] for c in q["completions"]]


def test_seeded_eval_on_cuda(tiny_model_dir, tmp_path):
    check_seeded_eval_on_device(DEVICE, tiny_model_dir, tmp_path)
