"""Rows handed in from Python: a ``datasets.Dataset`` (or a ``DatasetDict`` with a train split), a pandas
``DataFrame``, or a list of dicts. They go through the same checks as a file's rows, named by row number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..config import is_in_memory
from ..errors import UserError


def source_name(source: Any) -> str:
    """How messages name a data source: its path, or 'in-memory <type>'."""
    return f"in-memory {type(source).__name__}" if is_in_memory(source) else str(source)


def _plain(value: Any) -> Any:
    """numpy arrays (a DataFrame read from Parquet holds message lists as arrays) -> lists, all the way down."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _rows(source: Any):
    name = source_name(source)
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):  # pandas.DataFrame
        return source.to_dict("records")
    if isinstance(source, dict):
        if source and all(hasattr(v, "column_names") for v in source.values()):  # datasets.DatasetDict
            if "train" in source:
                return source["train"]
            if len(source) == 1:
                return next(iter(source.values()))
            raise UserError(f"{name}: holds several splits ({', '.join(source)}); pass one split, e.g. ds['train']")
        raise UserError(f"{name}: a dict is not a list of rows; pass a list of dicts, a datasets.Dataset or a DataFrame")
    try:
        iter(source)
    except TypeError:
        raise UserError(f"{name}: cannot read rows from a {type(source).__name__}; pass a list of dicts, "
                        "a datasets.Dataset or a pandas DataFrame") from None
    return source


def iter_memory(source: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of an in-memory source."""
    name = source_name(source)
    for i, row in enumerate(_rows(source), start=1):
        yield f"{name}: row {i}", _plain(row)
