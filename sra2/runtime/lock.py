"""File locks, ``fcntl.flock``: the kernel drops one when its holder exits, however it exits
(kill -9 included), so a lock never outlives its process; a lock file left behind by a crash is
free and the next run simply takes it.

:class:`FileLock` is the primitive: shared or exclusive, taken and released at will (one builder,
many readers: the node-local latent copy). Only the process that opens it holds it: the programs
it starts do not inherit it.

:func:`hold` gives one writer per output: an exclusive lock on a file beside each output,
``<out>.lock``. The holder writes who it is into the file (pid, host, command, since when), so that
a refused run can say which process to wait for or stop. A holder killed with -9 frees the output
even if its workers still run for a while.

    with hold(["data/latents"]):
        ...  # write data/latents
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from sra2.runtime.atomic import make_folder

SHARED, EXCLUSIVE = fcntl.LOCK_SH, fcntl.LOCK_EX


class FileLock:
    """``flock`` on ``path`` (made if missing), through a descriptor of its own: two FileLocks of
    one file exclude each other as two processes do. ``with`` closes it, which lets go."""

    def __init__(self, path: Path):
        make_folder(path.parent)
        self.path = path
        # O_CLOEXEC: a program this process starts must not keep the lock after it ends
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def take(self, mode: int, wait: bool = True) -> bool:
        """Hold the lock in ``mode`` (SHARED or EXCLUSIVE; a held lock changes mode, not
        atomically); False, at once, where another holder is in the way and not ``wait``."""
        try:
            fcntl.flock(self.fd, mode | (0 if wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self, mode: int) -> Iterator[None]:
        """Hold the lock in ``mode`` (waiting for it) for the body of the with-statement."""
        self.take(mode)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        """Let go of the lock and of its descriptor; closing twice does nothing."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputBusy(RuntimeError):
    """Another process holds the lock of an output this run would write."""


def lock_path(out: str | Path) -> Path:
    out = Path(out).absolute()  # "." has no name to add .lock to; its absolute path has
    return out.with_name(out.name + ".lock")


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.orig_argv),
            "since": datetime.now().astimezone().isoformat(timespec="seconds")}


def holder(path: Path, wait: float = 1.0) -> dict | None:
    """What the holder of the lock file ``path`` wrote about itself; None if it has not written
    within ``wait`` seconds (it writes right after it takes the lock)."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(path.read_text())
            if isinstance(info, dict) and "pid" in info:
                return info
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _describe(info: dict | None) -> str:
    if info is None:
        return "another process (it has not recorded itself yet)"
    return (f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')} "
            f"(command: {info.get('command')})")


def _take(path: Path) -> FileLock | None:
    """The exclusive lock of ``path``, or None while another process holds it."""
    while True:
        lock = FileLock(path)
        if not lock.take(EXCLUSIVE, wait=False):
            lock.close()
            return None
        # a holder removes its file before it lets go; if it did so between our open and our
        # flock, we hold a lock on a removed file that guards nothing: open the path again
        with contextlib.suppress(FileNotFoundError):
            now, mine = os.stat(path), os.fstat(lock.fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                return lock
        lock.close()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    path = lock_path(out)
    lock = _take(path)
    if lock is None:
        raise OutputBusy(f"{out} is being written by {_describe(holder(path))}; a second "
                         f"writer would corrupt it: wait for that run to end or stop it "
                         f"(lock file {path})")
    with lock:
        try:
            os.ftruncate(lock.fd, 0)
            os.pwrite(lock.fd, (json.dumps(_me()) + "\n").encode(), 0)
            yield
        finally:
            # removed while still held, so that no run can lock this file after us (see _take)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def hold(outputs: Iterable[str | Path]) -> Iterator[None]:
    """Hold the locks of ``outputs`` for the body of the with-statement; raises OutputBusy at
    once, holding none of them, if another process holds any."""
    with contextlib.ExitStack() as stack:
        # one order for every run, and one lock per output however it is spelled
        for out in sorted({Path(o).absolute() for o in outputs}):
            stack.enter_context(_locked(out))
        yield
