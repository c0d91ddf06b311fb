"""Progress display: a live bar in a terminal or a Jupyter notebook, one plain line per logged step
otherwise (CI, files, a notebook without ipywidgets, which rich needs to draw a live bar there)."""

from __future__ import annotations

import importlib.util
import sys
import time


def in_notebook() -> bool:
    """A Jupyter kernel (rich asks IPython), not a terminal IPython."""
    try:
        from rich.console import _is_jupyter
    except ImportError:  # pragma: no cover - rich is a dependency
        return False
    return _is_jupyter()


def live_display(stream) -> bool:
    if getattr(stream, "isatty", lambda: False)():
        return True
    return in_notebook() and importlib.util.find_spec("ipywidgets") is not None


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def describe(row: dict) -> str:
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("nll_loss", "nll", "{:.4f}"),
        ("rewards/margins", "margin", "{:.4f}"),
        ("rewards/accuracies", "acc", "{:.2f}"),
        ("tokens_per_s", "tok/s", "{:.0f}"),
        ("learning_rate", "lr", "{:.2e}"),
    ):
        if key in row and row[key] is not None:
            parts.append(f"{label} {fmt.format(row[key])}")
    if row.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.live = enabled and live_display(self.stream)
        self._bar = None
        self._task = None
        self._t0 = time.time()

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                refresh_per_second=4,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        info = describe(row)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        done = step - self.start
        rate = done / max(time.time() - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"step {step}/{self.total} | {info} | eta {_fmt_eta(eta)}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)
