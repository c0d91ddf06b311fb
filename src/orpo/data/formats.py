"""The file formats rows come from, and rows held in memory: each reader yields ``(where, row dict)`` and
turns every I/O or syntax problem into a UserError naming the file and line (or row).

``.jsonl`` / ``.jsonl.gz``, ``.json`` (an array of objects, or JSON lines), ``.parquet``, ``.csv`` (message
lists as JSON in a cell), a folder written by ``datasets.Dataset.save_to_disk``, a Hugging Face dataset
name, and (from Python) a ``datasets.Dataset``, a DataFrame or a list of dicts (``memory.py``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import is_in_memory
from ..errors import UserError
from .memory import iter_memory

# ------------------------------------------------------------------------------------------------
# Raw readers: yield (where, row dict) and turn every I/O or syntax problem into a located UserError.

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_text(path: Path) -> str:
    """The whole file as text; a decoding error names the line it is on."""
    try:
        with _open_binary(path) as fh:
            data = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text") from None


def _read_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{line_no}: not valid UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{path}:{line_no}", obj
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        # Many ".json" files are really JSON lines.
        yield from _read_json_lines(path)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    for i, obj in enumerate(items, start=1):
        yield f"{path}: item {i}", obj


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
    line_no = 1
    try:
        if reader.fieldnames is None:
            return
        header = [h.strip() for h in reader.fieldnames]
        reader.fieldnames = header
        for row in reader:
            line_no = reader.line_num
            if None in row:
                raise UserError(f"{path}:{line_no}: more cells than the header's {len(header)} columns")
            # Cells holding chat messages are written as JSON arrays.
            out = {}
            for key, value in row.items():
                if isinstance(value, str) and value.lstrip().startswith("[{"):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass
                out[key] = value
            yield f"{path}:{line_no}", out
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)  # streamed, one row group at a time
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield f"{path}: row {i}", row
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several unrelated types for a bad folder
        raise UserError(f"{path}: not a dataset folder saved by datasets ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"{path}: holds several splits ({', '.join(ds)}); point --data at one split's folder")
    for i, row in enumerate(ds, start=1):
        yield f"{path}: row {i}", row


HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def hub_revision(name: str) -> str | None:
    """The commit a hub dataset name resolves to now (None offline or where the hub cannot say): a run
    records it, reads that revision, and a resume compares it (orpo.resume.check_data)."""
    if _offline() or not HUB_NAME.match(name):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name.partition(":")[0]).sha
    except Exception:  # noqa: BLE001 - no network, a private repo: the name alone identifies it then
        return None


def _read_hub(name: str) -> Iterator[tuple[str, Any]]:
    """A Hugging Face dataset name (``owner/name`` or ``owner/name:split``), streamed at the revision
    :func:`hub_revision` resolved, so that every pass and every process reads the same rows."""
    repo, _, split = name.partition(":")
    split = split or "train"
    if _offline():
        raise UserError(
            f"{name}: no such local file, and a Hugging Face dataset name needs the network (HF_HUB_OFFLINE is set); "
            "save the dataset to a local file first or pass a local path"
        )
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split, streaming=True, revision=hub_revision(name))
        for i, row in enumerate(ds, start=1):
            yield f"{name}: row {i}", row
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as e:
        raise UserError(f"{name}: cannot load this Hugging Face dataset ({type(e).__name__}: {e})") from None


def read_raw(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every row of a supported file or folder, a hub dataset name, or rows
    held in memory (Python only)."""
    if is_in_memory(path) and not isinstance(path, Path):
        return iter_memory(path)
    p = Path(path)
    if not p.exists():
        if HUB_NAME.match(str(path)) and not str(path).lower().endswith(DATA_SUFFIXES):
            return _read_hub(str(path))
        raise UserError(f"{p}: data file not found")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _read_saved_dataset(p)
        raise UserError(
            f"{p}: folder holds no dataset saved by datasets.save_to_disk (no dataset_info.json or dataset_dict.json)"
        )
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(p)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p)
    if name.endswith((".csv", ".csv.gz")):
        return _read_csv(p)
    if name.endswith(".parquet"):
        return _read_parquet(p)
    raise UserError(f"{p}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)} or a saved datasets folder")


