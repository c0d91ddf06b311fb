"""``OUT/report.html``: what a run did, on one self-contained page.

Built only from the files a run writes (``metrics.jsonl``, ``config.yaml``, ``data_counts.json``,
``summary.json``, ``samples.jsonl``), so ``orpo report OUT`` can rebuild it at any time, also while the
run is still going: a line cut short by a write in progress is ignored, and any missing file or metric
only removes its own plot or table. The plots are matplotlib PNGs embedded as base64 data URIs and the
style is inline: the page needs no network, no CDN and no JavaScript.

This module imports nothing from torch or the rest of orpo, so it is cheap to run beside a training job.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .diskio import WRITE_FAULTS
from .errors import UserError

REPORT_NAME = "report.html"

# Colours shared by every plot (matplotlib's tab10): chosen is green, rejected red, as in the paper.
C_CHOSEN, C_REJECTED, C_MAIN, C_EVAL, C_OTHER = "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd"


# ------------------------------------------------------------------------------------------------
# Reading a run.


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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    dc = _read_json(out / "data_counts.json")
    run.data_counts = dc if isinstance(dc, dict) else None
    sm = _read_json(out / "summary.json")
    run.summary = sm if isinstance(sm, dict) else None
    sp = out / "samples.jsonl"
    if sp.is_file():
        for line in sp.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                run.samples.append(r)
    return run


# ------------------------------------------------------------------------------------------------
# Plots.


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


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _train_line(ax, rows, key, label, color, raw=True) -> bool:
    xs, ys = series(rows, key)
    if not xs:
        return False
    sm = smooth(ys)
    if raw and len(xs) > 1 and sm != ys:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, sm, color=color, linewidth=1.6, label=f"{label} (train, smoothed)")
    else:
        ax.plot(xs, ys, color=color, linewidth=1.6, marker="." if len(xs) < 30 else None, label=f"{label} (train)")
    return True


def _eval_line(ax, rows, key, label, color, dashed=True) -> bool:
    xs, ys = series(rows, key)
    if not xs:
        return False
    ax.plot(xs, ys, color=color, linestyle="--" if dashed else "-", marker="o", markersize=4, linewidth=1.3,
            label=f"{label} (held-out)")
    return True


LEGEND_DONE = object()  # returned by a draw function that placed its own legend


@dataclass
class Plot:
    title: str
    png: str  # base64
    caption: str = ""


def _figure(title: str, draw, caption: str = "", ylabel: str = "", logy: bool = False) -> Plot | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    try:
        drew = draw(ax)
        if not drew:
            return None
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer step")
        if ylabel:
            ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if drew is not LEGEND_DONE and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5, loc="best")
        return Plot(title, _png(fig), caption)
    finally:
        plt.close(fig)


def make_plots(run: Run) -> list[Plot]:
    """The report's plots, in page order; a plot with nothing to draw is left out."""
    tr, ev = run.train, run.evals
    specs = []

    def two(ax, *series):
        """Each (metric, label, colour) as a training line and, with eval_ in front, as eval markers."""
        drawn = [_train_line(ax, tr, key, label, colour) for key, label, colour in series]
        drawn += [_eval_line(ax, ev, "eval_" + key, label, colour) for key, label, colour in series]
        return any(drawn)

    def loss(ax):
        return two(ax, ("loss", "loss", C_MAIN), ("nll_loss", "NLL", C_OTHER))

    specs.append(("Loss and NLL", loss, "L = NLL + beta * L_OR; lines are training steps, markers held-out evaluations.", "loss"))

    def logps(ax):
        return two(ax, ("logps/chosen", "chosen", C_CHOSEN), ("logps/rejected", "rejected", C_REJECTED))

    specs.append((
        "Log-probabilities of chosen and rejected answers",
        logps,
        "Mean per-token log-probability of each completion (the picture of the ORPO paper's Figure 3). "
        "Under plain SFT the rejected answers' log-probability rises with the chosen ones; the odds-ratio "
        "term should hold it down and open a gap.",
        "mean log p per token",
    ))

    def margins(ax):
        drawn = two(ax, ("rewards/margins", "reward margin", C_MAIN), ("log_odds_chosen", "log-odds ratio", C_OTHER))
        if drawn:
            ax.axhline(0, color="black", linewidth=0.6)
        return drawn

    specs.append(("Margins", margins, "rewards/margins = beta * (logps chosen - logps rejected); log_odds_chosen is the "
                  "mean log-odds ratio the odds-ratio term acts on.", ""))

    def accuracy(ax):
        a = _train_line(ax, tr, "rewards/accuracies", "accuracy", C_MAIN)
        b = _eval_line(ax, ev, "eval_rewards/accuracies", "accuracy", C_EVAL)
        if a or b:
            ax.set_ylim(-0.03, 1.03)
            ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
        return a or b

    specs.append(("Preference accuracy", accuracy, "Share of pairs whose chosen answer has the higher log-odds.", "share"))

    def lr(ax):
        return _train_line(ax, tr, "learning_rate", "learning rate", C_MAIN, raw=False)

    specs.append(("Learning rate", lr, "", "lr"))

    def speed(ax):
        return _train_line(ax, tr, "tokens_per_s", "tokens/s", C_MAIN)

    specs.append(("Throughput", speed, "Tokens of prompt+chosen plus prompt+rejected per second of training (the "
                  "conventional count, whatever the batching).", "tokens / s"))

    def grad(ax):
        return _train_line(ax, tr, "grad_norm", "gradient norm", C_OTHER)

    specs.append(("Gradient norm", grad, "Before clipping.", ""))

    def eval_only(ax):
        a = _eval_line(ax, ev, "eval_rewards/accuracies", "accuracy", C_MAIN, dashed=False)
        gap_rows = [{"step": r.get("step"), "gap": r["eval_logps/chosen"] - r["eval_logps/rejected"]} for r in ev
                    if _num(r.get("eval_logps/chosen")) is not None and _num(r.get("eval_logps/rejected")) is not None]
        ax2 = ax.twinx()
        b = _eval_line(ax2, gap_rows, "gap", "log p chosen − log p rejected", C_OTHER, dashed=False)
        if a:
            ax.set_ylabel("accuracy")
        if b:
            ax2.set_ylabel("log p chosen − log p rejected")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        if h1 or h2:
            ax.legend(h1 + h2, l1 + l2, fontsize=7.5, loc="best")
        return LEGEND_DONE if (a or b) else False

    plots = []
    for title, draw, caption, ylabel in specs:
        p = _figure(title, draw, caption, ylabel)
        if p is not None:
            plots.append(p)
    if len(ev) >= 1:
        p = _figure("Held-out evaluation", eval_only, "Accuracy and the gap between the mean per-token log-probabilities "
                    "of chosen and rejected answers on the held-out pairs, at each evaluation (independent of beta).")
        if p is not None:
            plots.append(p)
    return plots


# ------------------------------------------------------------------------------------------------
# HTML.

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.status{display:inline-block;padding:2px 8px;border-radius:4px;font-size:.85em;font-weight:600}
.done{background:#e3f4e3;color:#1b5e20} .running{background:#fff3cd;color:#7a5a00}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:8px;background:#fff}
figure img{width:100%;height:auto;display:block} figcaption{font-size:.8em;color:#555;margin-top:4px}
table{border-collapse:collapse;font-size:.85em;margin:6px 0} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;
vertical-align:top} th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.samples td{max-width:420px;white-space:pre-wrap;word-break:break-word} .ok{color:#1b5e20;font-weight:600}
.bad{color:#b71c1c;font-weight:600} .muted{color:#777;font-size:.85em}
.cols{display:flex;flex-wrap:wrap;gap:28px} pre{background:#f7f7f7;padding:8px;font-size:.8em;overflow:auto}
"""

TABLE_KEYS = (
    ("loss", "loss"), ("nll_loss", "NLL"), ("log_odds_ratio", "log σ(log-odds ratio)"), ("log_odds_chosen", "log-odds ratio"),
    ("logps/chosen", "logps chosen"), ("logps/rejected", "logps rejected"), ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "accuracy"),
)


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return _e(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:.1f}"
    return _e(v)


def _table(header: list[str] | None, rows: list[list], cls: str = "", raw_html: bool = False) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for r in rows:
        cells = []
        for c in r:
            if raw_html and isinstance(c, tuple):  # (html, css class) already escaped
                cells.append(f"<td class='{c[1]}'>{c[0]}</td>")
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f"<td class='num'>{_fmt(c)}</td>")
            else:
                cells.append(f"<td>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'>{head}{''.join(body)}</table>"


def _duration(s) -> str:
    s = _num(s)
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _status(run: Run) -> str:
    last = run.train[-1]["step"] if run.train and "step" in run.train[-1] else 0
    total = (run.config or {}).get("max_steps")
    if run.finished:
        return f"<span class='status done'>finished: {_e(run.summary.get('steps', last))} steps</span>"
    of = f" of {total}" if total else ""
    return f"<span class='status running'>in progress (or stopped): step {last}{of} logged so far</span>"


def _timings(run: Run) -> str:
    rows = []
    tr = run.train
    t_last = next((r.get("time_s") for r in reversed(tr) if _num(r.get("time_s")) is not None), None)
    if run.summary and _num(run.summary.get("time_s")) is not None:
        rows.append(["training time", _duration(run.summary["time_s"])])
    elif t_last is not None:
        rows.append(["training time so far", _duration(t_last)])
    steps = [r for r in tr if _num(r.get("step")) is not None]
    if steps and t_last:
        rows.append(["seconds per step", round(float(t_last) / max(1, int(steps[-1]["step"])), 2)])
    _, tps = series(tr, "tokens_per_s")
    if tps:
        rows.append(["tokens/s (median of logged steps)", sorted(tps)[len(tps) // 2]])
    toks = sum(int(r.get("pair_tokens", 0) or 0) for r in tr if isinstance(r.get("pair_tokens"), (int, float)))
    if toks:
        rows.append(["tokens trained on (prompt+chosen plus prompt+rejected)", toks])
    n_skipped = sum(1 for r in tr if r.get("skipped"))
    if n_skipped:
        rows.append(["steps skipped (non-finite loss or gradient)", n_skipped])
    if run.evals:
        rows.append(["evaluations", len(run.evals)])
    try:
        mtime = (run.out / "metrics.jsonl").stat().st_mtime
        rows.append(["metrics.jsonl last written", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime))])
    except OSError:
        pass
    return _table(None, rows) if rows else "<p class='muted'>no timings yet</p>"


def _data_counts(run: Run) -> str:
    dc = run.data_counts
    if not dc:
        return "<p class='muted'>no data_counts.json</p>"
    cols = [k for k in ("train", "eval") if isinstance(dc.get(k), dict)] or [k for k, v in dc.items() if isinstance(v, dict)]
    names = [("rows_read", "rows read"), ("kept", "pairs kept"), ("prompt_truncated", "prompts truncated"),
             ("completion_truncated", "completions truncated"), ("skipped", "dropped")]
    rows = [[label] + [dc[c].get(key, "") for c in cols] for key, label in names]
    reasons = sorted({r for c in cols for r in (dc[c].get("skipped_by_reason") or {})})
    for reason in reasons:
        rows.append([f"  dropped: {reason}"] + [(dc[c].get("skipped_by_reason") or {}).get(reason, 0) for c in cols])
    return _table([""] + cols, rows)


def _final_metrics(run: Run) -> str:
    first_eval = run.evals[0] if run.evals else {}
    last_eval = run.evals[-1] if run.evals else {}
    last_train = next((r for r in reversed(run.train) if not r.get("skipped") and "loss" in r), {})
    if not (first_eval or last_train):
        return "<p class='muted'>no metrics yet</p>"
    header = ["metric"]
    if first_eval:
        header += [f"held-out, step {first_eval.get('step')}", f"held-out, step {last_eval.get('step')}", "change"]
    if last_train:
        header += [f"train, step {last_train.get('step')}"]
    rows = []
    for key, label in TABLE_KEYS:
        row = [label]
        a, b = _num(first_eval.get("eval_" + key)), _num(last_eval.get("eval_" + key))
        if first_eval:
            row += [a if a is not None else "", b if b is not None else "",
                    (b - a) if a is not None and b is not None and len(run.evals) > 1 else ""]
        if last_train:
            v = _num(last_train.get(key))
            row.append(v if v is not None else "")
        if any(c != "" for c in row[1:]):
            rows.append(row)
    return _table(header, rows)


def _eval_table(run: Run) -> str:
    if not run.evals:
        return "<p class='muted'>no held-out evaluation (pass --eval-data, and --eval-steps for periodic ones)</p>"
    keys = [k for k, _ in TABLE_KEYS if any(("eval_" + k) in r for r in run.evals)]
    label = dict(TABLE_KEYS)
    rows = [[r.get("step")] + [_num(r.get("eval_" + k)) if _num(r.get("eval_" + k)) is not None else "" for k in keys]
            for r in run.evals]
    pairs = run.evals[-1].get("eval_pairs")
    note = f"<p class='muted'>{_e(pairs)} held-out pairs per evaluation</p>" if pairs is not None else ""
    return note + _table(["step"] + [label[k] for k in keys], rows)


def _config_table(run: Run) -> str:
    if run.config:
        items = [[k, "" if v is None else v] for k, v in run.config.items()]
        half = (len(items) + 1) // 2
        return f"<div class='cols'>{_table(['option', 'value'], items[:half])}{_table(['option', 'value'], items[half:])}</div>"
    if run.config_text:
        return f"<pre>{_e(run.config_text)}</pre>"
    return "<p class='muted'>no config.yaml</p>"


def _samples(run: Run) -> str:
    if not run.samples:
        msg = "no samples.jsonl yet (written at the end of a run)" if not run.finished else "no generations were saved"
        return f"<p class='muted'>{msg}</p>"
    has_expected = any("expected" in s for s in run.samples)
    header = ["#", "prompt"] + (["expected"] if has_expected else []) + ["base model (before)", "trained model (after)"]
    rows = []
    for i, s in enumerate(run.samples, 1):
        row: list = [(str(i), "num"), (_e(s.get("prompt")), "")]
        if has_expected:
            row.append((_e(s.get("expected", "")), ""))
        for side in ("before", "after"):
            text = _e(s.get(side)) if s.get(side) is not None else "<span class='muted'>(not generated)</span>"
            mark = s.get(f"correct_{side}")
            if mark is True:
                text = "<span class='ok'>✓</span> " + text
            elif mark is False:
                text = "<span class='bad'>✗</span> " + text
            row.append((text, ""))
        rows.append(row)
    extra = ""
    acc = (run.summary or {}).get("answer_accuracy")
    if isinstance(acc, list) and len(acc) == 2 and all(_num(a) is not None for a in acc):
        extra = f"<p>held-out questions answered exactly right: <b>{acc[0]:.0%}</b> before training, <b>{acc[1]:.0%}</b> after</p>"
    return extra + "<p class='muted'>Greedy answers on held-out prompts, before and after training.</p>" + _table(
        header, rows, cls="samples", raw_html=True)


def render_html(run: Run, plots: list[Plot] | None = None, plot_error: str | None = None) -> str:
    plots = make_plots(run) if plots is None else plots
    figs = "".join(
        f"<figure><img alt='{_e(p.title)}' src='data:image/png;base64,{p.png}'>"
        f"<figcaption><b>{_e(p.title)}.</b> {_e(p.caption)}</figcaption></figure>"
        for p in plots
    )
    if not figs:
        figs = "<p class='muted'>nothing to plot yet (metrics.jsonl has no rows)</p>"
    if plot_error:
        figs = f"<p class='bad'>plots could not be drawn: {_e(plot_error)}</p>" + figs
    warn = ""
    if run.bad_lines:
        warn = (f"<p class='muted'>{run.bad_lines} line(s) of metrics.jsonl could not be read "
                "(a line still being written, or a crash mid-write) and were left out.</p>")
    cfg = run.config or {}
    what = " · ".join(_e(x) for x in (
        f"model: {cfg.get('model') or 'default (SmolLM2-135M-Instruct)'}" if run.config else None,
        f"data: {cfg.get('data') or 'built-in'}" if run.config else None,
        f"beta {cfg.get('beta')}" if "beta" in cfg else None,
        ("LoRA" if cfg.get("lora") else "full fine-tuning") if run.config else None,
    ) if x)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>orpo report: {_e(run.out.name)}</title><style>{CSS}</style></head>
<body>
<h1>orpo run report: {_e(run.out.name)}</h1>
<p>{_status(run)} <span class="muted">{_e(run.out.resolve())} · report written {time.strftime('%Y-%m-%d %H:%M:%S')}</span></p>
<p class="muted">{what}</p>
{warn}
<h2>Metrics</h2>
{_final_metrics(run)}
<h2>Plots</h2>
<div class="plots">{figs}</div>
<h2>Held-out evaluations</h2>
{_eval_table(run)}
<h2>Generations</h2>
{_samples(run)}
<h2>Data</h2>
{_data_counts(run)}
<h2>Timings</h2>
{_timings(run)}
<h2>Config</h2>
{_config_table(run)}
</body></html>
"""


def write_report(out: str | Path, path: str | Path | None = None) -> Path:
    """Write ``OUT/report.html`` (or ``path``) from the run's files and return its path.

    The write is atomic (temporary file, then rename), so a browser never shows a half page. If
    matplotlib fails, the page is still written, with the tables and the error in place of the plots.
    """
    run = load_run(out)
    plot_error = None
    try:
        plots = make_plots(run)
    except Exception as e:  # a broken matplotlib install must not cost the tables
        plots, plot_error = [], f"{type(e).__name__}: {e}"
    text = render_html(run, plots, plot_error)
    dest = Path(path) if path is not None else Path(out) / REPORT_NAME
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep half a page
        raise
    return dest


# ------------------------------------------------------------------------------------------------
# The Figure 3 comparison: held-out log-probs of an SFT run and an ORPO run on one figure.


def compare_numbers(runs: dict[str, str | Path]) -> dict[str, dict]:
    """For each run: held-out logps chosen/rejected and margin at its first and last evaluation."""
    out = {}
    for label, folder in runs.items():
        _, ev, _ = read_metrics(Path(folder) / "metrics.jsonl")
        if not ev:
            continue
        first, last = ev[0], ev[-1]
        d = {"first_step": first.get("step"), "last_step": last.get("step"), "evals": len(ev),
             "pairs": last.get("eval_pairs")}
        for key in ("logps/chosen", "logps/rejected", "rewards/accuracies", "nll_loss", "log_odds_chosen"):
            a, b = _num(first.get("eval_" + key)), _num(last.get("eval_" + key))
            d[key] = {"first": a, "last": b, "change": (b - a) if a is not None and b is not None else None}
        c0, r0 = d["logps/chosen"]["first"], d["logps/rejected"]["first"]
        c1, r1 = d["logps/chosen"]["last"], d["logps/rejected"]["last"]
        if None not in (c0, r0, c1, r1):
            d["logp_margin"] = {"first": c0 - r0, "last": c1 - r1, "change": (c1 - r1) - (c0 - r0)}
        out[label] = d
    return out


def plot_compare(runs: dict[str, str | Path], dest: str | Path, title: str | None = None) -> Path:
    """One figure: a panel per run with held-out logps of chosen (green) and rejected (red) answers over
    steps on a shared y-axis, and a last panel with the chosen - rejected gap of every run."""
    plt = _plt()
    data = {label: read_metrics(Path(folder) / "metrics.jsonl")[1] for label, folder in runs.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        raise UserError("no held-out evaluations to compare (the runs need --eval-data)")
    n = len(data)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.4 * (n + 1), 3.7))
    colors = [C_MAIN, C_EVAL, C_OTHER, "#8c564b", "#e377c2"]
    try:
        for ax, (label, ev) in zip(axes[:n], data.items()):
            for key, color, name in (("eval_logps/chosen", C_CHOSEN, "chosen"), ("eval_logps/rejected", C_REJECTED, "rejected")):
                xs, ys = series(ev, key)
                ax.plot(xs, ys, color=color, marker="o", markersize=3.5, linewidth=1.5, label=name)
            ax.set_title(label, fontsize=11)
            ax.set_xlabel("optimizer step")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        axes[0].set_ylabel("held-out mean log p per token")
        lo = min(min(series(ev, k)[1] or [0]) for ev in data.values() for k in ("eval_logps/chosen", "eval_logps/rejected"))
        hi = max(max(series(ev, k)[1] or [0]) for ev in data.values() for k in ("eval_logps/chosen", "eval_logps/rejected"))
        pad = 0.05 * (hi - lo or 1.0)
        for ax in axes[:n]:
            ax.set_ylim(lo - pad, hi + pad)
        gap = axes[n]
        for (label, ev), color in zip(data.items(), colors):
            xs, c = series(ev, "eval_logps/chosen")
            xr, r = series(ev, "eval_logps/rejected")
            common = sorted(set(xs) & set(xr))
            cd, rd = dict(zip(xs, c)), dict(zip(xr, r))
            gap.plot(common, [cd[x] - rd[x] for x in common], color=color, marker="o", markersize=3.5, linewidth=1.5,
                     label=label)
        gap.axhline(0, color="black", linewidth=0.6)
        gap.set_title("gap: chosen − rejected", fontsize=11)
        gap.set_xlabel("optimizer step")
        gap.set_ylabel("log p chosen − log p rejected")
        gap.grid(True, alpha=0.3)
        gap.legend(fontsize=8, loc="best")
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(dest, dpi=100)
    finally:
        plt.close(fig)
    return dest


def write_report_safe(out: str | Path, say=print) -> Path | None:
    """``write_report`` for the end of a training run: any failure prints a warning and returns None,
    so a plotting problem never fails a run that has already succeeded."""
    try:
        path = write_report(out)
    except OSError as e:
        if e.errno in WRITE_FAULTS:  # a full or read-only disk stops the run (train says how to resume)
            raise
        say(f"warning: could not write {Path(out) / REPORT_NAME} ({e}); rebuild it with: orpo report {out}")
        return None
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
        say(f"warning: could not write {Path(out) / REPORT_NAME} ({type(e).__name__}: {e}); "
            f"rebuild it with: orpo report {out}")
        return None
    say(f"report: {path}")
    return path
