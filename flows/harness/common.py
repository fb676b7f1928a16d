"""What the stage flows share: the command line, the config check, the workers, Prefect progress
and tables (made through flows.harness.monitor, so that a failing Prefect API never fails the
stage)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Sequence

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)
from flows.harness.monitor import current
from flows.harness.pictures import Picture
from flows.harness.progress import Watch
from flows.harness.runner import outcome
from sra2.config.params import Config, ConfigError, load
from sra2.evaluate import protocol


def parse(stage: str, doc: str, paths: dict[str, tuple[str, str]],
          argv: list[str] | None = None,
          more: Callable[[Config], list[str]] | None = None) -> tuple[Config, dict]:
    """Parse ``--params`` and the stage's paths (name: (default, help)); a bad parameter file ends
    the process at once, before Prefect starts and before any data loads, with the offending key
    named: the values (sra2.config.params), then what needs several sections, the process count or
    the stage (sra2.methods.checks), and what ``more`` finds (the stage's own checks)."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.stages.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml",
                        help="parameter file: a preset name and overrides (default: params.yaml)")
    for name, (default, text) in paths.items():
        parser.add_argument(f"--{name}", default=default, help=f"{text} (default: {default})")
    args = vars(parser.parse_args(argv))
    try:
        cfg = load(args["params"])
        from sra2.methods import checks
        from sra2.runtime import launch

        launch.import_torch()  # first: its CPU thread settings count only as torch loads
        plan = launch.plan(cfg.launch)
        checks.check(cfg, stage, plan.nproc_per_node * plan.nnodes, args["params"], more)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if line := protocol.reference_missing(cfg):
        print(f"WARNING: {line}", file=sys.stderr)
    return cfg, args


def output_locks(cfg: Config, outputs: Sequence[str]) -> contextlib.AbstractContextManager:
    """The locks of the stage's outputs, taken by the node of launch.node_rank 0 only: the other
    nodes of a multi-node run write the same outputs on purpose."""
    from sra2.runtime import launch, lock

    if launch.plan(cfg.launch).node_rank != 0:
        return contextlib.nullcontext()
    return lock.hold(outputs)


def run_workers(stage: str, work, cfg: Config, args: dict, description: str,
                outputs: Sequence[str] = (), unit: str = "images",
                pictures: Callable[[list[dict]], list[Picture]] | None = None) -> dict | None:
    """Call the library function ``work`` on the processes of ``cfg.launch``
    (torch.distributed.run), showing rank 0's progress (counted in ``unit``) in the stage's log
    and artifacts (flows.harness.progress.Watch, with ``pictures`` of its rows); returns rank 0's
    result. ``outputs`` (paths the stage writes) are locked first: sra2.runtime.lock.OutputBusy,
    before any worker starts, if another run writes one."""
    from sra2.runtime import launch

    with output_locks(cfg, outputs):
        watch = Watch(current(stage), stage, unit, description, pictures)
        try:
            return launch.run(work, cfg, args, watch, stop=current().cancel)
        finally:
            watch.finish()  # the rows since the last update, even when the workers failed
            outcome().stopped = watch.stopped  # says a SIGTERM'd stage saved (flows.harness.runner)


def table(key: str, values: dict, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"name": k, "value": v} for k, v in values.items() if not isinstance(v, (list, dict))]
    current().call(create_table_artifact, rows, key=key, description=description)


def entry(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` as a command: a failure ends it with one line that says what failed
    and what to do (the exception's first line), after the traceback the stage's log already
    shows (the terminal, and data/logs/<stage>.log)."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 - every failure gets its one line
        headline = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.exit(f"\nerror: {headline}")
