"""A fast check of a model's files before any heavy work: a damaged download ends in one line.

A safetensors file cut short by a failed copy makes transformers fail deep inside its loader with
``SafetensorError: ... incomplete metadata``, naming no file; a missing shard, a ``config.json`` that is
not JSON or a tokenizer file that does not parse fail the same way, often after the data was tokenized.
Here every file that transformers will read is checked from its header only (no hashing, no tensor
read): JSON files parse, a safetensors file is exactly as long as its header says, every shard an index
names exists, a zip-format ``pytorch_model.bin`` has its central directory, a GGUF's tensors fit in the
file. A fault raises :class:`DamagedModelFile`, one line naming the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
from pathlib import Path

from .errors import UserError

HINT = "re-download or copy it again, or pass --model another folder"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
# Files AutoTokenizer reads when present (vocab.json only when there is no tokenizer.json).
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.json")
# What transformers loads, in its order of preference: the first present is the one checked.
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class DamagedModelFile(UserError):
    """A model file that is missing, cut short or unreadable; the message names it."""


def _damaged(path: Path, what: str, hint: str) -> DamagedModelFile:
    return DamagedModelFile(f"{path}: {what}; {hint}")


def check_model_path(path: Path, hint: str = HINT) -> None:
    """Check a model folder (HF model, LoRA adapter) or a ``.gguf`` file; raise DamagedModelFile on a fault.
    Hub names and paths that do not exist are left to the caller."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        check_gguf(path, hint)
    elif path.is_dir():
        check_folder(path, hint)


def check_folder(folder: Path, hint: str = HINT) -> None:
    """config.json (or adapter_config.json), the weights transformers will load, the tokenizer files."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        read_json(folder / "adapter_config.json", hint)
        for name in ADAPTER_WEIGHTS:
            if (folder / name).is_file():
                _check_weight_file(folder / name, hint)
                break
    else:
        config = read_json(folder / "config.json", hint)
        if "model_type" not in config and "AutoConfig" not in (config.get("auto_map") or {}) \
                and not _type_in_name(folder):
            raise _damaged(folder / "config.json", "has no model_type, so transformers cannot tell which model it is",
                           hint)
        _check_weights(folder, hint)
    _check_tokenizer(folder, hint)


def _type_in_name(folder: Path) -> bool:
    """transformers' own fallback for a config without model_type: a known model type in the path."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return True
    return any(t in str(folder) for t in CONFIG_MAPPING_NAMES)


def _check_weights(folder: Path, hint: str) -> None:
    for single, index in WEIGHTS:
        if (folder / single).is_file():
            _check_weight_file(folder / single, hint)
            return
        if (folder / index).is_file():
            data = read_json(folder / index, hint)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise _damaged(folder / index, "has no weight_map naming the shards", hint)
            for shard in sorted(set(map(str, weight_map.values()))):
                if not (folder / shard).is_file():
                    raise _damaged(folder / index, f"missing shard {shard} named in the index", hint)
                _check_weight_file(folder / shard, hint)
            return
    # no weights at all: model.check_weights says so in its own words


def _check_weight_file(path: Path, hint: str) -> None:
    if path.suffix == ".safetensors":
        check_safetensors(path, hint)
    else:
        check_pickle_zip(path, hint)


def check_safetensors(path: Path, hint: str = HINT) -> None:
    """The 8-byte header length, the JSON header, and the file's length: exactly 8 + header + the
    furthest tensor end (what the safetensors library itself requires)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _damaged(path, f"truncated: {size} bytes, too short for a safetensors header", hint)
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER:
            raise _damaged(path, f"not a safetensors file (its first 8 bytes give a header of {n} bytes)", hint)
        if 8 + n > size:
            raise _damaged(path, f"truncated: {size} bytes, the header alone says {8 + n}", hint)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"damaged: its header is not valid JSON ({one_line(e)})", hint) from None
    if not isinstance(header, dict):
        raise _damaged(path, "damaged: its header is not a JSON object", hint)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _damaged(path, f"damaged: tensor {name} has no valid data_offsets in the header", hint)
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size < expected:
        raise _damaged(path, f"truncated: {size} bytes, the header says {expected}", hint)
    if size > expected:
        raise _damaged(path, f"damaged: {size} bytes, the header says {expected} (extra bytes at the end)", hint)


def check_pickle_zip(path: Path, hint: str = HINT) -> None:
    """A zip-format PyTorch file (torch.save since 1.6) needs its central directory, at the end of the
    file: a copy cut short has none. Legacy (non-zip) pickles are left to torch."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if path.stat().st_size == 0:
        raise _damaged(path, "is empty (0 bytes)", hint)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise _damaged(path, f"truncated or damaged: {path.stat().st_size} bytes and no zip central directory at the end",
                       hint)


def _check_tokenizer(folder: Path, hint: str) -> None:
    names = TOKENIZER_JSON + (() if (folder / "tokenizer.json").is_file() else ("vocab.json",))
    for name in names:
        if (folder / name).is_file():
            read_json(folder / name, hint)
    model = folder / "tokenizer.model"
    if model.is_file() and model.stat().st_size == 0:
        raise _damaged(model, "is empty (0 bytes): the sentencepiece tokenizer is missing", hint)


def read_json(path: Path, hint: str = HINT) -> dict:
    """The JSON object in ``path``, or one line saying where it stops being JSON."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(path, "missing", hint) from None
    except OSError as e:
        raise _damaged(path, f"unreadable ({e.strerror or e})", hint) from None
    if not raw.strip():
        raise _damaged(path, f"is empty ({len(raw)} bytes), not JSON", hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _damaged(path, f"not JSON: not UTF-8 text (byte {e.start})", hint) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file ends there: truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise _damaged(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{cut}", hint) from None
    if not isinstance(data, dict):
        raise _damaged(path, f"not a JSON object (a {type(data).__name__})", hint)
    return data


# ------------------------------------------------------------------------------------------------
# GGUF: magic, version, key-values and tensor infos, then the furthest tensor end against the file size.

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Reader:
    """Reads a GGUF header from a memory map, failing with _Truncated at the end of the file."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos = buf, order, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:  # skip fixed-size elements at once
                size = struct.calcsize(_SCALARS[etype]) * count
                if self.pos + size > len(self.buf):
                    raise _Truncated
                self.pos += size
                return None
            if etype == _STRING:  # a vocabulary: 50k-250k strings, skipped in a tight loop
                buf, pos, end, length = self.buf, self.pos, len(self.buf), struct.Struct(self.order + "Q").unpack_from
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Truncated
                    pos += 8 + length(buf, pos)[0]
                if pos > end:
                    raise _Truncated
                self.pos = pos
                return None
            for _ in range(count):
                self.value(etype)
            return None
        if vtype not in _SCALARS:
            raise ValueError(f"unknown value type {vtype}")
        return self.take(_SCALARS[vtype])


def check_gguf(path: Path, hint: str = HINT) -> None:
    """Magic ``GGUF``, a version the ``gguf`` reader handles (2 or 3), a header that parses, and every
    tensor's data inside the file (block sizes from the ``gguf`` package)."""
    size = path.stat().st_size
    if size < 24:
        raise _damaged(path, f"truncated: {size} bytes, too short for a GGUF header", hint)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise _damaged(path, f"not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')", hint)
        order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:  # written big-endian
            order, version = ">", struct.unpack_from(">I", buf, 4)[0]
        if version not in (2, 3):
            raise _damaged(path, f"GGUF version {version}, which the gguf reader cannot read (2 or 3)", hint)
        r = _Reader(buf, order)
        r.pos = 8
        try:
            n_tensors, n_kv = r.take("Q"), r.take("Q")
            alignment = 32
            for _ in range(n_kv):
                key = r.string()
                value = r.value(r.take("I"))
                if key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                dims = [r.take("Q") for _ in range(r.take("I"))]
                tensors.append((name, dims, r.take("I"), r.take("Q")))
        except _Truncated:
            raise _damaged(path, f"truncated: {size} bytes end inside the GGUF header", hint) from None
        except ValueError as e:
            raise _damaged(path, f"damaged: its header does not parse ({e})", hint) from None
        start = -(-r.pos // alignment) * alignment
    end = _tensors_end(path, tensors, hint)
    if end is not None and start + end > size:
        raise _damaged(path, f"truncated: {size} bytes, the header says {start + end}", hint)


def _tensors_end(path: Path, tensors: list, hint: str) -> int | None:
    """The furthest end of any tensor's data, relative to the data section; None without the gguf package."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # pragma: no cover - gguf is a dependency
        return None
    end = 0
    for name, dims, ttype, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            what = f"damaged: tensor {name.decode(errors='replace')} has unknown type {ttype}"
            raise _damaged(path, what, hint) from None
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * type_size)
    return end


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints one line per error)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
