"""The training progress bar (main process only)."""

from __future__ import annotations


class Progress:
    """A rich progress bar with ETA and the step's accuracy, entropy, kept fraction and length on
    the main process; nothing elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.task = self.bar.add_task("", total=total, completed=start)
            self.bar.start()

    def advance(self, step: int, m: dict[str, float]) -> None:
        if self.bar is None:
            return
        desc = (
            f"acc {m.get('accuracy', float('nan')):.3f}  ent {m.get('entropy', float('nan')):.3f}  "
            f"kept {m.get('kept_frac', float('nan')):.2f}  len {m.get('response_length', float('nan')):.0f}"
        )
        self.bar.update(self.task, completed=step, description=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
