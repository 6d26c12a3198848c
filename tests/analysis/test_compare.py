"""Curves and the Acc@k / Len@k table across settings, averaged over seeds with standard errors."""

import json

import numpy as np
import pytest

from forkrl.analysis.compare import latest_eval, run_compare, smooth_trailing
from forkrl.analysis.runs import RunError, load_run, load_runs, selection_label

STEPS = range(1, 6)


def write_run(path, config, accuracy_offset, evals):
    """A run with accuracy 0.1·step + offset, entropy 1 − 0.1·step, length 100·step; `evals` maps
    an eval step to {benchmark: (acc, len, std_err)} written as eval/step_N/eval.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(json.dumps(config))
    records = [
        {"step": s, "accuracy": 0.1 * s + accuracy_offset, "entropy": 1 - 0.1 * s, "response_length": 100.0 * s}
        for s in STEPS
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step, results in evals.items():
        out = path / "eval" / f"step_{step:06d}"
        out.mkdir(parents=True)
        report = {
            "config": {"k": 16},
            "results": [
                {"name": n, "k": 16, "acc_at_k": a, "len_at_k": l, "std_err": e, "num_questions": 30}
                for n, (a, l, e) in results.items()
            ],
        }
        if len(results) >= 2:
            report["average"] = {
                "name": "average",
                "acc_at_k": sum(a for a, _, _ in results.values()) / len(results),
                "len_at_k": sum(l for _, l, _ in results.values()) / len(results),
                "std_err": None,
            }
        (out / "eval.json").write_text(json.dumps(report))
    return path


def config(strategy, ratio, seed, **extra):
    return {
        "seed": seed,
        "output_dir": f"runs/{strategy}{seed}",
        "selection": {"strategy": strategy, "ratio": ratio},
        "optim": {"lr": 1e-6, **extra},
    }


@pytest.fixture
def four_runs(tmp_path):
    """Two settings × two seeds. Only the latest eval (step 5) counts; step 2 is a decoy."""
    decoy = {2: {"aime24": (0.0, 1.0, 1.0), "math500": (0.0, 1.0, 1.0)}}
    return [
        write_run(tmp_path / "top_s0", config("top", 0.2, 0), 0.00,
                  {**decoy, 5: {"aime24": (40.0, 1000.0, 9.0), "math500": (80.0, 500.0, 2.0)}}),
        write_run(tmp_path / "top_s1", config("top", 0.2, 1), 0.02,
                  {**decoy, 5: {"aime24": (50.0, 1200.0, 9.0), "math500": (84.0, 520.0, 2.0)}}),
        write_run(tmp_path / "all_s0", config("all", 1.0, 0), 0.00,
                  {5: {"aime24": (30.0, 900.0, 9.0), "math500": (70.0, 400.0, 2.0)}}),
        write_run(tmp_path / "all_s1", config("all", 1.0, 1), 0.06,
                  {5: {"aime24": (36.0, 1000.0, 9.0), "math500": (74.0, 440.0, 2.0)}}),
    ]  # fmt: skip


def test_table_is_mean_and_standard_error_across_seeds(four_runs, tmp_path):
    out = tmp_path / "out"
    summary = run_compare(four_runs, out)
    for name in ("compare.png", "compare.md", "compare.json"):
        assert (out / name).is_file()

    assert [s["label"] for s in summary["settings"]] == ["top 20%", "all tokens"]
    assert summary["settings"][0]["seeds"] == [0, 1]
    table = summary["table"]
    assert table["k"] == 16 and table["benchmarks"] == ["aime24", "math500", "average"]
    top, all_tokens = table["rows"]
    # Two seeds x and y: mean (x+y)/2, std(ddof=1) = |x−y|/√2, standard error = |x−y|/2.
    # aime24 40, 50 -> 45 ± 5; length 1000, 1200 -> 1100 ± 100.
    assert top["benchmarks"]["aime24"] == pytest.approx(
        {"acc": 45.0, "acc_se": 5.0, "len": 1100.0, "len_se": 100.0, "n": 2, "se_kind": "seeds"}
    )
    # average per seed: (40+80)/2 = 60 and (50+84)/2 = 67 -> 63.5 ± 3.5
    assert top["benchmarks"]["average"]["acc"] == pytest.approx(63.5)
    assert top["benchmarks"]["average"]["acc_se"] == pytest.approx(3.5)
    # all tokens, math500: 70, 74 -> 72 ± 2
    assert all_tokens["benchmarks"]["math500"]["acc"] == pytest.approx(72.0)
    assert all_tokens["benchmarks"]["math500"]["acc_se"] == pytest.approx(2.0)
    assert top["eval_steps"] == [5, 5]

    md = (out / "compare.md").read_text()
    assert "| top 20% | 2 | 5 | 45.00 ± 5.00 | 1100.0 ± 100.0 | 82.00 ± 2.00 |" in md
    assert "†" not in md  # every entry is across seeds

    # Curves: top 20% accuracy at step s is 0.1·s and 0.1·s + 0.02 -> mean 0.1·s + 0.01, SE 0.01.
    curves = json.loads((out / "compare.json").read_text())["curves"]
    top_acc = curves["accuracy"][0]
    assert top_acc["steps"] == list(STEPS)
    np.testing.assert_allclose(top_acc["mean"], [0.1 * s + 0.01 for s in STEPS])
    np.testing.assert_allclose(top_acc["stderr"], [0.01] * 5)
    np.testing.assert_allclose(curves["response_length"][1]["mean"], [100.0 * s for s in STEPS])


def test_single_run_uses_question_std_err_and_smoothing(four_runs, tmp_path):
    summary = run_compare(four_runs[:1], tmp_path / "out", smooth=2)
    entry = summary["table"]["rows"][0]["benchmarks"]["aime24"]
    assert (entry["acc"], entry["acc_se"], entry["se_kind"], entry["len_se"]) == (40.0, 9.0, "questions", None)
    assert "40.00 ± 9.00†" in (tmp_path / "out" / "compare.md").read_text()
    # trailing mean over 2 points of 0.1·s: 0.1, 0.15, 0.25, ...; no band with one seed
    assert summary["final"]["accuracy"]["top 20%"] == pytest.approx({"mean": 0.45, "stderr": None})


def test_smooth_trailing_by_hand():
    np.testing.assert_allclose(smooth_trailing(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(smooth_trailing(np.array([1.0, 2.0, 3.0]), 10), [1.0, 1.5, 2.0])


def test_labels_from_configs(tmp_path):
    assert selection_label({"selection": {"strategy": "bottom", "ratio": 0.8}}) == "bottom 80%"
    assert selection_label({"selection": {"strategy": "random", "ratio": 0.2}}) == "random 20%"
    assert selection_label({"selection": {"strategy": "all", "ratio": 1.0}, "loss": {"policy_loss": "kl_cov"}}) == (
        "KL-Cov"
    )
    # Same selection, different lr: the labels say what differs.
    a = write_run(tmp_path / "a", config("top", 0.2, 0), 0.0, {})
    b = write_run(tmp_path / "b", config("top", 0.2, 0, lr=2e-6), 0.0, {})
    assert [r.label for r in load_runs([a, b])] == ["top 20% (optim.lr=1e-06)", "top 20% (optim.lr=2e-06)"]


def test_eval_fallback_to_metrics_and_missing_metric(tmp_path):
    run = write_run(tmp_path / "r", config("top", 0.1, 0), 0.0, {})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "eval/aime24/acc_at_k": 12.5, "eval/aime24/len_at_k": 300.0})
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    snap = latest_eval(load_run(run))
    assert (snap.step, snap.benchmarks["aime24"]["acc"], snap.benchmarks["aime24"]["len"]) == (3, 12.5, 300.0)

    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "accuracy": 0.5}) + "\n")
    with pytest.raises(RunError, match=r"r/metrics\.jsonl: no metric 'entropy'"):
        run_compare([run], tmp_path / "out")
