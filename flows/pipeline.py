"""The pipeline as Prefect flows that drive DVC, so that one run shows, starts and stops it all.

  sra2 pipeline [TARGET...] [--force]   `dvc repro` as one sra2-pipeline run, from a terminal
  sra2 serve [--limit N]                serve the deployments: Run and Retry from the Prefect UI

The flows: ``sra2-pipeline`` (`dvc repro`), ``sra2-experiment`` (`dvc exp run -S ...`) and
``sra2-table`` (a paper table's rows as queued experiments, run and then shown). Each stage DVC
runs becomes a subflow run of the flow's run (flows.harness.runner.call_flow reads
SRA2_PARENT_FLOW_RUN), so the run graph shows the stages in order and a stage's page links back to
its pipeline.

Stopping: a Cancel of the flow run cancels its running stage runs, which save and stop as a
Cancel of the stage does, and no further stage starts under it (flows.harness.runner); SIGTERM or
Ctrl-C reaches the stages as SIGTERM, which saves too. DVC stops at the stage that did not finish,
and the next run (a Retry from the UI for a served run) resumes there.

Served with Prefect's own ``serve`` (no work pool, no worker): the runs execute on the machine that
serves, in this repository, where the GPUs, data and DVC cache are; a process work pool would add a
pool and a worker to start and keep alive for the same effect.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)

# isort: split
from prefect import flow
from prefect.context import FlowRunContext

from flows.harness.monitor import close_current, current
from flows.harness.runner import PARENT_RUN, cancelled, cancelled_run, children
from sra2.runtime import procs

STOP_WAIT = 25.0  # seconds the stages get to save after SIGTERM (the runner kills at 30 s)


# --- running a DVC command under this flow run ---------------------------------------------------

def cancel_children(run_id: str) -> list[str]:
    """Ask the running stage runs of ``run_id`` to stop (Cancelling): each stage sees it within a
    second, saves and ends Cancelled. Returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    runs = children(run_id)
    with get_client(sync_client=True) as client:
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(message="the pipeline run was cancelled"),
                                      force=True)
    return [run.name for run in runs]


def end_stray_nodes(run_id: str) -> None:
    """The stage nodes of ``run_id`` still Running once DVC has ended belong to stage processes
    that were killed before they could say how they ended: mark them Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        stray = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
        for node in stray:
            client.set_task_run_state(node.id, Crashed(
                message="its stage process ended without saying how"), force=True)


def stop_stages(proc: subprocess.Popen) -> None:
    """SIGTERM to the processes DVC runs (its session, DVC itself aside: it would die before the
    stage has saved), then wait up to STOP_WAIT seconds for DVC to end."""
    for pid in procs.session(proc.pid):
        if pid != proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_WAIT)


def dvc_env(run_id: str) -> dict[str, str]:
    """The stages' environment: this run is their parent and names their pipeline tag; they use
    this flow's API; the variables Prefect set for this process alone (its flow run id) go."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__")}
    env.update({PARENT_RUN: run_id, "SRA2_PIPELINE_RUN": run_id,
                "PREFECT_API_URL": PREFECT_API_URL.value() or "",
                "PREFECT_UI_URL": PREFECT_UI_URL.value() or ""})
    return env


def follow(path: Path, done: threading.Event,
           keep: int = 30) -> tuple[threading.Thread, collections.deque]:
    """Copy what is written to ``path`` to this process's output as it comes (the terminal, or the
    serve log), from a thread, to its end once ``done`` is set; returns the thread and the deque
    of the last ``keep`` lines. DVC writes to the file, not a pipe: if this process dies, the
    stages it runs can still print while they save."""
    last: collections.deque = collections.deque(maxlen=keep)

    def copy() -> None:
        with open(path, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    last.append(line.rstrip())
                elif done.is_set():
                    break
                else:
                    sys.stdout.flush()
                    time.sleep(0.2)

    thread = threading.Thread(target=copy, name="sra2-dvc-output", daemon=True)
    thread.start()
    return thread, last


def run_dvc(argv: list[str]):
    """Run ``argv`` here with this flow run as its stages' parent; returns None once it succeeded,
    a Cancelled state if the run was cancelled, and raises if it failed (with its last lines)."""
    mon = current()
    run_id = str(FlowRunContext.get().flow_run.id)
    mon.say(f"$ {' '.join(argv)}")
    end_watch, ended = mon.watch_cancel(), threading.Event()
    output = mon.path.with_suffix(".out")  # beside the flow's log: data/logs/<flow>.out
    with open(output, "w") as out:
        proc = subprocess.Popen(argv, env=dvc_env(run_id), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    reader, last = follow(output, ended)
    stopping: list[str] | None = None
    try:
        while proc.poll() is None:
            if stopping is None and mon.cancel.wait(1.0):
                stopping = mon.call(cancel_children, run_id) or []
                mon.say(f"cancelled: stopping {', '.join(stopping) or 'nothing running'}",
                        logging.WARNING)
            elif stopping is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
    except BaseException:  # SIGTERM (Prefect raises it here), Ctrl-C: the stages save first
        mon.say("stopping: the running stage saves, then DVC stops", logging.WARNING)
        if stopping is None and mon.call(cancelled_run, run_id):  # how the runner ends a Cancel
            mon.call(cancel_children, run_id)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_WAIT)
        else:
            stop_stages(proc)
        raise
    finally:
        end_watch()
        ended.set()
        reader.join(10)
        mon.call(end_stray_nodes, run_id)
    if stopping is not None:
        return cancelled(f"cancelled; {', '.join(stopping) or 'no stage'} saved and stopped: run "
                         "again (Retry) to resume")
    if proc.returncode:
        tail = "\n".join(last)
        raise RuntimeError(f"{' '.join(argv)} failed (exit code {proc.returncode}); run again "
                           f"(Retry) to resume. Its last lines:\n{tail}")
    mon.say(f"{' '.join(argv[:3])} finished")
    return None


def watched(fn):
    """A flow body with a monitor of its own (log in data/logs/<flow>.log), closed after."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        close_current()
        current(fn.__name__.removesuffix("_flow"))
        try:
            return fn(*args, **kwargs)
        finally:
            close_current()

    return body


# --- the flows -----------------------------------------------------------------------------------

@flow(name="sra2-pipeline", log_prints=True)
@watched
def pipeline_flow(targets: tuple[str, ...] = (), force: bool = False):
    """`dvc repro`, each stage a subflow run of this run; a Retry resumes where it stopped.

    Args:
        targets: stages to bring up to date, e.g. train (all when empty)
        force: run them even when they are up to date
    """
    return run_dvc(["dvc", "repro", *(["--force"] if force else []), *targets])


@flow(name="sra2-experiment", log_prints=True)
@watched
def experiment_flow(overrides: list[str], name: str = "", targets: tuple[str, ...] = ()):
    """`dvc exp run` with parameter overrides, each stage a subflow run of this run.

    Args:
        overrides: one `key=value` per item, as `dvc exp run -S` takes it, e.g. train.steps=300,
            align.weight=0.5, preset=sit-b2 (checked before DVC starts)
        name: the experiment's name (DVC picks one when empty)
        targets: the stages to run, e.g. train (all when empty)
    """
    check_overrides(overrides)
    named = ["-n", name] if name else []
    # ++: the key is set whether or not params.yaml lists it (presets hold most keys)
    return run_dvc(["dvc", "exp", "run", *named,
                    *[a for o in overrides for a in ("-S", "++" + o.lstrip("+"))], *targets])


@flow(name="sra2-table", log_prints=True)
@watched
def table_flow(table: Literal[1, 3, "t2i"] = 1, preset: str = "sit-b2", rows: tuple[str, ...] = (),
               overrides: tuple[str, ...] = (), jobs: int = 1):
    """A paper table as queued experiments, one per row; the table with our FIDs beside the
    paper's is the run's artifact at the end.

    Args:
        table: 1 (the SRA 2 ablations), 3 (vanilla, SRA, REPA, SRA 2, SRA 2 + REPA) or t2i
            (vanilla MMDiT and MMDiT + SRA 2 on MS-COCO: preset mmdit-coco)
        preset: the preset every row runs, e.g. sit-b2
        rows: the rows to run, e.g. vanilla, layer2 (all when empty)
        overrides: `key=value` items added to every row, e.g. train.steps=100000
        jobs: experiments run at once
    """
    from prefect.artifacts import create_markdown_artifact

    table1 = [sys.executable, "-m", "flows.tables", "--table", str(table)]
    picked = ["--rows", *rows] if rows else []
    queued = [*table1, "queue", "--preset", preset, *picked, "--start", "-j", str(jobs),
              *[a for o in overrides for a in ("-S", o)]]
    ended = run_dvc(queued) or wait_for_queue()
    shown = subprocess.run([*table1, "show", *picked], capture_output=True, text=True)
    if shown.returncode == 0:
        current().call(create_markdown_artifact, shown.stdout, key=f"table{table}",
                       description=f"Table {table}: our FIDs beside the paper's")
    return ended


def wait_for_queue(every: float = 30.0):
    """Wait until DVC's queue has nothing queued or running; a Cancel removes what is still
    queued and stops the running experiments' stages (they save), then waits for them."""
    mon = current()
    run_id = str(FlowRunContext.get().flow_run.id)
    end_watch = mon.watch_cancel()
    try:
        while queue_busy():
            if mon.cancel.wait(every):
                subprocess.run(["dvc", "queue", "remove", "--queued"], check=False)
                stopped = mon.call(cancel_children, run_id) or []
                while queue_busy():
                    time.sleep(5.0)
                return cancelled(f"cancelled; queued rows removed, {', '.join(stopped) or 'none'} "
                                 "saved and stopped")
    finally:
        end_watch()
    return None


def queue_busy() -> bool:
    status = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout
    return any(state in status for state in ("Queued", "Running"))


def check_overrides(overrides: list[str]) -> None:
    """Resolve params.yaml with the overrides, so that a bad key or value fails the run at once,
    named, before DVC starts anything."""
    import yaml

    from sra2.config.params import ConfigError
    from sra2.methods import checks, registry

    try:
        checks.with_overrides(yaml.safe_load(Path("params.yaml").read_text()) or {}, overrides,
                              "the overrides", registry.problems)
    except (ConfigError, ValueError) as e:
        raise ValueError(f"overrides {overrides}: {e}") from None


# --- the commands --------------------------------------------------------------------------------

def at_repository_root() -> None:
    if not Path("dvc.yaml").is_file():
        raise SystemExit(f"error: no dvc.yaml in {Path.cwd()}: run this at the repository root")


def pipeline_main(argv: list[str] | None = None) -> None:
    """``sra2 pipeline``: the pipeline flow in this process, against PREFECT_API_URL or a temporary
    server that ends with it (its runs stay in Prefect's database: browse them later with
    `prefect server start`)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.harness import server

    parser = argparse.ArgumentParser(prog="sra2 pipeline", description=pipeline_flow.__doc__)
    parser.add_argument("targets", nargs="*", help="stages to bring up to date (default: all)")
    parser.add_argument("--force", action="store_true", help="run them even when up to date")
    args = parser.parse_args(argv)
    at_repository_root()
    with contextlib.ExitStack() as stack:
        started = stack.enter_context(server.for_this_process())
        if started:
            stack.enter_context(temporary_settings({PREFECT_API_URL: started[0],
                                                    PREFECT_UI_URL: ""}))
        pipeline_flow(targets=args.targets, force=args.force)


def serve_main(argv: list[str] | None = None) -> None:
    """``sra2 serve``: serve the three flows as deployments until stopped."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    parser = argparse.ArgumentParser(prog="sra2 serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1,
                        help="runs at once (default 1: DVC runs one pipeline per workspace)")
    args = parser.parse_args(argv)
    at_repository_root()
    if not PREFECT_API_URL.value():
        raise SystemExit("error: PREFECT_API_URL is not set: serving needs a Prefect server that "
                         "stays up (`prefect server start`, then `export "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api`)")
    serve(pipeline_flow.to_deployment("repro", description="dvc repro: the whole pipeline"),
          experiment_flow.to_deployment("run", description="dvc exp run -S key=value ..."),
          table_flow.to_deployment("queue", description="a paper table's rows as experiments"),
          limit=args.limit)
