"""The Figure 3 comparison: held-out log-probs of an SFT run and an ORPO run on one figure, from
their run folders only (no torch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..report.plots import C_CHOSEN, C_EVAL, C_MAIN, C_OTHER, C_REJECTED, _plt
from ..report.runs import _num, read_metrics, series
from .pairs import paired_gap_trajectory, trajectories


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
    """The comparison figure. With per-pair values (``eval_pairs.jsonl``) in every run, one row of panels
    per kind of pair (all, then each kind of rejected answer), drawn with 95% intervals; otherwise
    the single row of :func:`plot_compare_means`."""
    traj = {label: trajectories(folder) for label, folder in runs.items()}
    if traj and all(traj.values()):
        paired = paired_gap_trajectory(*list(runs.values())[:2]) if len(runs) == 2 else {}
        return _plot_kinds(traj, paired, dest, title)
    return plot_compare_means(runs, dest, title)


def _errorbar(ax, xs, ys, cis, color, label, offset=0.0):
    lo = [y - c[0] if c else 0.0 for y, c in zip(ys, cis)]
    hi = [c[1] - y if c else 0.0 for y, c in zip(ys, cis)]
    ax.errorbar([x + offset for x in xs], ys, yerr=[lo, hi], color=color, marker="o", markersize=3.5, linewidth=0.9,
                capsize=2.5, label=label)


def _plot_kinds(traj: dict[str, dict], paired: dict[str, dict], dest: str | Path, title: str | None) -> Path:
    """Rows: kinds of held-out pair; columns: each run's chosen (green) and rejected (red) mean log p at
    every evaluation with its 95% interval (a shared y-axis per row), then the paired difference
    ORPO - SFT of the chosen - rejected gap on the same pairs (or, without two runs, each run's gap).
    Points are evaluations; the thin lines only join them."""
    plt = _plt()
    kinds = [k for k in next(iter(traj.values())) if all(k in t for t in traj.values())]
    n = len(traj)
    fig, axes = plt.subplots(len(kinds), n + 1, figsize=(4.4 * (n + 1), 3.3 * len(kinds)), squeeze=False)
    colors = [C_MAIN, C_EVAL, C_OTHER, "#8c564b", "#e377c2"]
    try:
        for row, kind in zip(axes, kinds):
            lows, highs = [], []
            for ax, (label, t) in zip(row[:n], traj.items()):
                d = t[kind]
                for key, color, name in (("logps/chosen", C_CHOSEN, "chosen"), ("logps/rejected", C_REJECTED, "rejected")):
                    _errorbar(ax, d["step"], d[key], d[key + "_ci"], color, name)
                    lows += [c[0] for c in d[key + "_ci"] if c]
                    highs += [c[1] for c in d[key + "_ci"] if c]
                ax.set_title(f"{label}: {kind} ({d['pairs']})", fontsize=10)
                ax.set_xlabel("optimizer step")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8, loc="best")
            row[0].set_ylabel("held-out mean log p per token")
            if lows and highs:
                pad = 0.05 * (max(highs) - min(lows) or 1.0)
                for ax in row[:n]:
                    ax.set_ylim(min(lows) - pad, max(highs) + pad)
            gap = row[n]
            if kind in paired:
                d = paired[kind]
                labels = list(traj)
                _errorbar(gap, d["step"], d["diff"], d["ci"], C_MAIN, f"{labels[1]} − {labels[0]}")
                gap.set_title(f"paired gap difference: {kind}", fontsize=10)
                gap.set_ylabel("Δ (log p chosen − log p rejected)")
            else:
                for i, ((label, t), color) in enumerate(zip(traj.items(), colors)):
                    d = t[kind]
                    _errorbar(gap, d["step"], d["gap"], d["gap_ci"], color, label, offset=0.15 * i)
                gap.set_title(f"gap chosen − rejected: {kind}", fontsize=10)
                gap.set_ylabel("log p chosen − log p rejected")
            gap.axhline(0, color="black", linewidth=0.6)
            gap.set_xlabel("optimizer step")
            gap.grid(True, alpha=0.3)
            gap.legend(fontsize=8, loc="best")
        return _save(fig, dest, title and title + " (bars: bootstrap 95% intervals over pairs)")
    finally:
        plt.close(fig)


def plot_compare_means(runs: dict[str, str | Path], dest: str | Path, title: str | None = None) -> Path:
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
        return _save(fig, dest, title)
    finally:
        plt.close(fig)


def _save(fig, dest: str | Path, title: str | None) -> Path:
    """Title, layout and a PNG at ``dest`` (its folder made if needed)."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=100)
    return dest
