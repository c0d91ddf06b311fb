"""How hard the odds-ratio term pulls on each kind of held-out pair, at every evaluation of a run.

The gradient of L_OR = -log sigma(r), r = log odds(y_w|x) - log odds(y_l|x), is sigma(-r) times that of
r: a pair whose chosen answer is already far likelier than its rejected one gets little of it. From a
run folder's eval_pairs.jsonl (every held-out pair's own values), no model needed:

    python benchmarks/or_weight.py runs/compare/orpo

prints the mean sigma(-r) over all pairs and, on the built-in data, per kind of rejected answer.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from orpo.data.builtin import rejected_kind  # noqa: E402


def main(run: str) -> None:
    for line in (Path(run) / "eval_pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        weights: dict[str, list[float]] = {"all pairs": []}
        # (``log_odds_chosen`` is TRL's name for the ratio r itself, chosen minus rejected)
        for where, ratio in zip(row["where"], row["log_odds_chosen"]):
            w = 1.0 / (1.0 + math.exp(min(ratio, 700.0)))  # sigma(-r)
            weights["all pairs"].append(w)
            kind = rejected_kind(where)
            if kind:
                weights.setdefault(f"{kind} rejected", []).append(w)
        cells = ", ".join(f"{k}: {sum(v) / len(v):.3f}" for k, v in weights.items())
        print(f"{run} step {row['step']}: mean sigma(-ratio) {cells}")


if __name__ == "__main__":
    main(sys.argv[1])
