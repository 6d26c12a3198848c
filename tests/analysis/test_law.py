"""The entropy–performance law R = −a·e^H + b: closed-form fit, held-out prediction, `run_law` outputs."""

import json
import math

import numpy as np
import pytest

from forkrl.analysis.law import fit_entropy_law, holdout_error, run_law
from forkrl.analysis.runs import RunError

A, B = 0.3, 0.9
H = np.linspace(0.05, 1.5, 40)
R = -A * np.exp(H) + B


def write_run(path, records, config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return path


def test_two_points_by_hand():
    # x = e^H = 1 and 2, R = 0.6 and 0.3: the line R = −a·x + b through them has a = 0.3, b = 0.9.
    fit = fit_entropy_law([0.0, math.log(2.0)], [0.6, 0.3])
    assert fit.a == pytest.approx(0.3, abs=1e-12)
    assert fit.b == pytest.approx(0.9, abs=1e-12)
    assert fit.ceiling == pytest.approx(0.6, abs=1e-12)  # b − a: performance at H = 0
    assert fit.r2 == pytest.approx(1.0)


def test_fit_recovers_a_and_b_without_noise():
    fit = fit_entropy_law(H, R)
    assert fit.a == pytest.approx(A, abs=1e-3)
    assert fit.b == pytest.approx(B, abs=1e-3)
    assert fit.ceiling == pytest.approx(B - A, abs=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.rmse < 1e-9


def test_fit_with_small_noise_is_close():
    # noise sd 0.005: the slope's standard error is about sd / (std(e^H)·√n) ≈ 0.005 / (1.0·6.3)
    # ≈ 1e-3, so 0.01 is a wide margin.
    noisy = R + np.random.default_rng(0).normal(0.0, 0.005, size=R.shape)
    fit = fit_entropy_law(H, noisy)
    assert fit.a == pytest.approx(A, abs=0.01)
    assert fit.b == pytest.approx(B, abs=0.01)
    assert fit.r2 > 0.99


def test_holdout_on_noiseless_data_predicts_the_rest_exactly():
    hold = holdout_error([(H, R)], fit_fraction=0.5)
    assert (hold.n_train, hold.n_test) == (20, 20)
    assert hold.fit.a == pytest.approx(A, abs=1e-9)
    assert hold.rmse < 1e-9 and hold.mae < 1e-9


def test_fit_rejects_degenerate_input():
    with pytest.raises(ValueError, match="2 points with different entropy"):
        fit_entropy_law([0.5, 0.5], [0.1, 0.2])
    with pytest.raises(ValueError, match="fit_fraction"):
        holdout_error([(H, R)], fit_fraction=1.0)


def test_run_law_writes_fit_and_plots(tmp_path):
    # Training accuracy follows the law exactly; one step has a null accuracy (skipped), and every
    # 10th step carries an eval accuracy in percent that follows 100 × the law.
    records = []
    for i, (h, r) in enumerate(zip(H, R), start=1):
        rec = {"step": i, "entropy": h, "accuracy": None if i == 7 else r, "cov_mean": 0.01, "cov_pos_frac": 0.5}
        if i % 10 == 0:
            rec["eval/aime24/acc_at_k"] = 100 * r
        records.append(rec)
    run = write_run(tmp_path / "run", records, {"seed": 0, "selection": {"strategy": "top", "ratio": 0.2}})

    out = tmp_path / "out"
    summary = run_law([run], out)
    for name in ("law.json", "law.png", "covariance.png"):
        assert (out / name).is_file()
    saved = json.loads((out / "law.json").read_text())
    assert saved["pooled"]["a"] == pytest.approx(A, abs=1e-6)
    assert saved["pooled"]["ceiling"] == pytest.approx(B - A, abs=1e-6)
    assert saved["pooled"]["n"] == 39
    assert saved["pooled"]["holdout"]["rmse"] < 1e-6
    assert summary["runs"][0]["label"] == "top 20%"

    # A bare benchmark name picks eval/<name>/acc_at_k: 4 points, a and b scaled by 100.
    summary = run_law([run], tmp_path / "out_eval", accuracy_key="aime24")
    assert summary["runs"][0]["accuracy_key"] == "eval/aime24/acc_at_k"
    assert summary["pooled"]["n"] == 4
    assert summary["pooled"]["b"] == pytest.approx(100 * B, abs=1e-6)


def test_run_law_errors_name_the_file_and_key(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "entropy": 0.5, "accuracy": 0.1}])
    with pytest.raises(RunError, match=r"metrics\.jsonl: no accuracy metric 'aime25'"):
        run_law([run], tmp_path / "out", accuracy_key="aime25")
    with pytest.raises(RunError, match=r"metrics\.jsonl: no metric 'policy_entropy'"):
        run_law([run], tmp_path / "out", entropy_key="policy_entropy")
    with pytest.raises(RunError, match=r"nope.*metrics\.jsonl: missing"):
        (tmp_path / "nope").mkdir()
        run_law([tmp_path / "nope"], tmp_path / "out")
