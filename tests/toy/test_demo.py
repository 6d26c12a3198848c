"""`forkrl demo` at CI size on the shipped toy base model, and the report's entropy-structure parsing."""

import json

from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.toy.demo import SHIPPED_MODEL, _classify_line_tokens


def test_shipped_base_model_is_a_plain_hf_directory():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "toy_build.json"):
        assert (SHIPPED_MODEL / name).is_file(), name
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert size <= 15 * 2**20


def test_classify_trace_tokens():
    # "7 * 3 = 21 [5 21]" then a failed check, "back", and the answer line (tokens as the toy tokenizer cuts them)
    line1 = ["7", "*", "3", "=", "21", " ", "[", "5", " ", "21", "]", "\n"]
    line2 = ["21", "*", "5", "=", "105", " ", "vs", " ", "22", " ", "no", "\n"]
    line3 = ["back", "\n", "answer:", " ", "(", "5", "*", "3", ")", "+", "7"]
    kinds = _classify_line_tokens(line1 + line2 + line3)
    assert kinds[:12] == ["choice"] * 3 + ["result", "result", "format", "format", "remaining", "format",
                          "remaining", "format", "format"]  # fmt: skip
    assert kinds[12:24] == ["choice"] * 3 + ["result", "result", "format", "check", "format", "check", "format",
                            "check", "format"]  # fmt: skip
    assert kinds[24:] == ["choice", "format", "choice", "format"] + ["answer"] * 7


def test_demo_two_steps(tmp_path):
    out = tmp_path / "demo"
    # An earlier demo in OUT (issue 13: its metrics used to be mixed into the new report).
    (out / "run").mkdir(parents=True)
    (out / "run" / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.5}\n')
    (out / "report.md").write_text("the earlier demo\n")
    result = CliRunner().invoke(app, ["demo", "--steps", "2", "--eval-problems", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (earlier,) = tmp_path.glob("demo.old-*")  # kept whole, beside the new one
    assert (earlier / "report.md").read_text() == "the earlier demo\n"
    assert (earlier / "run" / "metrics.jsonl").read_text() == '{"step": 1, "accuracy": 0.5}\n'
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and 0.0 <= report["after"]["acc_at_k"] <= 100.0
    assert 0.0 < report["before"]["share_entropy_below_0_1"] < 1.0
    assert abs(sum(report["before"]["top20_kinds"].values()) - 1.0) < 1e-9
    for name in ("accuracy.png", "entropy.png", "response_length.png", "entropy_histogram.png", "metrics.jsonl"):
        assert (out / "run" / name).stat().st_size > 0, name
    assert any((out / "run" / "tensorboard").iterdir())
    md = (out / "report.md").read_text()
    assert "![accuracy.png](run/accuracy.png)" in md and "entropy < 0.1" in md
