"""What a checkpoint holds, recorded when it is written and checked before a resume.

``manifest.json`` inside each checkpoint lists every file with its size and CRC-32:

    {"format": 1, "checksum": "crc32", "files": {"trainable.safetensors": {"size": 123, "crc32": "89abcdef"}, ...}}

It is written into the temporary folder after every process has written its files and before the
fsync and rename, so a complete checkpoint always has one. CRC-32 runs at ~2.5 GB/s on one core
(blake2b at ~0.5), so checking a 10 GB full fine-tune checkpoint costs seconds, against the minutes of
training a damaged one would cost. It catches a torn copy, a truncated file and flipped bits; it is
not a defence against tampering (weights load from safetensors for that).

Checkpoints of an older orpo have no manifest; for them :func:`verify` checks what the files say about
themselves: a safetensors header must parse and its tensors must end where the file does, and a torch
``.pt``/``.bin`` file is a zip archive whose members carry their own CRC-32. Stdlib only.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 16 << 20


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> Path:
    """Record the size and CRC-32 of every file under ``folder`` in ``folder/manifest.json``."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "crc32": crc32_of(p)} for p in _files(folder)}
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": 1, "checksum": "crc32", "files": files}, indent=1))
    return path


def verify(folder: Path) -> list[str]:
    """What is wrong with checkpoint ``folder``, one short phrase per damaged file; empty if intact."""
    folder = Path(folder)
    problems = []
    try:
        json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        problems.append("state.json unreadable")
    mpath = folder / MANIFEST
    if not mpath.exists():
        return problems + _verify_structure(folder)
    try:
        files = json.loads(mpath.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return problems + [f"{MANIFEST} unreadable"]
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} missing")
            continue
        size = p.stat().st_size
        if size != rec.get("size"):
            problems.append(f"{rel} is {size:,} bytes, expected {rec.get('size'):,}")
        elif crc32_of(p) != rec.get("crc32"):
            problems.append(f"{rel} fails its checksum")
    return problems


def _verify_structure(folder: Path) -> list[str]:
    """Checks for a checkpoint written before manifests existed."""
    problems = []
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        if p.suffix == ".safetensors":
            why = safetensors_problem(p)
        elif p.suffix in (".pt", ".bin"):
            why = torch_zip_problem(p)
        else:
            why = None
        if why:
            problems.append(f"{rel} {why}")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return f"is cut short ({size:,} bytes, its header alone needs {n + 8:,})"
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return "has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is {size:,} bytes, its header says {expected:,}"
    return None


def torch_zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive (since torch 1.6); each member carries a CRC-32."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "is not a complete torch file"
    return f"fails its checksum (member {bad})" if bad else None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-N`` (out of the resume and pruning order, kept for
    a look)."""
    folder = Path(folder)
    dest = folder.with_name("damaged-" + folder.name)
    k = 1
    while dest.exists():
        k += 1
        dest = folder.with_name(f"damaged-{folder.name}.{k}")
    os.replace(folder, dest)
    return dest
