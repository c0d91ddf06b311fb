"""Where the held-out *wrong* answers' log-probability goes: the content tokens ("Toronto") against the
format tokens after them (the end-of-turn marker). From finished run folders' final models, on the
built-in held-out pairs, no training.

    python benchmarks/wrong_tokens.py BASE runs/compare/sft/model runs/compare/orpo/model

BASE is "default" for the default job's base model. For each model, over the held-out pairs whose
rejected answer is a bare wrong answer, prints the mean log p per token of the chosen and of the
rejected completion (what eval_logps/* average), split into content tokens and format tokens (special
tokens and whitespace), each with its bootstrap 95% interval over the pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from orpo.data.builtin import HELDOUT_LABEL, heldout_pairs, rejected_kind  # noqa: E402
from orpo.data.prepare import prepare_pairs  # noqa: E402
from orpo.model import load_model, load_tokenizer, resolve_model  # noqa: E402
from orpo.stats import bootstrap_mean_ci  # noqa: E402


def token_logps(model, prompt, completion) -> np.ndarray:
    ids = torch.tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).squeeze(1).numpy()


def main(models: list[str]) -> None:
    held = heldout_pairs()
    folder0 = resolve_model(None if models[0] == "default" else models[0], quiet=True)
    tok = load_tokenizer(folder0, False)
    store, _, _ = prepare_pairs(None, tok, 256, pairs=held, label=HELDOUT_LABEL, cache=False)
    wrong = [i for i in range(len(store)) if rejected_kind(store[i].where) == "wrong"]
    special = set(tok.all_special_ids)

    def is_format(t: int) -> bool:
        return t in special or not tok.decode([t]).strip()

    print(f"{len(wrong)} held-out pairs with a wrong rejected answer; mean log p per token [95% CI]")
    print(f"{'model':<34}{'chosen all':>24}{'rejected all':>24}{'rejected content':>24}{'rejected format':>24}")
    for name in models:
        folder = resolve_model(None if name == "default" else name, quiet=True)
        model = load_model(folder, False, False).eval()
        cols = {"chosen all": [], "rejected all": [], "rejected content": [], "rejected format": []}
        for i in wrong:
            p = store[i]
            lc, lr = token_logps(model, p.prompt, p.chosen), token_logps(model, p.prompt, p.rejected)
            fmt = np.array([is_format(int(t)) for t in p.rejected])
            cols["chosen all"].append(lc.mean())
            cols["rejected all"].append(lr.mean())
            if (~fmt).any():
                cols["rejected content"].append(lr[~fmt].mean())
            if fmt.any():
                cols["rejected format"].append(lr[fmt].mean())
        cells = []
        for k, xs in cols.items():
            ci = bootstrap_mean_ci(xs)
            cells.append(f"{np.mean(xs):>7.3f} [{ci[0]:.2f}, {ci[1]:.2f}]")
        print(f"{name[-34:]:<34}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
