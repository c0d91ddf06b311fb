"""Writing a run's files on a disk that may fail: full, over quota, read-only, or erroring.

A failed write must end the run with one line naming the file and the cause, and leave nothing half
written. Three things make that hard, and are handled here:

- ``torch.save`` turns the ``OSError`` of its file into ``RuntimeError: [enforce fail at
  inline_container.cc:672] . unexpected pos ...``, and safetensors into ``SafetensorError ... (os error
  28)``. :func:`save_torch` records the real ``OSError`` on the way; :func:`cause_of` reads the others.
- An append cut short leaves half a JSON line: :func:`append_line` truncates the file back.
- A whole file written in place can be left half written: :func:`write_text` writes a temporary file
  and renames it.

Every failure becomes :class:`WriteFailed` (path, cause, what was being written); ``train`` adds the
resume command and turns it into the one-line :class:`UserError`. Imports nothing heavy (the report
module uses it beside a live run); torch is imported only inside :func:`save_torch`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

# errno values that mean "the disk would not take it", as opposed to a bug in orpo
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM})
# Room left beyond an estimate before a save (filesystem metadata, a tokenizer, the manifest).
MARGIN = 256 << 10


class WriteFailed(Exception):
    """``path`` could not be written because of ``cause``; ``what`` names it for the message."""

    def __init__(self, path: Path | str, cause: str, what: str = ""):
        super().__init__(f"{path}: could not write {what or Path(path).name} ({cause})")
        self.path, self.cause, self.what = Path(path), cause, what or Path(path).name


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: Path) -> Path:
    p = _existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def cause_of(exc: BaseException, where: Path | str) -> str | None:
    """The disk-level cause of ``exc`` raised while writing under ``where``, or None when it is not a
    write fault (then it is a bug and keeps its traceback)."""
    if isinstance(exc, WriteFailed):
        return exc.cause
    if isinstance(exc, OSError):
        return exc.strerror or os.strerror(exc.errno or errno.EIO)
    text = str(exc)
    m = re.search(r"os error (\d+)", text)  # safetensors (Rust): "... No space left on device (os error 28)"
    if m:
        return os.strerror(int(m.group(1)))
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        # torch's zip writer hides the OSError; on a full disk little or nothing is left
        free = free_bytes(where)
        if free < MARGIN:
            return f"{os.strerror(errno.ENOSPC)}, {human(free)} free on {mount_of(where)}"
        return f"the write failed: {text.splitlines()[0][:120]}"
    return None


@contextmanager
def writing(path: Path | str, what: str = "", cleanup: tuple = ()):
    """Turn a failed write inside the block into :class:`WriteFailed`, after removing ``cleanup``
    (the temporaries the block may have half written)."""
    try:
        yield
    except WriteFailed:
        _remove(cleanup)
        raise
    except Exception as e:  # noqa: BLE001 - only write faults are converted, the rest re-raised
        cause = cause_of(e, path)
        if cause is None:
            raise
        _remove(cleanup)
        raise WriteFailed(path, cause, what) from None


def _remove(paths) -> None:
    for p in paths:
        p = Path(p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            try:
                p.unlink()
            except OSError:
                pass


def check_free(path: Path | str, need: int, what: str) -> None:
    """Refuse, before writing anything, a save of about ``need`` bytes that the disk cannot hold."""
    if need <= 0:
        return
    free, want = free_bytes(path), need * 1.05 + MARGIN
    if free < want:
        raise WriteFailed(path, f"it needs about {human(need)} ({human(want)} with a safety margin) but only "
                                f"{human(free)} is free on {mount_of(path)}", what)


def append_line(path: Path, line: str) -> None:
    """Append one line; if the write fails, cut the file back to where it was (no half row)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = None
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
    except OSError as e:
        try:
            if size is None:
                path.unlink()
            else:
                os.truncate(path, size)
        except OSError:
            pass
        raise WriteFailed(path, cause_of(e, path) or str(e), path.name) from None


def write_text(path: Path, text: str, what: str = "") -> None:
    """Write a whole file atomically: a temporary beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, what, cleanup=(tmp,)):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


class _RecordingFile:
    """A file object for ``torch.save`` that keeps the ``OSError`` torch would otherwise hide."""

    def __init__(self, fh, name: str):
        self.fh, self.name, self.error = fh, name, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.fh.flush()

    def __str__(self):
        return self.name


def save_torch(obj, path: Path | str) -> None:
    """``torch.save`` that raises the real ``OSError`` (no space, quota, ...) of a failed write."""
    import torch

    rec = None
    try:
        with open(path, "wb") as fh:
            rec = _RecordingFile(fh, str(path))
            torch.save(obj, rec)
    except RuntimeError:
        if rec is not None and rec.error is not None:
            raise rec.error from None
        raise


def remove_temporaries(out: Path) -> None:
    """The hidden temporaries a run writes (``.tmp-*`` folders, ``.*.tmp`` files), in OUT and its
    checkpoints folder: left by a failed write, they only fill the disk."""
    out = Path(out)
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            _remove([p for p in d.iterdir() if p.name.startswith(".tmp-") or
                     (p.name.startswith(".") and p.name.endswith(".tmp"))])
