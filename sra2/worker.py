"""One rank of a stage, as started by :mod:`sra2.launch`: ``python -m sra2.worker
<module:function> <config.json> <args as JSON>`` under torch.distributed.run, which calls
``function(cfg, **args, progress=...)``.

Workers import no Prefect. They report through the JSON-lines file named by ``SRA2_EVENTS``:
rank 0 appends ``progress`` records and its ``result``; a failing rank appends its ``error``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from sra2.config import Config


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


def main(argv: list[str]) -> None:
    target, config, args = argv
    cfg = Config.model_validate_json(Path(config).read_text())
    rank = int(os.environ.get("RANK", "0"))
    events = Events(os.environ.get("SRA2_EVENTS"))
    try:
        module, name = target.split(":")
        work = getattr(importlib.import_module(module), name)
        result = work(cfg, **json.loads(args), progress=events.progress if rank == 0 else None)
    except BaseException as e:
        events.emit("error", rank=rank, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
        raise
    if rank == 0:
        events.emit("result", result=result)


if __name__ == "__main__":
    main(sys.argv[1:])
