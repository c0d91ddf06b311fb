"""A failure one process meets ends every process of a multi-process run, with one line, at once.

Without this, a refused lock, a failed final write, bad data or a damaged model file is known only to
the process that met it: the others wait in a barrier (or in the process group's start-up) until the
launcher notices, and die there with a traceback of their own ("Connection closed by peer"). On several
machines, where each launcher only watches its own processes, they wait for the collective timeout.

The launcher's key-value store carries the news. torchrun and ``accelerate launch`` (which runs
torchrun's elastic agent) start a ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` before any worker and
tell the workers so (``TORCHELASTIC_USE_AGENT_STORE=True``); a client connects to it before the
process group exists, so even a lock refused before Accelerate starts is heard. Without an agent store
(a launcher that sets only ``RANK``/``WORLD_SIZE``/``MASTER_*``, whose store the main process hosts
inside ``init_process_group``), :meth:`Shared.connect` is called again once the process group exists,
and failures from then on are shared. The keys live under ``orpo/failure/<run id>/<restart>/<call>/``:
the agent's own keys are ``torchelastic/...``, the rendezvous's ``torch.rendezvous...`` or the run id's
prefix, the process group's ``default_pg/...``; the restart count and the number of ``train`` calls in
this process keep a failure of one attempt from ending the next.

The protocol (each key written once; ``compare_set`` decides races):

- the process that meets a failure (:meth:`Shared.fail`) publishes its line under ``failure``;
- a watcher thread in every process polls that key every ``POLL_S``; a process that sees another's
  failure stops: the main process prints the line (``printer``), each stops writing to stderr (so
  nothing it was doing leaves a traceback once the others are gone), counts itself in ``stopped``,
  waits until the line is out and the failing process has exited (``ended``, set at its exit), and ends
  with ``os._exit(2)`` (the status of a UserError), wherever its main thread was waiting. So the
  launcher sees the failing process end first and names it as the run's root cause, and never kills
  it (SIGTERM) before it has said why;
- the line is printed once: by the main process where it is alive, else, after ``PRINT_WAIT_S``, by the
  process that met it; the CLI does not print it again (``UserError.printed``);
- the failing process returns only once every process has stopped (or ``STOP_WAIT_S`` passed: a process
  that is already dead never counts itself), so none of them meets a closed connection first.

A failure every process already agreed on in a collective (a checkpoint write: ``checkpoint`` reduces
the outcome; DeepSpeed's non-finite step) ends the other processes with ``SystemExit(2)`` and the main
process with the line: those take part as stopped processes and publish nothing. Checkpoints are
written to a temporary folder and renamed, so a process ended anywhere loses nothing already written.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

from ..errors import UserError

POLL_S = 0.5  # how often each process looks for another's failure
PRINT_WAIT_S = 5.0  # how long a failing process waits for the main process to print its line
STOP_WAIT_S = 20.0  # how long a failing process waits for the others to stop (one may still be starting)
CONNECT_S = 10.0  # how long to try to reach the launcher's store
END_WAIT_S = 15.0  # how long a stopped process waits for the failing one to exit (it may be dead already)
EXIT_GRACE_S = 3.0  # how long the others outlive the failing process's exit (its interpreter's shutdown)

_calls = 0  # train() calls in this process: each gets its own keys


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def shared_failures():
    """Around one ``train`` call: with several processes, a UserError here is heard by all of them (and
    one heard from another process ends this one). The watcher stops when the call returns."""
    global _calls
    _calls += 1
    if world_size() <= 1:
        yield None
        return
    shared = Shared(_calls)
    shared.connect(before_process_group=True)
    try:
        yield shared
    except UserError as e:
        shared.fail(e)
        raise
    except SystemExit as e:
        if e.code not in (0, None) and shared.rank != 0:
            shared.agreed()
        raise
    finally:
        shared.close()


class Shared:
    """This process's view of the run's shared failure keys, and the thread that watches them."""

    def __init__(self, call: int):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = world_size()
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"orpo/failure/{run}/{restart}/{call}/"
        self.store = None
        self.lock = threading.Lock()  # one store operation at a time (the watcher and the main thread)
        self.stopping = threading.Lock()  # taken by whichever thread ends this process
        self.done = threading.Event()
        self.thread = None

    # --- the store --------------------------------------------------------------------------------

    def connect(self, before_process_group: bool = False) -> None:
        """Reach the launcher's store and start watching. Before the process group exists only an
        agent's store is there to reach; otherwise call again once it exists."""
        if self.store is not None:
            return
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if not addr or not port or (before_process_group and not agent):
            return
        try:
            from torch.distributed import TCPStore

            self.store = TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=CONNECT_S))
        except Exception:  # noqa: BLE001 - no store: failures end the run as they did before, via the launcher
            self.store = None
            return
        self.thread = threading.Thread(target=self._watch, name="orpo-failures", daemon=True)
        self.thread.start()

    def _op(self, name: str, *args):
        with self.lock:
            return getattr(self.store, name)(*args)

    def _has(self, key: str) -> bool:
        return bool(self._op("check", [self.prefix + key]))

    def _claim(self, key: str, value: str) -> bool:
        """Set ``key`` to ``value`` unless it is set already; True if this call set it."""
        return self._op("compare_set", self.prefix + key, "", value) == value.encode()

    def _wait(self, key: str, seconds: float, count: int | None = None) -> bool:
        """Until ``key`` is set (or, with ``count``, has reached it), at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            if count is None and self._has(key):
                return True
            if count is not None and self._op("add", self.prefix + key, 0) >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    # --- this process's failure -------------------------------------------------------------------

    def fail(self, error: UserError) -> None:
        """This process met ``error``: tell the others, print the line unless the main process does,
        and return once every process has stopped. The caller re-raises ``error``."""
        if self.store is None or not self.stopping.acquire(blocking=False):
            self._park()
            return
        try:
            line = str(error)
            self._claim("failure", json.dumps({"rank": self.rank, "line": line}))
            self._op("add", self.prefix + "stopped", 1)
            if self.rank == 0 or not self._wait("printer", PRINT_WAIT_S):
                if self._claim("printer", str(self.rank)):
                    say(line)
                    error.printed = True
                    self._op("set", self.prefix + "printed", "1")
            if not getattr(error, "printed", False):
                error.printed = True  # another process printed the line
            self._wait("stopped", STOP_WAIT_S, count=self.world)
            atexit.register(self._ended)
        except Exception:  # noqa: BLE001 - the store is gone: end as before, the line printed here
            pass

    def _ended(self) -> None:
        try:
            self._op("set", self.prefix + "ended", "1")
        except Exception:  # noqa: BLE001
            pass

    def agreed(self) -> None:
        """A non-main process ends on a failure every process knows (SystemExit): stop with the others,
        once the main process has printed the line."""
        if self.store is None or not self.stopping.acquire(blocking=False):
            self._park()
            return
        try:
            self._op("add", self.prefix + "stopped", 1)
            self._outlive()
        except Exception:  # noqa: BLE001
            pass

    def _outlive(self) -> None:
        """Until the line is out and the failing process has exited (at most ~26 s in all)."""
        self._wait("printed", PRINT_WAIT_S + 2)
        if self._wait("ended", END_WAIT_S):
            time.sleep(EXIT_GRACE_S)

    def _park(self) -> None:
        """The watcher is ending this process: let it."""
        if self.thread is not None and self.stopping.locked() and threading.current_thread() is not self.thread:
            time.sleep(STOP_WAIT_S + PRINT_WAIT_S)

    # --- another process's failure ----------------------------------------------------------------

    def _watch(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                if not self._has("failure"):
                    continue
                found = json.loads(self._op("get", self.prefix + "failure"))
            except Exception:  # noqa: BLE001 - the store is gone (the launcher is ending the run)
                return
            if found.get("rank") == self.rank or not self.stopping.acquire(blocking=False):
                return  # this process's own failure, handled by its main thread
            self._stop(found.get("line", "another process failed"))

    def _stop(self, line: str) -> None:
        try:
            if self.rank == 0 and self._claim("printer", "0"):
                say(line)
                self._op("set", self.prefix + "printed", "1")
            silence_stderr()
            atexit.register(os._exit, UserError.exit_code)  # should the main thread end first (its wait failed)
            self._op("add", self.prefix + "stopped", 1)
            self._outlive()
        except Exception:  # noqa: BLE001 - whatever the store does now, this process ends
            pass
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(UserError.exit_code)

    def close(self) -> None:
        self.done.set()


def say(line: str) -> None:
    print(f"orpo: error: {line}", file=sys.stderr, flush=True)


def silence_stderr() -> None:
    """Nothing this process does from here on reaches stderr (its waits fail once the others are gone)."""
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
