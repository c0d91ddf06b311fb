"""From a data source to tokenized pairs, with the counts a user sees before training starts."""

from __future__ import annotations

from ..errors import UserError
from .readers import Pair, Skips, load_pairs
from .templates import TokenizedPair, TokenStats, tokenize_pairs


def prepare_pairs(
    source: str | None,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    max_rows: int | None = None,
    strict: bool = False,
    pairs: list[Pair] | None = None,
    label: str | None = None,
) -> tuple[list[TokenizedPair], TokenStats, str]:
    """Read (or take ``pairs``), check, tokenize and truncate. Returns (pairs, stats, one-line report).

    ``strict`` makes any skipped row fatal, naming the first ones.
    """
    stats = TokenStats()
    if pairs is not None:
        skips, n_read, name = Skips(), len(pairs), label or "built-in dataset"
    else:
        pairs, skips, n_read = load_pairs(source, max_rows)
        name = label or str(source)
    stats.rows_read, stats.skips = n_read, skips
    if strict and skips.total:
        raise UserError(f"{name}: --strict: {skips.summary()}")
    tokens = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length, stats)
    if strict and stats.skips.total:
        raise UserError(f"{name}: --strict: {stats.skips.summary()}")
    report = (
        f"{name}: {n_read} rows, {stats.kept} pairs kept; truncated: {stats.prompt_truncated} prompts, "
        f"{stats.completion_truncated} completions; skipped: {stats.skips.total}"
    )
    if stats.skips.total:
        report += f" ({stats.skips.summary()})"
    if not tokens:
        raise UserError(f"{name}: no usable pairs left after checking and truncation")
    return tokens, stats, report
