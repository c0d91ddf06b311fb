"""The report's plots: matplotlib PNGs (base64) from a :class:`Run`'s metrics. Matplotlib is imported
only when a plot is drawn."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

from .runs import Run, _num, series, smooth

# Colours shared by every plot (matplotlib's tab10): chosen is green, rejected red, as in the paper.
C_CHOSEN, C_REJECTED, C_MAIN, C_EVAL, C_OTHER = "#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd"

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
    """Held-out evaluations as the separate points they are (no line joins them: two evaluations are not
    a trend), each with its bootstrap 95% interval when the row has ``<key>_ci``. ``dashed`` is kept
    for callers; the points look the same either way."""
    xs, ys, lo, hi = [], [], [], []
    for r in rows:
        x, y = _num(r.get("step")), _num(r.get(key))
        if x is None or y is None or not math.isfinite(y):
            continue
        ci = r.get(key + "_ci")
        ok = isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci)
        xs.append(x)
        ys.append(y)
        lo.append(y - ci[0] if ok else 0.0)
        hi.append(ci[1] - y if ok else 0.0)
    if not xs:
        return False
    with_ci = any(lo) or any(hi)
    ax.errorbar(xs, ys, yerr=[lo, hi] if with_ci else None, color=color, linestyle="none", marker="o", markersize=4.5,
                capsize=3, elinewidth=1.0, label=f"{label} (held-out{', 95% CI' if with_ci else ''})")
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
        else:  # 2e-4 reads as "2" with "1e-4" on the axis, never as 0.000200
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
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
        gap_rows = [{"step": r.get("step"), "gap": r["eval_logps/chosen"] - r["eval_logps/rejected"],
                     "gap_ci": r.get("eval_logp_margin_ci")} for r in ev
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
