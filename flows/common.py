"""What the stage flows share: the command line, the config check, the workers, Prefect progress
and tables."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Sequence

from sra2.config import Config, ConfigError, load


def parse(stage: str, doc: str, paths: dict[str, tuple[str, str]],
          argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parse ``--params`` and the stage's paths (name: (default, help)); a bad parameter file ends
    the process at once, before Prefect starts and before any data loads, with the offending key
    named: the values (sra2.config), then what needs several sections, the process count or the
    stage (sra2.checks)."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml",
                        help="parameter file: a preset name and overrides (default: params.yaml)")
    for name, (default, text) in paths.items():
        parser.add_argument(f"--{name}", default=default, help=f"{text} (default: {default})")
    args = vars(parser.parse_args(argv))
    try:
        cfg = load(args["params"])
        from sra2 import checks, launch

        plan = launch.plan(cfg.launch)
        checks.check(cfg, stage, plan.nproc_per_node * plan.nnodes, args["params"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return cfg, args


class Progress:
    """A Prefect progress artifact, updated at most every ``every`` seconds."""

    def __init__(self, key: str, description: str, every: float = 5.0):
        from prefect.artifacts import create_progress_artifact

        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.every, self.last = every, 0.0

    def __call__(self, done: int, total: int, *_) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if done >= total or now - self.last >= self.every:
            self.last = now
            update_progress_artifact(self.id, 100.0 * done / total if total else 100.0)


def output_locks(cfg: Config, outputs: Sequence[str]) -> contextlib.AbstractContextManager:
    """The locks of the stage's outputs, taken by the node of launch.node_rank 0 only: the other
    nodes of a multi-node run write the same outputs on purpose."""
    from sra2 import launch, lock

    if launch.plan(cfg.launch).node_rank != 0:
        return contextlib.nullcontext()
    return lock.hold(outputs)


def run_workers(stage: str, work, cfg: Config, args: dict, description: str,
                outputs: Sequence[str] = ()) -> dict | None:
    """Call the library function ``work`` on the processes of ``cfg.launch``
    (torch.distributed.run), showing rank 0's progress in a Prefect artifact; returns rank 0's
    result. ``outputs`` (paths the stage writes)
    are locked first: sra2.lock.OutputBusy, before any worker starts, if another run writes one."""
    from sra2 import launch

    with output_locks(cfg, outputs):
        progress = Progress(f"{stage}-progress", description)

        def on_event(event: dict) -> None:
            if event["kind"] == "progress":
                progress(event["done"], event["total"], event["info"])

        return launch.run(work, cfg, args, on_event)


def table(key: str, values: dict, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"name": k, "value": v} for k, v in values.items() if not isinstance(v, (list, dict))]
    create_table_artifact(rows, key=key, description=description)
