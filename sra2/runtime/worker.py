"""One rank of a stage, as started by :mod:`sra2.runtime.launch`: ``python -m sra2.runtime.worker
<module:function> <config.json> <args as JSON>`` under torch.distributed.run, which calls
``function(cfg, **args, progress=...)`` (a :class:`Progress` on rank 0, None elsewhere).

Workers import no Prefect. They report through the JSON-lines file named by ``SRA2_EVENTS``:
every rank appends ``started`` (its pid), rank 0 appends ``progress`` records and its ``result``;
a failing rank appends its ``error``.

Stopping. Work that can stop cleanly (training) holds :class:`sra2.runtime.stopping.StopSignals`
open: SIGTERM and SIGINT are then recorded instead of ending the process, the work saves what it has
done and raises :class:`sra2.runtime.stopping.Stopped`. The rank appends ``stopped`` and exits 0, so
that torchrun does not restart it (``launch.max_restarts``); the launcher turns the records into the
stage's failure ("stopped at step N ... run the stage again"). Work without a handler ends on
SIGTERM as any process does.

Orphans. Each rank watches the processes that started it (torchrun, and the flow whose pid
``SRA2_PARENT_PID`` holds): when one is gone (killed with SIGKILL, say), the rank sends SIGTERM to
itself, which stops it as above, and SIGKILL after ``SRA2_STOP_GRACE`` seconds. Only the rank's own
pid is ever signalled.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Protocol

from sra2.config.params import Config
from sra2.runtime import procs

PARENT_PID = "SRA2_PARENT_PID"  # the launching process (the flow), watched by every rank
STOP_GRACE = "SRA2_STOP_GRACE"  # seconds a stopping rank may take to save its work


def stop_grace() -> float:
    """How long a stopping stage may take to save (``SRA2_STOP_GRACE``, default 10 minutes)."""
    return float(os.environ.get(STOP_GRACE, "600"))


class Progress(Protocol):
    """The ``progress`` a stage's work calls (rank 0's :meth:`Events.progress`): ``done`` of
    ``total`` units and, where there is more to say, ``info`` (training's losses, checkpoint,
    FID)."""

    def __call__(self, done: int, total: int, info: dict | None = None, /) -> None: ...


class Events:
    """Appends one JSON line per record (one write each, so ranks never interleave a line)."""

    def __init__(self, path: str | None):
        self.path = path

    def emit(self, kind: str, **record) -> None:
        if self.path:
            line = json.dumps({"kind": kind, "time": time.time(), **record}, allow_nan=False) + "\n"
            with open(self.path, "a") as f:
                f.write(line)

    def progress(self, done: int, total: int, info: dict | None = None) -> None:
        self.emit("progress", done=done, total=total, info=info or {})


# --- watching the launching processes

def watch_parents(interval: float = 2.0) -> threading.Thread:
    """Stop this process (SIGTERM to itself, SIGKILL after the grace period) once torchrun or the
    flow that started it is gone, checked every ``interval`` seconds from a daemon thread."""
    pids = {os.getppid()}
    if os.environ.get(PARENT_PID):
        pids.add(int(os.environ[PARENT_PID]))
    tokens = {pid: procs.started_at(pid) for pid in pids}

    def watch() -> None:
        while all(token is not None and procs.started_at(pid) == token
                  for pid, token in tokens.items()):
            time.sleep(interval)
        print(f"worker {os.getpid()}: the process that started it is gone: stopping",
              file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(stop_grace())
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="sra2-watch-parents", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> None:
    # here, not at the top: the flows import this module and need not pay for torch
    from sra2.runtime.stopping import Stopped

    target, config, args = argv
    cfg = Config.model_validate_json(Path(config).read_text())
    rank = int(os.environ.get("RANK", "0"))
    events = Events(os.environ.get("SRA2_EVENTS"))
    events.emit("started", rank=rank, pid=os.getpid())
    watch_parents()
    try:
        module, name = target.split(":")
        work = getattr(importlib.import_module(module), name)
        result = work(cfg, **json.loads(args), progress=events.progress if rank == 0 else None)
    except Stopped as e:
        events.emit("stopped", rank=rank, step=e.step, checkpoint=e.checkpoint,
                    signal=e.signal_name, message=str(e))
        if rank == 0:
            print(f"rank 0: {e}", file=sys.stderr)
        return  # exit 0: torchrun must not restart a rank that was asked to stop
    except BaseException as e:
        events.emit("error", rank=rank, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
        if events.path and isinstance(e, Exception):
            sys.exit(1)  # the launcher shows the error and its traceback: once is enough
        raise
    if rank == 0:
        events.emit("result", result=result)


if __name__ == "__main__":
    main(sys.argv[1:])
