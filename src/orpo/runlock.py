"""One run per output folder: an OS file lock on ``OUT/.orpo.lock``.

``fcntl.flock`` is held by the open file, so the kernel releases it however the run ends, ``kill -9``
and a crash included; there is no stale marker to clean up. The file holds the pid, host, start time
and command of the run holding it, for the refusal message. It is taken before anything else is written
to OUT (before ``--overwrite`` clears anything) and only by the main process of a multi-process run.
Read-only commands (``orpo report``, ``orpo eval``) never take it.

On release the file is unlinked while still locked; a run that opened the old file meanwhile sees, once
it holds its lock, that the path now names another file (or none) and tries again, so two runs can never
both hold "the" lock. NFS: Linux maps flock onto NFS byte-range locks (NFSv4 needs no lockd).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".orpo.lock"


def _describe(path: Path) -> str:
    """Who holds the lock, from what it wrote (it may not have written yet)."""
    info = {}
    for _ in range(20):
        try:
            info = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid"):
            break
        time.sleep(0.05)
    if not info.get("pid"):
        return "another orpo train"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"orpo train (pid {info['pid']}{where}, started {info.get('started', '?')})"


def acquire(out: Path) -> tuple[int, bool]:
    """Lock ``out`` (created if missing); return the locked descriptor and whether ``out`` was created.
    A folder locked by a live run raises :class:`UserError` naming that run."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: output folder is not writable ({e.strerror or e})") from None
    path = out / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{out}: output folder is not writable ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out}: {_describe(path)} is writing this folder; a second run here would "
                            "corrupt it. Wait for it to finish (or stop it), or choose another --output-dir") from None
        except OSError as e:  # a filesystem without locks (some FUSE mounts): run, but say it is unguarded
            print(f"orpo: warning: {out}: this filesystem cannot lock files ({e.strerror or e}); nothing stops a "
                  "second run on this folder", file=sys.stderr, flush=True)
            break
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and unlinked it between our open and our lock
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": shlex.join(["orpo", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "orpo (library call)"}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd, created


def release(out: Path, fd: int, created: bool) -> None:
    out = Path(out)
    try:
        os.unlink(out / LOCK_NAME)
    except OSError:
        pass
    os.close(fd)
    if created:  # a run that failed before writing anything leaves no empty folder behind
        try:
            out.rmdir()
        except OSError:
            pass


@contextmanager
def output_lock(out: Path, enabled: bool = True):
    """Hold the lock on ``out`` for the block (a no-op on processes other than the main one)."""
    if not enabled:
        yield
        return
    fd, created = acquire(out)
    try:
        yield
    finally:
        release(out, fd, created)
