"""How wide is the paired ORPO - SFT interval, against held-out pairs and steps? From two finished run
folders of ``orpo compare`` (their ``eval_pairs.jsonl``), no training.

    python benchmarks/fig3_width.py runs/compare/sft runs/compare/orpo

Prints, for the chosen - rejected gap (per-token log p): the paired difference and its bootstrap 95%
interval at every evaluation both runs made (width against steps); at the last one, the interval on
the first n held-out pairs for growing n (width against pairs, about 1/sqrt(n)); and the number of
pairs at which the measured mean difference would equal the interval's half-width 1.96 sd / sqrt(n),
n* = (1.96 sd / |mean|)^2 -- an extrapolation from the measured spread, not a measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from orpo.report.runs import read_pair_values  # noqa: E402
from orpo.stats import paired_difference  # noqa: E402


def gaps(row: dict) -> dict[str, float]:
    return {w: c - r for w, c, r in zip(row["where"], row["logps/chosen"], row["logps/rejected"])}


def main(sft: str, orpo: str) -> None:
    a, b = read_pair_values(Path(sft) / "eval_pairs.jsonl"), read_pair_values(Path(orpo) / "eval_pairs.jsonl")
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("no evaluation step in common (need eval_pairs.jsonl in both runs)")
    print("gap = mean log p chosen - mean log p rejected per pair; ORPO - SFT, paired over the same held-out pairs")
    print(f"{'step':>6}{'pairs':>7}{'diff':>10}{'95% CI':>22}{'width':>9}")
    for s in steps:
        ga, gb = gaps(a[s]), gaps(b[s])
        common = [w for w in ga if w in gb]
        p = paired_difference([gb[w] for w in common], [ga[w] for w in common])
        print(f"{s:>6}{p['n']:>7}{p['diff']:>+10.4f}   [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]{p['ci'][1] - p['ci'][0]:>9.4f}")
    s = steps[-1]
    ga, gb = gaps(a[s]), gaps(b[s])
    common = [w for w in ga if w in gb]
    d = np.array([gb[w] - ga[w] for w in common])
    print(f"\nat step {s}, on the first n held-out pairs:")
    print(f"{'n':>6}{'diff':>10}{'95% CI':>22}{'width':>9}")
    sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024) if n < len(d)] + [len(d)]
    for n in sizes:
        p = paired_difference(d[:n], np.zeros(n))
        print(f"{n:>6}{p['diff']:>+10.4f}   [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]{p['ci'][1] - p['ci'][0]:>9.4f}")
    sd, mean = d.std(ddof=1), d.mean()
    need = (1.96 * sd / abs(mean)) ** 2 if mean else float("inf")
    print(f"\nper-pair sd of the difference {sd:.4f}, mean {mean:+.4f}: the half-width 1.96 sd / sqrt(n) equals "
          f"|mean| at n* = {need:,.0f} pairs (extrapolated, if the mean difference stayed where it is)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
