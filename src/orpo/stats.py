"""Bootstrap confidence intervals for held-out numbers. Imports only numpy.

A held-out metric is a mean over pairs, ``m = (1/n) \\sum_i x_i``, or for the NLL a ratio of sums,
``m = \\sum_i a_i / \\sum_i b_i`` (NLL summed over a pair's tokens over its token count: token-weighted).
The percentile bootstrap resamples the n pairs with replacement B times, recomputes m on each
resample, and reports the 2.5th and 97.5th percentiles of those B values as the 95% interval:

    m*_b = mean(x[I_b]),  I_b ~ Uniform({1..n})^n,   CI = [q_0.025(m*), q_0.975(m*)]

For two runs scored on the *same* pairs (``orpo compare``), the paired interval resamples the pair
indices once and takes both runs' means on the same resample, so the pair-to-pair spread that both
runs share (easy and hard questions) cancels: the interval of mean(x_orpo - x_sft).

The resampling uses a fixed seed, so the same numbers always give the same interval.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(stats: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> list[float] | None:
    """Percentile bootstrap interval ``[lo, hi]`` of the mean of ``values`` (n,); None for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    return _interval(x[_indices(x.size, resamples, seed)].mean(axis=1), level)


def bootstrap_ratio_ci(num, den, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> list[float] | None:
    """Interval of ``sum(num) / sum(den)`` resampling the (num_i, den_i) units together (a token-weighted mean)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.size < 2:
        return None
    idx = _indices(a.size, resamples, seed)
    return _interval(a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1e-12), level)


def paired_difference(a, b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """mean(a - b) over the same units, its bootstrap interval, and whether the interval excludes 0.

    ``a`` and ``b`` (n,) are one value per unit (held-out pair) from two runs, in the same order.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same units: {x.shape} vs {y.shape}")
    d = x - y
    ci = bootstrap_mean_ci(d, level, resamples, seed)
    return {"diff": float(d.mean()) if d.size else float("nan"), "ci": ci, "n": int(d.size),
            "distinguishable": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))}


def verdict(name: str, p: dict, unit: str = "", over: str = "pairs") -> str:
    """One sentence on a :func:`paired_difference`: the difference, its interval, and what it means."""
    if p.get("ci") is None:
        return f"{name}: {p['diff']:+.4f}{unit} (too few pairs for an interval)"
    lo, hi = p["ci"]
    where = ("distinguishable from zero: the whole 95% interval is above 0" if lo > 0 else
             "distinguishable from zero: the whole 95% interval is below 0" if hi < 0 else
             "not distinguishable from zero: the 95% interval contains 0")
    return f"{name}: {p['diff']:+.4f}{unit}, 95% CI [{lo:+.4f}, {hi:+.4f}] over {p['n']} {over}; {where}"
