"""Evaluation over benchmark files: Acc@k and Len@k per file (paper 1, Table 2)."""

from forkrl.eval.accuracy import (
    EvalReport,
    FileResult,
    QuestionResult,
    evaluate_model,
    run_eval_command,
    write_eval_report,
)

__all__ = [
    "EvalReport",
    "FileResult",
    "QuestionResult",
    "evaluate_model",
    "run_eval_command",
    "write_eval_report",
]
