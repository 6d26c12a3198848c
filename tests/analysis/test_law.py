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
    with pytest.raises(RunError, match=r"nope: neither a run directory \(metrics\.jsonl\) nor a sweep's results"):
        (tmp_path / "nope").mkdir()
        run_law([tmp_path / "nope"], tmp_path / "out")


# ---------------------------------------------------------------------------- across a study's sweeps


def _law_records(a, b, offset=0.0, h=H):
    return [
        {"step": i, "entropy": float(x), "accuracy": float(-a * math.exp(x) + b + offset)} for i, x in enumerate(h, 1)
    ]


def write_sweep(root, cells, seeds=(0, 1)):
    """A sweep results folder: `cells` maps a cell name to records(seed); base/seed_N has no metrics."""
    for cell, records in cells.items():
        for seed in seeds:
            run = write_run(root / cell / f"seed_{seed}", records(seed), {"seed": seed})
            (run / "sweep_result.json").write_text(json.dumps({"kind": "train", "cell": cell, "seed": seed}))
    for seed in seeds:
        (root / "base" / f"seed_{seed}").mkdir(parents=True)
        (root / "base" / f"seed_{seed}" / "sweep_result.json").write_text(json.dumps({"kind": "base", "seed": seed}))
    return root


def test_sweep_folders_expand_to_cells_and_a_copied_run_counts_once(tmp_path):
    from forkrl.analysis.law_study import cell_label, expand_run_dirs

    study = write_sweep(
        tmp_path / "study",
        {
            "selection.strategy=all": lambda s: _law_records(A, B, 0.01 * s),
            "selection.strategy=top,selection.ratio=0.2": lambda s: _law_records(A, B, 0.1 + 0.01 * s),
        },
    )
    # A second sweep that copied the study's `all` runs and added one cell.
    extra = write_sweep(
        tmp_path / "rho", {"selection.strategy=top,selection.ratio=0.1": lambda s: _law_records(A, B, 0.2 + 0.01 * s)}
    )
    import shutil

    shutil.copytree(study / "selection.strategy=all", extra / "selection.strategy=all")
    sources, notes = expand_run_dirs([study, extra])
    cells = [s.cell for s in sources]
    # The study's 4 runs, then the rho folder's own 2: its copies of `all` are the same bytes, counted once.
    assert (
        cells
        == ["selection.strategy=all"] * 2
        + ["selection.strategy=top,selection.ratio=0.2"] * 2
        + ["selection.strategy=top,selection.ratio=0.1"] * 2
    )
    assert [s.path.parent.parent.name for s in sources] == ["study"] * 4 + ["rho"] * 2
    assert len(notes) == 2 and all("counted once" in n and "study" in n for n in notes)
    assert (
        cell_label("selection.strategy=top,selection.ratio=0.2,loss.normalizer=all-tokens")
        == "top ρ=0.2, normalizer=all-tokens"
    )
    assert cell_label("selection.strategy=all") == "all"
    with pytest.raises(RunError, match=r"empty: neither a run directory .* nor a sweep's results"):
        (tmp_path / "empty").mkdir()
        expand_run_dirs([tmp_path / "empty"])


def test_bootstrap_over_runs_spans_the_runs_own_fits():
    from forkrl.analysis.law_study import bootstrap_fit

    # Two runs on the same entropy grid, each exactly on its own law (a = 0.2 and 0.4). A resample
    # is (1,1), (2,2) or one of each (the pooled fit of equal grids averages them: a = 0.3), with
    # chances 1/4, 1/4, 1/2: the 2.5% and 97.5% percentiles are the two runs' own values.
    series = [(H, -0.2 * np.exp(H) + B), (H, -0.4 * np.exp(H) + 1.1)]
    boot = bootstrap_fit(series, 400, 0, fit_entropy_law)
    assert boot["a"]["low"] == pytest.approx(0.2, abs=1e-9) and boot["a"]["high"] == pytest.approx(0.4, abs=1e-9)
    assert boot["ceiling"]["low"] == pytest.approx(B - 0.2, abs=1e-9)
    assert boot["ceiling"]["high"] == pytest.approx(1.1 - 0.4, abs=1e-9)
    assert boot == bootstrap_fit(series, 400, 0, fit_entropy_law)  # seeded
    assert bootstrap_fit(series[:1], 400, 0, fit_entropy_law) is None  # one run: no interval over runs


def test_study_law_groups_residuals_and_exclusion(tmp_path):
    # `all` and `top` scatter about the law (seed 0 above, seed 1 below by as much); `bottom` sits 0.1
    # above it on a different entropy range.
    high_h = np.linspace(1.6, 2.0, 40)
    study = write_sweep(
        tmp_path / "study",
        {
            "selection.strategy=all": lambda s: _law_records(A, B, 0.01 * (1 - 2 * s)),
            "selection.strategy=top,selection.ratio=0.2": lambda s: _law_records(A, B, 0.02 * (1 - 2 * s)),
            "selection.strategy=bottom,selection.ratio=0.8": lambda s: _law_records(A, B, 0.1, h=high_h + 0.001 * s),
        },
    )
    summary = run_law([study], tmp_path / "out", exclude=["bottom ρ=0.8"], bootstrap=50)
    pooled = summary["pooled"]
    assert (
        pooled["runs"] == 4
        and pooled["a"] == pytest.approx(A, abs=1e-9)
        and pooled["ceiling"] == pytest.approx(B - A, abs=1e-9)
    )
    assert pooled["bootstrap"]["a"]["low"] <= A <= pooled["bootstrap"]["a"]["high"]
    rows = {row["group"]: row for row in summary["groups"]}
    assert set(rows) == {"all", "top ρ=0.2", "bottom ρ=0.8"}
    bottom = rows["bottom ρ=0.8"]
    assert bottom["excluded"] and bottom["departs"] and bottom["mean_residual"]["mean"] == pytest.approx(0.1, abs=1e-9)
    assert rows["all"]["per_run_mean_residual"] == pytest.approx([0.01, -0.01], abs=1e-9)
    assert rows["all"]["mean_residual"]["mean"] == pytest.approx(0.0, abs=1e-9) and not rows["all"]["departs"]
    assert [run["group"] for run in summary["runs"]].count("top ρ=0.2") == 2
    md = (tmp_path / "out" / "law.md").read_text()
    assert "Pooled over 4 run(s) (bottom ρ=0.8 left out of the fit), 160 steps" in md
    assert "| bottom ρ=0.8 | 2 |" in md and "yes (left out of the fit)" in md
    # Fitted with bottom in, the pooled curve moves and the bottom runs pull it.
    summary = run_law([study], tmp_path / "out_all", bootstrap=0)
    assert summary["pooled"]["runs"] == 6 and summary["pooled"]["bootstrap"] is None
    assert abs(summary["pooled"]["b"] - B) > 1e-3
    with pytest.raises(
        RunError, match=r"--exclude 'middle': no such group; the groups are 'all', 'bottom ρ=0.8', 'top ρ=0.2'"
    ):
        run_law([study], tmp_path / "out_bad", exclude=["middle"])


def test_holdout_carries_the_recent_mean_forward_as_its_baseline():
    # One run: performance 0.1·step for steps 1..10, fit on the first half. Carried forward: the
    # mean of steps 1..5 is 0.3, so the held-out errors are 0.3, 0.4, ..., 0.7 and the RMSE is
    # √(mean of their squares).
    steps = np.arange(1, 11)
    h = np.log(2.0 - 0.1 * steps)  # e^H = 2 − 0.1·step: R = −a·e^H + b exactly with a = 1, b = 2
    hold = holdout_error([(h, 0.1 * steps)], 0.5)
    assert hold.rmse == pytest.approx(0.0, abs=1e-9)
    assert hold.carry_forward_rmse == pytest.approx(math.sqrt(np.mean([0.3**2, 0.4**2, 0.5**2, 0.6**2, 0.7**2])))
