"""From a data source to tokenized pairs, in two streaming passes.

1. ``scan_rows`` reads and checks every row (no tokenizer needed, so it runs before any heavy work and
   a bad row fails in seconds), counts skips, and, with ``shuffle_seed`` and ``max_rows``, draws a
   uniform random sample of rows (reservoir sampling, so memory stays bounded by the sample).
2. ``tokenize_rows`` reads the kept rows again in chunks, tokenizes each chunk (in parallel with
   ``datasets.map(num_proc=...)`` when it is large) and appends it to a memory-mapped
   :class:`TokenStore`. Neither pass holds the raw dataset in memory.

Both results are cached by content: the scan by the hash of the source bytes and the row selection,
the tokens by that plus the tokenizer (vocabulary, merges, chat template) and the truncation settings.
A second run over the same file starts training without reading or tokenizing it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import cache_root, column_map, is_in_memory, memory_label
from ..errors import UserError
from .formats import hub_revision
from .images import fingerprint as image_fingerprint
from .images import processor_fingerprint
from .memory import source_name
from .readers import Pair, Skips, iter_pairs
from .store import META, StoreWriter, TokenStore
from .templates import TokenizedPair, TokenStats, tokenize_batch

CACHE_VERSION = 2
CHUNK_ROWS = 8192  # rows tokenized per chunk
PARALLEL_MIN_ROWS = 4000  # below this, worker start-up costs more than it saves


@dataclass
class Rows:
    """The checked rows of one source, ready to be streamed to the tokenizer."""

    name: str
    key: str  # identifies the content and the row selection
    n_read: int
    skips: Skips
    source: str | None = None
    max_rows: int | None = None
    selected: np.ndarray | None = None  # sorted row indices drawn by sampling (None: all rows read)
    pairs: list[Pair] | None = field(default=None, repr=False)  # in-memory rows (the built-in data)
    cacheable: bool = True
    columns: dict | None = None  # --columns: the data's own names of prompt/chosen/rejected
    content: str = ""  # the content's identity, which a resumed run must find unchanged (resume.check_data)
    images: bool = False  # some rows are image-text pairs (they need the model's processor)

    def __iter__(self) -> Iterator[tuple[int, Pair]]:
        """(row index, pair) for every usable row, in source order."""
        if self.pairs is not None:
            yield from enumerate(self.pairs)
            return
        keep = set(self.selected.tolist()) if self.selected is not None else None
        limit = None if keep is not None else self.max_rows
        for i, _where, pair, _reason in iter_pairs(self.source, limit, self.columns):
            if pair is not None and (keep is None or i in keep):
                yield i, pair


def _tokens_dir() -> Path:
    return cache_root() / "tokens"


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, as ``sha256sum`` prints it (a folder's: its files' relative names and
    bytes, in order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only makes the next run slower


def scan_rows(source, max_rows: int | None = None, shuffle_seed: int | None = None,
              pairs: list[Pair] | None = None, label: str | None = None, columns: dict | None = None) -> Rows:
    """Check every row of ``source`` (a path, a hub name, or rows in memory; or take ``pairs``) and decide
    which rows are used. ``columns`` maps prompt/chosen/rejected to the data's own keys (a dict, or the
    --columns text)."""
    columns = column_map(columns)
    if pairs is not None:
        key = hashlib.sha256(repr([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode()).hexdigest()
        return Rows(label or "built-in dataset", key, len(pairs), Skips(), pairs=pairs, content=f"sha256:{key}")
    in_memory = is_in_memory(source)
    if not in_memory:
        source = str(source)
    path = Path(source) if not in_memory else None
    name = label or source_name(source)
    local = path is not None and path.exists()
    if in_memory:  # the content's hash, as config.yaml records it
        content = f"memory:{memory_label(source)}"
    elif local:
        content = f"sha256:{content_hash(path)}"
    else:  # a hub dataset: its name and the revision it resolves to now (which is the one read)
        content = f"hub:{source}@{hub_revision(source) or 'unresolved'}"
    sel = f"rows={max_rows}|shuffle={shuffle_seed if max_rows is not None else None}"
    if columns:  # (left out when unset, so caches made before --columns existed stay valid)
        sel += f"|columns={sorted(columns.items())}"
    key = hashlib.sha256(f"v{CACHE_VERSION}|{content}|{sel}".encode()).hexdigest()
    marker = _tokens_dir() / f"{key[:32]}.rows.json"
    if local and marker.is_file():
        try:
            m = json.loads(marker.read_text())
            skips = Skips(counts=m["skips"], examples=m["examples"])
            selected = np.asarray(m["selected"], dtype=np.int64) if m["selected"] is not None else None
            rows = Rows(name, key, m["n_read"], skips, source, max_rows, selected, cacheable=True, columns=columns,
                        content=content)
            if m.get("image_files") is not None:  # the image files are read again: they may have changed
                _with_images(rows, m["image_files"], m["image_bytes"])
            return rows
        except (ValueError, KeyError, OSError):
            pass
    images = _ImageScan()

    skips = Skips()
    selected = None
    if shuffle_seed is not None and max_rows is not None:
        # Algorithm R over the whole file: a uniform sample of max_rows rows, in bounded memory.
        rng = np.random.default_rng(shuffle_seed)
        reservoir: list[int] = []
        reasons: dict[int, tuple[str, str]] = {}
        n = 0
        for i, where, _pair, reason in iter_pairs(source, None, columns):
            images.add(_pair)
            n += 1
            if len(reservoir) < max_rows:
                slot = len(reservoir)
                reservoir.append(i)
            else:
                slot = int(rng.integers(0, i + 1))
                if slot >= max_rows:
                    continue
                reasons.pop(reservoir[slot], None)
                reservoir[slot] = i
            if reason is not None:
                reasons[i] = (where, reason)
        selected = np.sort(np.asarray(reservoir, dtype=np.int64))
        for i in selected.tolist():
            if i in reasons:
                skips.add(reasons[i][1], reasons[i][0])
        n_read = len(selected)
    else:
        n_read = 0
        for _i, where, _pair, reason in iter_pairs(source, max_rows, columns):
            images.add(_pair)
            n_read += 1
            if reason is not None:
                skips.add(reason, where)
    if local:
        _atomic_write(marker, json.dumps({"n_read": n_read, "skips": skips.counts, "examples": skips.examples,
                                          "selected": selected.tolist() if selected is not None else None,
                                          **images.marker()}))
    rows = Rows(name, key, n_read, skips, source, max_rows, selected, cacheable=local or in_memory, columns=columns,
                content=content)
    if images.found:
        _with_images(rows, images.files, images.blobs.hexdigest())
    return rows


class _ImageScan:
    """The image references met while scanning: the files (read again on a later run, which may find them
    changed) and a hash of the encoded images held in the rows."""

    def __init__(self):
        self.found, self.files, self.blobs = False, [], hashlib.sha256()

    def add(self, pair) -> None:
        if pair is not None and pair.images:
            self.found = True
            self.files += [r for r in pair.images if isinstance(r, str)]
            image_fingerprint(self.blobs, [r for r in pair.images if not isinstance(r, str)])

    def marker(self) -> dict:
        return {"image_files": self.files, "image_bytes": self.blobs.hexdigest()} if self.found else {}


def _with_images(rows: Rows, files: list[str], blobs: str) -> None:
    """Image pairs: the content id and the cache key also cover the images (each file's path and bytes,
    the encoded images' bytes), so a changed image is new data for the token cache and for --resume."""
    h = hashlib.sha256(blobs.encode())
    image_fingerprint(h, files)  # (OSError on a cached scan: the rows are scanned again, naming file:line)
    rows.images = True
    rows.key = hashlib.sha256(f"{rows.key}|images:{h.hexdigest()}".encode()).hexdigest()
    rows.content = f"{rows.content}+images:sha256:{h.hexdigest()}"


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


def _encode(x):
    return x if isinstance(x, str) else json.dumps(x)


def _map_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int | None, trunc: dict) -> dict:
    """datasets.map worker: rows in, token ids and per-row outcome out."""
    decode = (lambda v: json.loads(v)) if batch["conv"][0] else (lambda v: v)  # noqa: E731
    pairs = [Pair(decode(p), decode(c), decode(r), w)
             for p, c, r, w in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["where"])]
    out = {"p": [], "c": [], "r": [], "skip": [], "p_cut": [], "c_cut": []}
    for tp, reason, p_cut, c_cut in tokenize_batch(pairs, tokenizer, max_length, max_prompt_length, **trunc):
        out["p"].append(tp.prompt.tolist() if tp else [])
        out["c"].append(tp.chosen.tolist() if tp else [])
        out["r"].append(tp.rejected.tolist() if tp else [])
        out["skip"].append(reason or "")
        out["p_cut"].append(p_cut)
        out["c_cut"].append(c_cut)
    return out


def _tokenize_chunk(pairs: list[Pair], tokenizer, max_length, max_prompt_length, num_proc: int, trunc: dict,
                    processor=None):
    """Per pair of the chunk: (tokenized or None, skip reason, prompt cut, completion cut). Image pairs are
    tokenized in this process (their images do not travel to datasets' workers)."""
    if num_proc <= 1 or len(pairs) < PARALLEL_MIN_ROWS or any(p.images for p in pairs):
        out = []
        for s in range(0, len(pairs), 512):
            out += tokenize_batch(pairs[s : s + 512], tokenizer, max_length, max_prompt_length, **trunc,
                                  processor=processor)
        return out
    import datasets

    ds = datasets.Dataset.from_dict({
        "prompt": [_encode(p.prompt) for p in pairs], "chosen": [_encode(p.chosen) for p in pairs],
        "rejected": [_encode(p.rejected) for p in pairs], "where": [p.where for p in pairs],
        "conv": [pairs[0].conversational] * len(pairs),
    })
    mapped = ds.map(_map_batch, batched=True, batch_size=256, num_proc=num_proc, remove_columns=ds.column_names,
                    fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length,
                               "trunc": trunc},
                    keep_in_memory=True)
    as_ids = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    return [(None if r["skip"] else TokenizedPair(as_ids(r["p"]), as_ids(r["c"]), as_ids(r["r"]), p.where),
             r["skip"] or None, r["p_cut"], r["c_cut"]) for p, r in zip(pairs, mapped)]


def _chunks(rows: Rows) -> Iterator[list[tuple[int, Pair]]]:
    chunk: list[tuple[int, Pair]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stats_from_meta(meta: dict) -> TokenStats:
    s = meta["stats"]
    stats = TokenStats(rows_read=s["rows_read"], kept=s["kept"], prompt_truncated=s["prompt_truncated"],
                       completion_truncated=s["completion_truncated"], tokens_cut=s["tokens_cut"],
                       largest_cut=s["largest_cut"])  # (a cache made before these counts raises KeyError: remade)
    stats.skips = Skips(counts=dict(s["skipped_by_reason"]), examples={k: list(v) for k, v in meta["examples"].items()})
    return stats


def tokenize_rows(rows: Rows, tokenizer, max_length: int, max_prompt_length: int | None = None,
                  num_proc: int | None = None, cache: bool = True, max_completion_length: int | None = None,
                  truncation_mode: str = "keep_end", processor=None) -> tuple[TokenStore, TokenStats]:
    """Tokenize and truncate the rows into a :class:`TokenStore` (from the cache if done before). Image
    pairs need the model's ``processor``."""
    trunc = {"max_completion_length": max_completion_length, "truncation_mode": truncation_mode}
    # Options at their defaults stay out of the key, so that caches made before they existed stay valid.
    extra = "".join(f"|{k}={v}" for k, v in trunc.items() if v != {"truncation_mode": "keep_end"}.get(k))
    if rows.images and processor is not None:
        extra += f"|processor={processor_fingerprint(processor)}"
    key = hashlib.sha256(
        f"{rows.key}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{max_prompt_length}{extra}|v{CACHE_VERSION}".encode()
    ).hexdigest()[:32]
    folder = _tokens_dir() / key
    use_cache = cache and rows.cacheable
    if use_cache and (folder / META).is_file():
        try:
            return TokenStore.open(folder, rows.name), _stats_from_meta(json.loads((folder / META).read_text()))
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)

    stats = TokenStats(rows_read=rows.n_read, skips=Skips(counts=dict(rows.skips.counts),
                                                          examples={k: list(v) for k, v in rows.skips.examples.items()}))
    workers = num_proc if num_proc is not None else min(8, os.cpu_count() or 1)
    memory: list[TokenizedPair] = []
    writer = None
    tmp = None
    if use_cache:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        writer = StoreWriter(tmp)
    try:
        for chunk in _chunks(rows):
            results = _tokenize_chunk([p for _, p in chunk], tokenizer, max_length, max_prompt_length, workers, trunc,
                                      processor)
            for (row, pair), (tp, reason, p_cut, c_cut) in zip(chunk, results):
                if tp is None:
                    stats.skips.add(reason, pair.where)
                    continue
                stats.kept += 1
                stats.add_cut(p_cut, c_cut)
                if writer is not None:
                    writer.add(tp, row)
                else:
                    memory.append(tp)
        if writer is None:
            return TokenStore.from_pairs(memory, rows.name), stats
        writer.close({"stats": stats.as_dict(), "examples": stats.skips.examples})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        tmp = None
        return TokenStore.open(folder, rows.name), stats
    finally:
        if tmp is not None:
            if writer is not None:
                writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)


def report_line(name: str, stats: TokenStats) -> str:
    cut = f" ({stats.tokens_cut} tokens cut, at most {stats.largest_cut} from one pair)" if stats.tokens_cut else ""
    line = (f"{name}: {stats.rows_read} rows, {stats.kept} pairs kept; truncated: {stats.prompt_truncated} prompts, "
            f"{stats.completion_truncated} completions{cut}; skipped: {stats.skips.total}")
    return line + (f" ({stats.skips.summary()})" if stats.skips.total else "")


def check_strict(name: str, skips: Skips, strict: bool) -> None:
    """With --strict, any skipped row is fatal."""
    if strict and skips.total:
        raise UserError(f"{name}: --strict: {skips.summary()}")


def check_usable(name: str, store: TokenStore, stats: TokenStats, strict: bool) -> None:
    check_strict(name, stats.skips, strict)
    if len(store) == 0:
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
    shuffle_seed: int | None = None,
    columns: dict | None = None,
    num_proc: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    processor=None,
) -> tuple[TokenStore, TokenStats, str]:
    """Scan, check, tokenize and truncate in one call. Returns (store, stats, one-line report)."""
    rows = scan_rows(source, max_rows, shuffle_seed, pairs, label, columns)
    check_strict(rows.name, rows.skips, strict)
    store, stats = tokenize_rows(rows, tokenizer, max_length, max_prompt_length, num_proc=num_proc, cache=cache,
                                 max_completion_length=max_completion_length, truncation_mode=truncation_mode,
                                 processor=processor)
    check_usable(rows.name, store, stats, strict)
    return store, stats, report_line(rows.name, stats)
