"""Acc@k / Len@k: the reported numbers equal a hand recomputation from the samples themselves;
seeding, the markdown table, reward failures, atomic report files and the CLI entry point."""

import json
import math
import statistics

import pytest

from forkrl.eval import EvalReport, evaluate_model, run_eval_command, write_eval_report
from forkrl.models import load_policy, save_tiny_model_dir
from forkrl.rollout import HFGenerationBackend

K = 4
MAX_NEW_TOKENS = 8
BATCH_SIZE = 6  # not a multiple of K: chunks split a question's samples, which must be regrouped

ALPHA = [("1+1=", "2"), ("2*3=", "6"), ("7-5=", "2")]
BETA = [("9/3=", "3"), ("4+4=", "8"), ("x=1; x+1=", "2"), ("10-1=", "9")]


def alnum_reward(completion, example) -> float:
    """-0.5, 0.5 or 1.5 depending on how many letters/digits the completion has: after clipping
    to [0, 1] that is accuracy 0, 0.5 or 1, so clipping and partial credit are both exercised."""
    return float(sum(c.isalnum() for c in completion) % 3) - 0.5


def boom_reward(completion, example) -> float:
    if example.answer == "boom":
        raise RuntimeError("reward failure on purpose")
    return 1.0


def clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


class RecordingBackend:
    """Wraps a backend and keeps every (prompts, rollout) it produced."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def generate(self, prompts, params):
        rollout = self.inner.generate(prompts, params)
        self.calls.append((list(prompts), rollout))
        return rollout

    def update_weights(self, model):
        self.inner.update_weights(model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny_model_dir(root / "model", seed=0)
    files = [write_jsonl(root / "alpha.jsonl", ALPHA), write_jsonl(root / "beta.jsonl", BETA)]
    return model_dir, files


@pytest.fixture(scope="module")
def policy(workdir):
    return load_policy(workdir[0], dtype="float32", device="cpu")


def make_backend(policy):
    model, tok = policy
    # Digits also end a response, so lengths vary instead of all hitting MAX_NEW_TOKENS.
    stops = [tok.eos_token_id, *tok.convert_tokens_to_ids(list("0123456789"))]
    return RecordingBackend(HFGenerationBackend(model, tok, batch_size=BATCH_SIZE, eos_token_ids=stops))


def run_eval(policy, files, seed=0, backend=None, reward_fn=alnum_reward):
    model, tok = policy
    return evaluate_model(
        model,
        tok,
        files,
        k=K,
        max_new_tokens=MAX_NEW_TOKENS,
        reward_fn=reward_fn,
        batch_size=BATCH_SIZE,
        seed=seed,
        backend=backend or make_backend(policy),
        keep_completions=True,
    )


@pytest.fixture(scope="module")
def recorded(policy, workdir):
    backend = make_backend(policy)
    return run_eval(policy, workdir[1], backend=backend), backend


def test_acc_and_len_equal_hand_computation(recorded, policy):
    report, backend = recorded
    _, tok = policy
    assert [r.name for r in report.results] == ["alpha", "beta"]
    # Every generate call saw at most BATCH_SIZE prompts; concatenated, they are each file's
    # prompts repeated K times in a row (question-major), first alpha then beta.
    assert all(len(prompts) <= BATCH_SIZE for prompts, _ in backend.calls)
    all_prompts = [p for prompts, _ in backend.calls for p in prompts]
    all_lengths = [n for _, r in backend.calls for n in r.response_mask.sum(-1).tolist()]
    all_texts = [
        tok.decode(row[mask.bool()], skip_special_tokens=True)
        for _, r in backend.calls
        for row, mask in zip(r.response_ids, r.response_mask)
    ]
    all_finished = [f for _, r in backend.calls for f in r.finished.tolist()]
    offset = 0
    for result, rows in zip(report.results, (ALPHA, BETA)):
        n = len(rows) * K
        prompts, lengths, texts, finished = (
            x[offset : offset + n] for x in (all_prompts, all_lengths, all_texts, all_finished)
        )
        offset += n
        for i, (question, _) in enumerate(rows):
            group = prompts[i * K : (i + 1) * K]
            assert len(set(group)) == 1 and f"\n{question}\n" in group[0]
        assert result.num_questions == len(rows) and result.k == K

        # The details carry exactly the sampled texts and mask lengths, grouped per question.
        assert [c for q in result.questions for c in q.completions] == texts
        assert [n for q in result.questions for n in q.lengths] == lengths

        # Acc@k by hand: reward of each decoded completion, clipped, averaged, in percent.
        acc = [clip01(alnum_reward(t, None)) for t in texts]
        assert result.acc_at_k == pytest.approx(100 * sum(acc) / n)
        # Len@k: mean of response_mask lengths (EOS counted).
        assert result.len_at_k == pytest.approx(sum(lengths) / n)
        per_question = [sum(acc[i : i + K]) / K for i in range(0, n, K)]
        assert [q.accuracy for q in result.questions] == pytest.approx(per_question)
        expected_se = 100 * statistics.stdev(per_question) / math.sqrt(len(rows))
        assert result.std_err == pytest.approx(expected_se)
        expected_pass = 100 * sum(max(acc[i : i + K]) == 1.0 for i in range(0, n, K)) / len(rows)
        assert result.pass_at_k == pytest.approx(expected_pass)
        assert result.num_reward_errors == 0
        assert result.num_truncated == finished.count(False)
        assert [f for q in result.questions for f in q.finished] == finished
    # The check is only meaningful if the samples differ in score and length.
    all_acc = {a for r in report.results for q in r.questions for a in q.accuracies}
    assert len(all_acc) > 1 and len(set(all_lengths)) > 1


def test_same_seed_same_report_other_seed_differs(recorded, policy, workdir):
    report, _ = recorded
    again = run_eval(policy, workdir[1], seed=0)
    assert again.to_json(include_details=True) == report.to_json(include_details=True)
    other = run_eval(policy, workdir[1], seed=1)
    texts = lambda rep: [c for r in rep.results for q in r.questions for c in q.completions]  # noqa: E731
    assert texts(other) != texts(report)


def test_file_result_independent_of_other_files(recorded, policy, workdir):
    report, _ = recorded
    beta_alone = run_eval(policy, workdir[1][1:])
    assert beta_alone.results[0].summary() == report.results[1].summary()


def test_markdown_table_has_file_rows_and_average(recorded):
    report, _ = recorded
    lines = report.to_markdown().strip().splitlines()
    assert lines[0] == f"| benchmark | Acc@{K} | Len@{K} | questions |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["alpha", "beta", "average"]
    alpha, beta = report.results
    avg = report.average()
    assert avg["acc_at_k"] == pytest.approx((alpha.acc_at_k + beta.acc_at_k) / 2)
    assert avg["len_at_k"] == pytest.approx((alpha.len_at_k + beta.len_at_k) / 2)
    assert avg["num_questions"] == len(ALPHA) + len(BETA)
    cells = [c.strip() for c in lines[-1].split("|")[1:-1]]
    assert cells[0] == "average" and cells[3] == str(len(ALPHA) + len(BETA))
    assert cells[1].startswith(f"{avg['acc_at_k']:.2f} ± ") and cells[2] == f"{avg['len_at_k']:.1f}"

    single = EvalReport(results=[alpha], config=report.config)
    assert single.average() is None and "average" not in single.to_markdown()
    assert len(single.to_markdown().strip().splitlines()) == 3


def test_reward_failures_score_zero_and_are_counted(policy, tmp_path):
    source = write_jsonl(tmp_path / "mixed.jsonl", [("1+1=", "2"), ("2+2=", "boom"), ("3+3=", "6")])
    report = run_eval(policy, [source], reward_fn=boom_reward)
    result = report.results[0]
    assert result.num_reward_errors == K  # every sample of the "boom" question
    assert [q.accuracy for q in result.questions] == [1.0, 0.0, 1.0]
    assert result.acc_at_k == pytest.approx(100 * 2 / 3)
    assert result.pass_at_k == pytest.approx(100 * 2 / 3)


def test_write_eval_report_is_atomic(recorded, tmp_path, monkeypatch):
    report, _ = recorded
    out = write_eval_report(report, tmp_path / "out")
    data = json.loads((out / "eval.json").read_text())
    assert data["results"][0]["acc_at_k"] == report.results[0].acc_at_k
    assert len(data["results"][1]["questions"]) == len(BETA)
    assert data["average"]["num_questions"] == len(ALPHA) + len(BETA)
    assert (out / "eval.md").read_text() == report.to_markdown()
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]

    # A failure before the rename keeps the previous report and leaves no temporary file.
    before = (out / "eval.json").read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("forkrl.eval.accuracy.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_eval_report(EvalReport(results=report.results[:1]), out)
    assert (out / "eval.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md"]


def test_run_eval_command_prints_and_writes(workdir, tmp_path, capsys):
    model_dir, files = workdir
    report = run_eval_command(
        model=str(model_dir),
        data=files,
        k=2,
        max_new_tokens=4,
        out=str(tmp_path / "out"),
        reward=f"{__file__}:alnum_reward",
        batch_size=4,
        limit=2,
        dtype="float32",
        device="cpu",
    )
    printed = capsys.readouterr().out
    assert report.to_markdown() in printed
    assert [r.num_questions for r in report.results] == [2, 2]
    assert all(r.len_at_k <= 4 for r in report.results)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["config"]["model"] == str(model_dir) and saved["config"]["k"] == 2


def test_rejects_bad_arguments(policy, workdir):
    model, tok = policy
    with pytest.raises(ValueError, match="k >= 1"):
        evaluate_model(model, tok, workdir[1], k=0)
    with pytest.raises(ValueError, match="no benchmark files"):
        evaluate_model(model, tok, [])


def test_run_config_evaluation_scores_with_eval_reward(monkeypatch):
    import forkrl.eval.accuracy as acc
    from forkrl.config import load_config

    seen = []
    monkeypatch.setattr(acc, "evaluate_model", lambda *a, **kw: seen.append(kw))
    cfg = load_config(None, ["reward.function=forecast_winrate", "reward.kwargs.bins=20"], check_files=False)
    acc.evaluate_with_run_config(None, None, cfg)
    assert (seen[-1]["reward_fn"], seen[-1]["reward_kwargs"]) == ("forecast_winrate", {"bins": 20})
    cfg.trainer.eval_reward = "forecast_truth"  # scores instead, without the training reward's options
    acc.evaluate_with_run_config(None, None, cfg)
    assert (seen[-1]["reward_fn"], seen[-1]["reward_kwargs"]) == ("forecast_truth", None)
