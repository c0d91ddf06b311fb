"""Data: read and check rows (readers), tokenize them (templates), lay them out for the model (batching)."""

from .batching import Batch, Layout, collate
from .readers import Pair, Skips, load_pairs, normalize_row, read_raw
from .templates import TokenizedPair, TokenStats, tokenize_pairs, truncate

__all__ = [
    "Batch",
    "Layout",
    "Pair",
    "Skips",
    "TokenStats",
    "TokenizedPair",
    "collate",
    "load_pairs",
    "normalize_row",
    "read_raw",
    "tokenize_pairs",
    "truncate",
]
