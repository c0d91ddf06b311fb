"""Pair-level numbers of ``orpo compare``: per kind of rejected answer, and ORPO minus SFT on the same pairs.

Both runs evaluate the same held-out pairs, and each evaluation's per-pair values are in
``OUT/eval_pairs.jsonl``. Pairs are matched across runs by their source (``where``). For the built-in
data each pair's rejected answer is *chatty* (right content, wrong format) or *wrong* (right format,
wrong content); the two move differently under SFT, and one mean over both hides it.

For every evaluation and kind: the mean chosen and rejected log-prob with bootstrap 95% intervals.
At the last evaluation, the paired difference ORPO - SFT of the per-pair gap (chosen - rejected log p),
of the rejected and chosen log-probs and of the preference accuracy, each with its paired interval;
and of held-out content accuracy over the same questions (from ``samples.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.builtin import rejected_kind
from ..report.runs import read_json, read_pair_values, read_samples
from ..stats import bootstrap_mean_ci, paired_difference

ALL = "all pairs"


def _kinds(where: list[str]) -> dict[str, np.ndarray]:
    """{kind: boolean mask over the pairs}: every pair, then each kind of rejected answer if marked."""
    kinds = np.array([rejected_kind(w) or "" for w in where])
    out = {ALL: np.ones(len(where), dtype=bool)}
    for k in sorted(set(kinds) - {""}):
        out[f"{k} rejected"] = kinds == k
    return out


def trajectories(folder: str | Path) -> dict[str, dict]:
    """{kind: {"step": [...], "logps/chosen": [...], "logps/chosen_ci": [[lo, hi], ...], same for
    "logps/rejected" and "gap", "pairs": n}} over a run's evaluations."""
    rows = read_pair_values(Path(folder) / "eval_pairs.jsonl")
    out: dict[str, dict] = {}
    for step, row in rows.items():
        c, r = np.asarray(row["logps/chosen"]), np.asarray(row["logps/rejected"])
        for kind, mask in _kinds(row["where"]).items():
            d = out.setdefault(kind, {"step": [], "pairs": int(mask.sum())})
            d["step"].append(step)
            for key, x in (("logps/chosen", c[mask]), ("logps/rejected", r[mask]), ("gap", c[mask] - r[mask])):
                d.setdefault(key, []).append(float(x.mean()) if x.size else float("nan"))
                d.setdefault(key + "_ci", []).append(bootstrap_mean_ci(x))
    return out


def _last_by_where(folder: str | Path) -> tuple[int, dict[str, tuple[float, float]]] | None:
    rows = read_pair_values(Path(folder) / "eval_pairs.jsonl")
    if not rows:
        return None
    step, row = next(reversed(rows.items()))
    return step, {w: (c, r) for w, c, r in zip(row["where"], row["logps/chosen"], row["logps/rejected"])}


def paired_differences(sft: str | Path, orpo: str | Path) -> dict:
    """ORPO minus SFT at each run's last evaluation, on the pairs both evaluated, per kind:
    {kind: {"gap": paired_difference, "logps/rejected": ..., "logps/chosen": ..., "accuracy": ...}},
    plus "content accuracy" over the held-out questions both runs answered (built-in data only)."""
    a, b = _last_by_where(sft), _last_by_where(orpo)
    out: dict = {}
    if a is None or b is None:
        return out
    common = [w for w in a[1] if w in b[1]]
    s = np.array([a[1][w] for w in common]).reshape(-1, 2)
    o = np.array([b[1][w] for w in common]).reshape(-1, 2)
    for kind, mask in _kinds(common).items():
        sc, sr, oc, orr = s[mask, 0], s[mask, 1], o[mask, 0], o[mask, 1]
        out[kind] = {"steps": [a[0], b[0]],
                     "gap": paired_difference(oc - orr, sc - sr),
                     "logps/rejected": paired_difference(orr, sr),
                     "logps/chosen": paired_difference(oc, sc),
                     "accuracy": paired_difference((oc > orr).astype(float), (sc > sr).astype(float))}
    content = _content_after(sft), _content_after(orpo)
    if content[0] and content[1]:
        qs = [q for q in content[0] if q in content[1]]
        out["content accuracy"] = paired_difference([content[1][q] for q in qs], [content[0][q] for q in qs])
    return out


def _content_after(folder: str | Path) -> dict[str, float]:
    """{question: 1.0 if the trained model's answer was right in content} from ``samples.jsonl``."""
    return {str(r.get("prompt")): float(r["content_after"]) for r in read_samples(Path(folder) / "samples.jsonl")
            if isinstance(r.get("content_after"), bool)}


def answer_numbers(folder: str | Path) -> dict | None:
    """The run's held-out answer summary (``summary.json``'s ``answers``), if it has one."""
    s = read_json(Path(folder) / "summary.json")
    return s.get("answers") if isinstance(s, dict) and isinstance(s.get("answers"), dict) else None


def paired_gap_trajectory(sft: str | Path, orpo: str | Path) -> dict[str, dict]:
    """{kind: {"step": [...], "diff": [...], "ci": [...]}}: at every step both runs evaluated, the paired
    difference ORPO - SFT of the per-pair gap (chosen - rejected log p) on the pairs both scored."""
    a, b = (read_pair_values(Path(f) / "eval_pairs.jsonl") for f in (sft, orpo))
    out: dict[str, dict] = {}
    for step in sorted(set(a) & set(b)):
        ga = {w: c - r for w, c, r in zip(a[step]["where"], a[step]["logps/chosen"], a[step]["logps/rejected"])}
        gb = {w: c - r for w, c, r in zip(b[step]["where"], b[step]["logps/chosen"], b[step]["logps/rejected"])}
        common = [w for w in ga if w in gb]
        x, y = np.array([gb[w] for w in common]), np.array([ga[w] for w in common])
        for kind, mask in _kinds(common).items():
            p = paired_difference(x[mask], y[mask])
            d = out.setdefault(kind, {"step": [], "diff": [], "ci": []})
            d["step"].append(step)
            d["diff"].append(p["diff"])
            d["ci"].append(p["ci"])
    return out
