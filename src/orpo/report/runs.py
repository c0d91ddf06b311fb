"""Reading a run folder for the report: ``metrics.jsonl`` (train and eval rows), ``config.yaml``,
``data_counts.json``, ``summary.json``, ``samples.jsonl`` and ``eval_pairs.jsonl``, each optional and
each robust to a write in progress. Stdlib (and PyYAML) only."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

@dataclass
class Run:
    """Everything the report shows, read from an output folder; any part may be empty."""

    out: Path
    train: list[dict] = field(default_factory=list)  # rows without eval_ keys, in file order
    evals: list[dict] = field(default_factory=list)  # rows with eval_ keys
    bad_lines: int = 0  # lines that were not JSON objects (e.g. cut short by a write in progress)
    config: dict | None = None
    config_text: str | None = None
    data_counts: dict | None = None
    summary: dict | None = None
    samples: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.summary is not None


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict], int]:
    """(train rows, eval rows, unreadable lines) of a ``metrics.jsonl``. A resumed run may log a step
    twice; the later row wins, as it does in the training loop's own bookkeeping."""
    p = Path(path)
    if not p.is_file():
        return [], [], 0
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    extra_train: list[dict] = []
    bad = 0
    with open(p, "rb") as fh:
        data = fh.read()
    for raw in data.decode("utf-8", errors="replace").splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(row, dict):
            bad += 1
            continue
        step = row.get("step")
        is_eval = any(str(k).startswith("eval_") for k in row)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            if not is_eval:
                extra_train.append(row)
            continue
        (evals if is_eval else train)[int(step)] = row
    rows = sorted(train.values(), key=lambda r: r["step"]) + extra_train
    return rows, sorted(evals.values(), key=lambda r: r["step"]), bad


def read_json(path: Path):
    """The file's JSON value, or None when it is missing or unreadable (a run still being written)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_samples(path: Path) -> list[dict]:
    """The rows of a run's samples.jsonl (none if it is missing); a line cut short is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                rows.append(r)
    return rows


def load_run(out: str | Path) -> Run:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such run folder")
    train, evals, bad = read_metrics(out / "metrics.jsonl")
    run = Run(out, train, evals, bad)
    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        try:
            run.config_text = cfg_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            run.config_text = None
        if run.config_text is not None:
            try:
                import yaml

                parsed = yaml.safe_load(run.config_text)
                run.config = parsed if isinstance(parsed, dict) else None
            except Exception:  # a half-written file or no PyYAML: the raw text is shown instead
                run.config = None
    dc = read_json(out / "data_counts.json")
    run.data_counts = dc if isinstance(dc, dict) else None
    sm = read_json(out / "summary.json")
    run.summary = sm if isinstance(sm, dict) else None
    run.samples.extend(read_samples(out / "samples.jsonl"))
    return run


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def series(rows: list[dict], key: str, skip_flagged: bool = True) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over ``rows``; rows without it, and steps whose update was skipped
    for a non-finite loss, are left out. Non-finite values are left out too."""
    xs, ys = [], []
    for r in rows:
        if skip_flagged and r.get("skipped"):
            continue
        x, y = _num(r.get("step")), _num(r.get(key))
        if x is None or y is None or not math.isfinite(y):
            continue
        xs.append(x)
        ys.append(y)
    return xs, ys


def smooth(ys: list[float], n: int | None = None) -> list[float]:
    """Trailing moving average over about a tenth of the points (at least 1, at most 50)."""
    if not ys:
        return []
    n = n or max(1, min(50, len(ys) // 10))
    if n == 1:
        return list(ys)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def read_pair_values(path: str | Path) -> dict[int, dict]:
    """``OUT/eval_pairs.jsonl``: {step: row} with each held-out pair's own values at that evaluation
    (``where``, ``logps/chosen``, ``logps/rejected``, ...; see ``orpo.evaluate.write_pair_values``). A step
    written twice (a resumed run) keeps its later row; unreadable lines are skipped."""
    p = Path(path)
    out: dict[int, dict] = {}
    if not p.is_file():
        return out
    for raw in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("where"), list):
            out[row["step"]] = row
    return dict(sorted(out.items()))
