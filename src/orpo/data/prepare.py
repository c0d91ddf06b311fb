"""From a data source to tokenized pairs: read and check every row first, then tokenize in parallel,
cached by content.

The cache key is the hash of the source's bytes, the row limit, the tokenizer (its vocabulary, merges
and chat template) and the truncation settings; the entry holds the token ids and the counts. A second
run over the same file with the same tokenizer starts training without tokenizing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import cache_root
from ..errors import UserError
from .readers import Pair, Skips, load_pairs
from .templates import TokenizedPair, TokenStats, tokenize_batch

CACHE_VERSION = 1
PARALLEL_MIN_ROWS = 4000  # below this, worker start-up costs more than it saves


@dataclass
class Rows:
    """Checked rows of one source, before tokenization."""

    pairs: list[Pair]
    skips: Skips
    n_read: int
    name: str
    key: str  # hash of the source content and row limit


def _hash_source(path: Path, max_rows: int | None) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|rows={max_rows}|".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_rows(source: str | Path | None, max_rows: int | None = None, pairs: list[Pair] | None = None,
              label: str | None = None) -> Rows:
    """Read and check every row (fatal problems raise UserError naming file, line and field)."""
    if pairs is not None:
        key = hashlib.sha256(repr([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode()).hexdigest()
        return Rows(pairs, Skips(), len(pairs), label or "built-in dataset", key)
    got, skips, n_read = load_pairs(source, max_rows)
    return Rows(got, skips, n_read, label or str(source), _hash_source(Path(source), max_rows))


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("chat_template", "bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        h.update(f"|{attr}={getattr(tokenizer, attr, None)}".encode())
    h.update(json.dumps(sorted(tokenizer.all_special_tokens)).encode())
    return h.hexdigest()


def _cache_dir() -> Path:
    return cache_root() / "tokens"


def _save(path: Path, tokens: list[TokenizedPair], stats: TokenStats) -> None:
    def flat(parts):
        lens = np.array([len(x) for x in parts], dtype=np.int64)
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), lens

    p, pl = flat([t.prompt for t in tokens])
    c, cl = flat([t.chosen for t in tokens])
    r, rl = flat([t.rejected for t in tokens])
    meta = {"stats": stats.as_dict(), "examples": stats.skips.examples, "where": [t.where for t in tokens]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, p=p, pl=pl, c=c, cl=cl, r=r, rl=rl, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a cache that cannot be written is only a slower next run


def _load(path: Path) -> tuple[list[TokenizedPair], TokenStats] | None:
    try:
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError):
        return None

    def split(flat, lens):
        return np.split(flat, np.cumsum(lens)[:-1]) if len(lens) else []

    tokens = [TokenizedPair(a, b, c, w) for a, b, c, w in
              zip(split(z["p"], z["pl"]), split(z["c"], z["cl"]), split(z["r"], z["rl"]), meta["where"])]
    s = meta["stats"]
    stats = TokenStats(rows_read=s["rows_read"], kept=s["kept"], prompt_truncated=s["prompt_truncated"],
                       completion_truncated=s["completion_truncated"])
    stats.skips.counts = dict(s["skipped_by_reason"])
    stats.skips.examples = {k: list(v) for k, v in meta["examples"].items()}
    return tokens, stats


def _encode(x):
    return x if isinstance(x, str) else json.dumps(x)


def _map_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int | None) -> dict:
    """datasets.map worker: rows in, token ids and per-row outcome out."""
    decode = (lambda v: json.loads(v)) if batch["conv"][0] else (lambda v: v)  # noqa: E731
    pairs = [Pair(decode(p), decode(c), decode(r), w)
             for p, c, r, w in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["where"])]
    out = {"p": [], "c": [], "r": [], "skip": [], "p_cut": [], "c_cut": [], "where": []}
    for pair, (tp, reason, p_cut, c_cut) in zip(pairs, tokenize_batch(pairs, tokenizer, max_length, max_prompt_length)):
        out["p"].append(tp.prompt.tolist() if tp else [])
        out["c"].append(tp.chosen.tolist() if tp else [])
        out["r"].append(tp.rejected.tolist() if tp else [])
        out["skip"].append(reason or "")
        out["p_cut"].append(p_cut)
        out["c_cut"].append(c_cut)
        out["where"].append(pair.where)
    return out


def _tokenize_all(pairs: list[Pair], tokenizer, max_length, max_prompt_length, num_proc: int):
    """Yield ``(where, tokenized or None, skip reason, p_cut, c_cut)`` for every pair, in order."""
    if num_proc <= 1 or len(pairs) < PARALLEL_MIN_ROWS:
        for s in range(0, len(pairs), 512):
            chunk = pairs[s : s + 512]
            for pair, res in zip(chunk, tokenize_batch(chunk, tokenizer, max_length, max_prompt_length)):
                yield (pair.where, *res)
        return
    import datasets

    conv = pairs[0].conversational
    ds = datasets.Dataset.from_dict({
        "prompt": [_encode(p.prompt) for p in pairs], "chosen": [_encode(p.chosen) for p in pairs],
        "rejected": [_encode(p.rejected) for p in pairs], "where": [p.where for p in pairs],
        "conv": [conv] * len(pairs),
    })
    mapped = ds.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=ds.column_names,
                    fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length},
                    keep_in_memory=True, desc=None)
    for row in mapped:
        if row["skip"]:
            yield row["where"], None, row["skip"], row["p_cut"], row["c_cut"]
        else:
            as_ids = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
            yield row["where"], TokenizedPair(as_ids(row["p"]), as_ids(row["c"]), as_ids(row["r"]), row["where"]), None, row["p_cut"], row["c_cut"]


def tokenize_rows(rows: Rows, tokenizer, max_length: int, max_prompt_length: int | None = None,
                  num_proc: int | None = None, cache: bool = True) -> tuple[list[TokenizedPair], TokenStats]:
    """Tokenize checked rows, from the cache when this exact work was done before."""
    key = hashlib.sha256(
        f"{rows.key}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{max_prompt_length}|v{CACHE_VERSION}".encode()
    ).hexdigest()[:32]
    path = _cache_dir() / f"{key}.npz"
    if cache and path.is_file():
        hit = _load(path)
        if hit is not None:
            return hit
    stats = TokenStats(rows_read=rows.n_read)
    stats.skips.counts = dict(rows.skips.counts)
    stats.skips.examples = {k: list(v) for k, v in rows.skips.examples.items()}
    tokens = []
    workers = num_proc if num_proc is not None else min(8, os.cpu_count() or 1)
    for where, tp, reason, p_cut, c_cut in _tokenize_all(rows.pairs, tokenizer, max_length, max_prompt_length, workers):
        if tp is None:
            stats.skips.add(reason, where)
            continue
        stats.prompt_truncated += p_cut
        stats.completion_truncated += c_cut
        tokens.append(tp)
    stats.kept = len(tokens)
    if cache:
        _save(path, tokens, stats)
    return tokens, stats


def report_line(name: str, stats: TokenStats) -> str:
    line = (f"{name}: {stats.rows_read} rows, {stats.kept} pairs kept; truncated: {stats.prompt_truncated} prompts, "
            f"{stats.completion_truncated} completions; skipped: {stats.skips.total}")
    return line + (f" ({stats.skips.summary()})" if stats.skips.total else "")


def check_usable(name: str, tokens: list[TokenizedPair], stats: TokenStats, strict: bool) -> None:
    if strict and stats.skips.total:
        raise UserError(f"{name}: --strict: {stats.skips.summary()}")
    if not tokens:
        raise UserError(f"{name}: no usable pairs left after checking and truncation")


def prepare_pairs(
    source: str | None,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    max_rows: int | None = None,
    strict: bool = False,
    pairs: list[Pair] | None = None,
    label: str | None = None,
    cache: bool = True,
) -> tuple[list[TokenizedPair], TokenStats, str]:
    """Read, check, tokenize and truncate in one call. Returns (pairs, stats, one-line report)."""
    rows = read_rows(source, max_rows, pairs, label)
    if strict and rows.skips.total:
        raise UserError(f"{rows.name}: --strict: {rows.skips.summary()}")
    tokens, stats = tokenize_rows(rows, tokenizer, max_length, max_prompt_length, cache=cache)
    check_usable(rows.name, tokens, stats, strict)
    return tokens, stats, report_line(rows.name, stats)
