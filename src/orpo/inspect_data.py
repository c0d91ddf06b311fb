"""``orpo data``: look at a dataset through the model's tokenizer before spending any compute.

It reads and checks the rows exactly as training does (the same readers, chat template, boundary and
truncation code), then prints: the detected format and row counts; token-length percentiles of
prompts, chosen and rejected completions; how many pairs a given ``max_length`` truncates or drops and
how many tokens it cuts (in total, and the most from one pair);
and one or two pairs rendered as the model will see them, with the prompt/completion boundary and the
tokens that carry a loss marked (colour in a terminal, ``┃`` and ``⟦ ⟧`` markers otherwise). A wrong
chat template is the most common cause of bad ORPO results, and this shows it in a second.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import column_map
from .data.readers import load_pairs, read_raw
from .data.images import image_token_ids
from .data.templates import TokenizedPair, TokenStats, end_token_ids, tokenize_pairs
from .errors import UserError

PERCENTILES = (50, 90, 95, 99, 100)
NO_LIMIT = 1 << 30

# ANSI styles for the terminal rendering.
DIM, GREEN, RED, CYAN, YELLOW, BOLD, RESET = "\033[2m", "\033[32m", "\033[31m", "\033[36m", "\033[1;33m", "\033[1m", "\033[0m"
BOUNDARY, OPEN, CLOSE = "┃", "⟦", "⟧"


@dataclass
class DataInspection:
    """What ``orpo data`` found; ``as_dict`` is its machine-readable form."""

    source: str
    format: str
    rows_read: int
    usable_rows: int  # rows that passed the checks and tokenized (before truncation)
    skipped: dict[str, int]  # reason -> rows, from reading and from tokenizing without a length limit
    lengths: dict[str, dict[str, int]]  # part -> percentile name -> tokens
    max_length: int
    max_prompt_length: int | None
    fitted: dict  # TokenStats.as_dict() of the same rows tokenized with max_length (what training gets)
    examples: list[TokenizedPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    multi_turn: int = 0
    full_tokens: int = 0  # prompt + chosen + rejected tokens of the usable rows before truncation (prompt once)
    image_ids: set = field(default_factory=set)  # image pairs: the ids of the image tokens, shown as one marker

    def as_dict(self) -> dict:
        return {
            "source": self.source, "format": self.format, "rows_read": self.rows_read, "usable_rows": self.usable_rows,
            "multi_turn_prompts": self.multi_turn, "skipped": self.skipped, "token_lengths": self.lengths,
            "max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "with_max_length": self.fitted,
            "full_tokens": self.full_tokens, "notes": self.notes,
        }


def describe_format(source: str | Path, pairs) -> str:
    if not pairs:
        return "unknown (no usable rows)"
    if not pairs[0].conversational:
        return "plain strings with an explicit prompt (prompt + completion concatenated, no chat template)"
    try:
        _, first = next(iter(read_raw(source)))
        explicit = isinstance(first, dict) and first.get("prompt") is not None
    except (StopIteration, UserError):
        explicit = False
    if explicit:
        return "chat messages with an explicit prompt (rendered with the chat template)"
    return "chat messages, implicit prompt: the shared opening of two conversations (rendered with the chat template)"


def percentiles(values) -> dict[str, int]:
    if len(values) == 0:
        return {}
    arr = np.asarray(values)
    out = {f"p{p}" if p < 100 else "max": int(np.percentile(arr, p, method="higher")) for p in PERCENTILES}
    out["mean"] = int(round(float(arr.mean())))
    return out


def inspect_data(
    source: str | Path,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    max_rows: int | None = None,
    n_examples: int = 2,
    columns: str | dict | None = None,
    processor=None,
) -> DataInspection:
    """``processor``: the model's processor, or a function that loads it, called only where the data holds
    image pairs (which it renders and expands)."""
    pairs, skips, n_read = load_pairs(source, max_rows, column_map(columns))
    image_ids: set = set()
    if any(p.images for p in pairs):
        processor = processor() if callable(processor) and not hasattr(processor, "image_processor") else processor
        image_ids = image_token_ids(processor) if processor is not None else set()
    else:
        processor = None
    fmt = describe_format(source, pairs)
    # Full lengths: the same tokenization with no length limit.
    full_stats = TokenStats()
    full = tokenize_pairs(pairs, tokenizer, NO_LIMIT, None, full_stats, processor=processor) if pairs else []
    skipped = dict(skips.counts)
    for reason, n in full_stats.skips.counts.items():
        skipped[reason] = skipped.get(reason, 0) + n
    lengths = {
        "prompt": percentiles([len(p.prompt) for p in full]),
        "chosen": percentiles([len(p.chosen) for p in full]),
        "rejected": percentiles([len(p.rejected) for p in full]),
        "prompt + longer completion": percentiles([len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in full]),
    }
    # What training gets with this max_length (the exact code path, so the counts match the run's).
    fit_stats = TokenStats()
    fitted = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length, fit_stats, processor=processor) if pairs else []
    fit_stats.rows_read = n_read
    for reason, n in skips.counts.items():  # rows dropped while reading count as dropped here too
        for _ in range(n):
            fit_stats.skips.add(reason, "")
    multi = 0
    if pairs and pairs[0].conversational:
        multi = sum(1 for p in pairs if sum(m["role"] == "user" for m in p.prompt) > 1)
    notes = _notes(tokenizer, pairs, fitted, fit_stats)
    return DataInspection(
        source=str(source), format=fmt, rows_read=n_read, usable_rows=len(full), skipped=skipped, lengths=lengths,
        max_length=max_length, max_prompt_length=max_prompt_length, fitted=fit_stats.as_dict(),
        examples=fitted[:n_examples], notes=notes, multi_turn=multi,
        full_tokens=sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in full), image_ids=image_ids,
    )


def _notes(tokenizer, pairs, fitted, stats) -> list[str]:
    """Things that often mean a wrong template or a bad length setting."""
    notes = []
    if pairs and not pairs[0].conversational and getattr(tokenizer, "chat_template", None):
        notes.append(
            "the rows are plain strings, so the model's chat template is NOT applied: the model is trained on the "
            "raw text. If this is a chat model, convert the rows to chat messages to train in its own format."
        )
    ends = end_token_ids(tokenizer)
    no_end = sum(1 for p in fitted if len(p.chosen) and int(p.chosen[-1]) not in ends)
    if no_end:
        notes.append(f"{no_end} chosen completions do not end with an end token (cut by max_length), so the model "
                     "is not taught to stop there")
    if stats.rows_read and stats.kept < stats.rows_read:
        notes.append(f"{stats.rows_read - stats.kept} of {stats.rows_read} rows would not reach training")
    return notes


# ------------------------------------------------------------------------------------------------
# Rendering.


def _visible(text: str) -> str:
    """Make line ends visible: a newline is shown as ↵ and kept, so trailing whitespace shows too."""
    return text.replace("\r", "␍").replace("\n", "↵\n")


def _style(text: str, style: str, color: bool) -> str:
    return f"{style}{text}{RESET}" if color and text else text


def _decode_prompt(tokenizer, ids, image_ids) -> str:
    """The prompt's text, each run of image tokens shown as ``<image k: N tokens>``."""
    ids = list(map(int, ids))
    if not image_ids:
        return tokenizer.decode(ids, skip_special_tokens=False)
    out, k, i = [], 0, 0
    while i < len(ids):
        j = i
        inside = ids[i] in image_ids
        while j < len(ids) and (ids[j] in image_ids) == inside:
            j += 1
        if inside:
            k += 1
            out.append(f"<image {k}: {j - i} tokens>")
        else:
            out.append(tokenizer.decode(ids[i:j], skip_special_tokens=False))
        i = j
    return "".join(out)


def render_sequence(tokenizer, prompt, completion, prompt_in_loss: bool, completion_style: str, color: bool,
                    image_ids=frozenset()) -> str:
    """One row as the model sees it: prompt, the boundary, the completion; loss-bearing tokens marked."""
    p_text = _visible(_decode_prompt(tokenizer, prompt, image_ids))
    c_text = _visible(tokenizer.decode(list(map(int, completion)), skip_special_tokens=False))
    if color:
        p = _style(p_text, CYAN if prompt_in_loss else DIM, True)
        return p + _style(BOUNDARY, YELLOW, True) + _style(c_text, completion_style, True)
    p = f"{OPEN}{p_text}{CLOSE}" if prompt_in_loss else p_text
    return p + BOUNDARY + OPEN + c_text + CLOSE


def _token_list(tokenizer, ids) -> str:
    return " ".join(repr(tokenizer.decode([int(i)], skip_special_tokens=False)) for i in ids)


def render_example(tokenizer, pair: TokenizedPair, index: int, prompt_in_nll: bool, color: bool,
                   image_ids=frozenset()) -> str:
    head = (f"── example {index}: {pair.where} ── {len(pair.prompt)} prompt + {len(pair.chosen)} chosen + "
            f"{len(pair.rejected)} rejected tokens ──")
    lines = [_style(head, BOLD, color)]
    lines.append(_style("prompt + chosen " + ("(NLL on prompt and chosen; odds ratio on chosen):" if prompt_in_nll
                                              else "(NLL and odds ratio on the chosen tokens):"), BOLD, color))
    lines.append(render_sequence(tokenizer, pair.prompt, pair.chosen, prompt_in_nll, GREEN, color, image_ids))
    lines.append(_style("prompt + rejected (odds ratio only on the rejected tokens):", BOLD, color))
    lines.append(render_sequence(tokenizer, pair.prompt, pair.rejected, False, RED, color, image_ids))
    lines.append("boundary tokens: … " + _token_list(tokenizer, pair.prompt[-4:]) + f" {BOUNDARY} "
                 + _token_list(tokenizer, pair.chosen[:4]) + " …")
    lines.append("completion ends: chosen … " + _token_list(tokenizer, pair.chosen[-3:]) + " | rejected … "
                 + _token_list(tokenizer, pair.rejected[-3:]))
    return "\n".join(lines)


def _pct_table(lengths: dict[str, dict[str, int]]) -> list[str]:
    cols = ["p50", "p90", "p95", "p99", "max", "mean"]
    width = max(len(k) for k in lengths) + 2
    out = [" " * width + "".join(f"{c:>8}" for c in cols)]
    for part, p in lengths.items():
        out.append(f"{part:<{width}}" + "".join(f"{p.get(c, ''):>8}" for c in cols))
    return out


def render_report(info: DataInspection, tokenizer, prompt_in_nll: bool = False, color: bool = False) -> str:
    f = info.fitted
    lines = [
        f"data:    {info.source}",
        f"format:  {info.format}",
        f"rows:    {info.rows_read} read, {info.usable_rows} usable"
        + (f", {sum(info.skipped.values())} skipped" if info.skipped else ""),
    ]
    for reason, n in info.skipped.items():
        lines.append(f"         skipped: {n} {reason}")
    if info.multi_turn:
        lines.append(f"         {info.multi_turn} prompts hold earlier turns (multi-turn history)")
    lines.append("")
    lines.append("token lengths (before truncation):")
    lines += ["  " + line for line in _pct_table(info.lengths)]
    lines.append("")
    cap = f", max_prompt_length {info.max_prompt_length}" if info.max_prompt_length else ""
    pct = lambda n: f"{n / max(1, info.rows_read):.1%}"  # noqa: E731
    lines.append(f"with max_length {info.max_length}{cap}:")
    lines.append(f"  kept:                  {f['kept']} pairs ({pct(f['kept'])} of rows)")
    lines.append(f"  prompt truncated:      {f['prompt_truncated']} ({pct(f['prompt_truncated'])}); the start is cut, the latest turns kept")
    lines.append(f"  completions truncated: {f['completion_truncated']} ({pct(f['completion_truncated'])}); their ends are cut")
    if f.get("tokens_cut"):
        share = f" ({f['tokens_cut'] / info.full_tokens:.1%} of the usable pairs' tokens)" if info.full_tokens else ""
        lines.append(f"  tokens cut:            {f['tokens_cut']}{share}; at most {f['largest_cut']} from one pair")
    lines.append(f"  dropped:               {f['skipped']} ({pct(f['skipped'])})")
    for reason, n in (f.get("skipped_by_reason") or {}).items():
        lines.append(f"    {n} {reason}")
    if info.notes:
        lines.append("")
        for n in info.notes:
            lines.append("note: " + n)
    if info.examples:
        lines.append("")
        if color:
            legend = (f"legend: {DIM}prompt (no loss){RESET}{YELLOW}{BOUNDARY}{RESET}{GREEN}chosen{RESET} / "
                      f"{RED}rejected{RESET} completion" + (f"; {CYAN}prompt in the NLL{RESET}" if prompt_in_nll else "")
                      + "; ↵ is a newline")
        else:
            legend = (f"legend: {BOUNDARY} is the prompt/completion boundary; {OPEN}…{CLOSE} are the tokens in the loss; "
                      "↵ is a newline")
        lines.append(legend)
        for i, ex in enumerate(info.examples, 1):
            lines.append("")
            lines.append(render_example(tokenizer, ex, i, prompt_in_nll, color, info.image_ids))
    return "\n".join(lines)


def use_color(choice: str, stream=None) -> bool:
    stream = stream or sys.stdout
    if choice == "always":
        return True
    if choice == "never":
        return False
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def inspect_command(cfg, source: str, n_examples: int = 2, color: str = "auto", as_json: bool = False) -> str:
    """``orpo data``: load the tokenizer of ``cfg.model`` (no weights) and inspect ``source``."""
    import json

    from .data.chat_templates import set_chat_template
    from .model import load_tokenizer, resolve_model

    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    set_chat_template(tokenizer, cfg.chat_template, say=lambda m: None)

    def processor():  # image pairs: the model's processor, once the model is known to take images
        from .image_forward import run_processor

        return run_processor(folder, tokenizer, str(source), cfg.trust_remote_code, cfg.chat_template)

    info = inspect_data(source, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.max_rows, n_examples,
                        cfg.columns, processor)
    text = render_report(info, tokenizer, cfg.prompt_in_nll, use_color(color))
    if as_json:
        text += "\n" + json.dumps(info.as_dict())
    return text
