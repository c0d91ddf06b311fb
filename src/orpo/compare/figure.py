"""The Figure 3 comparison: held-out log-probs of an SFT run and an ORPO run on one figure, from
their run folders only (no torch)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..report.plots import C_CHOSEN, C_EVAL, C_MAIN, C_OTHER, C_REJECTED, _plt
from ..report.runs import _num, read_metrics, series

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
