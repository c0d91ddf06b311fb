"""Tokenized pairs on disk, memory-mapped, indexed like a list.

All token ids live in one flat int32 file and an (n, 5) int64 index gives, per pair, the offsets of its
prompt, chosen and rejected parts, the end, and the source row. Building the store streams chunks of
pairs to the files, so a dataset larger than memory never has to be held at once; reading it maps the
files, so only the pages a step touches are loaded.

Image pairs keep their images' references (``orpo.data.images``) beside the ids: ``images.json`` lists
per pair its file paths, or the offsets of its encoded images in ``images.bin``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .templates import TokenizedPair

TOKENS, INDEX, META = "tokens.bin", "index.npy", "meta.json"
IMAGES, IMAGE_BYTES = "images.json", "images.bin"


def _image_refs(entry, blob) -> tuple | None:
    """One pair's entry of images.json -> its references (paths, or bytes read from images.bin)."""
    if entry is None:
        return None
    return tuple(e if isinstance(e, str) else bytes(blob[e[0] : e[0] + e[1]]) for e in entry)


class TokenStore:
    """A read-only sequence of :class:`TokenizedPair`; ``store[i]`` returns views, not copies."""

    def __init__(self, tokens: np.ndarray, index: np.ndarray, name: str, images: list | None = None):
        self.tokens, self.index, self.name = tokens, index, name
        self.images = images  # per pair: its image references, or None (text pairs); None: no image pairs at all

    @classmethod
    def from_pairs(cls, pairs: list[TokenizedPair], name: str = "pairs") -> "TokenStore":
        parts, rows = [], []
        off = 0
        for i, p in enumerate(pairs):
            lp, lc, lr = len(p.prompt), len(p.chosen), len(p.rejected)
            rows.append((off, off + lp, off + lp + lc, off + lp + lc + lr, i))
            parts += [p.prompt, p.chosen, p.rejected]
            off += lp + lc + lr
        tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        images = [p.images for p in pairs] if any(p.images for p in pairs) else None
        return cls(tokens, np.asarray(rows, dtype=np.int64).reshape(-1, 5), name, images)

    @classmethod
    def open(cls, folder: Path, name: str) -> "TokenStore":
        index = np.load(folder / INDEX)
        size = os.path.getsize(folder / TOKENS)
        tokens = np.memmap(folder / TOKENS, dtype=np.int32, mode="r") if size else np.zeros(0, np.int32)
        images = None
        if (folder / IMAGES).is_file():
            entries = json.loads((folder / IMAGES).read_text())
            blob_size = os.path.getsize(folder / IMAGE_BYTES) if (folder / IMAGE_BYTES).is_file() else 0
            blob = np.memmap(folder / IMAGE_BYTES, dtype=np.uint8, mode="r") if blob_size else b""
            images = [_image_refs(e, blob) for e in entries]
        return cls(tokens, index, name, images)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        p0, c0, r0, end, row = self.index[i]
        t = self.tokens
        images = self.images[i] if self.images is not None else None
        return TokenizedPair(t[p0:c0], t[c0:r0], t[r0:end], f"{self.name}: row {row + 1}", images)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # Vectorised lengths, for step totals without touching the tokens.
    @property
    def prompt_lens(self) -> np.ndarray:
        return self.index[:, 1] - self.index[:, 0]

    @property
    def chosen_lens(self) -> np.ndarray:
        return self.index[:, 2] - self.index[:, 1]

    @property
    def rejected_lens(self) -> np.ndarray:
        return self.index[:, 3] - self.index[:, 2]

    def pair_tokens(self, idx) -> int:
        """prompt+chosen plus prompt+rejected tokens of the pairs ``idx``."""
        return int((2 * self.prompt_lens[idx] + self.chosen_lens[idx] + self.rejected_lens[idx]).sum())

    def nll_tokens(self, idx, prompt_in_nll: bool) -> int:
        n = int(self.chosen_lens[idx].sum())
        if prompt_in_nll:
            n += int((self.prompt_lens[idx] - 1).sum())
        return n


class StoreWriter:
    """Append tokenized pairs chunk by chunk to ``folder``; ``close`` writes the index and metadata."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(folder / TOKENS, "wb")
        self._rows: list[tuple[int, int, int, int, int]] = []
        self._off = 0
        self._images: list = []  # per pair: None, or [path or (offset, length) in images.bin]
        self._blob = None
        self._blob_off = 0

    def add(self, pair: TokenizedPair, row: int) -> None:
        lp, lc, lr = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        for part in (pair.prompt, pair.chosen, pair.rejected):
            self._fh.write(np.ascontiguousarray(part, dtype=np.int32).tobytes())
        o = self._off
        self._rows.append((o, o + lp, o + lp + lc, o + lp + lc + lr, row))
        self._off += lp + lc + lr
        entry = None
        if pair.images:
            entry = []
            for ref in pair.images:
                if isinstance(ref, str):
                    entry.append(ref)
                    continue
                if self._blob is None:
                    self._blob = open(self.folder / IMAGE_BYTES, "wb")
                self._blob.write(ref)
                entry.append((self._blob_off, len(ref)))
                self._blob_off += len(ref)
        self._images.append(entry)

    def close(self, meta: dict) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        np.save(self.folder / INDEX, np.asarray(self._rows, dtype=np.int64).reshape(-1, 5))
        if self._blob is not None:
            self._blob.close()
        if any(e is not None for e in self._images):
            (self.folder / IMAGES).write_text(json.dumps(self._images))
        (self.folder / META).write_text(json.dumps(meta))

    def abort(self) -> None:
        for fh in (self._fh, self._blob):
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass
