"""Running a stage's Prefect flow: tagged, logged, against a server that outlives it or a temporary
one that dies with it, as a subflow of the pipeline run that started it, and ending in a state that
says what happened (Completed, Failed, Cancelled or Preempted, naming the step saved).

The body's own errors fail the stage; the Prefect API failing does not: before the body starts,
the body runs without Prefect; after it has finished, its result stands. :class:`Outcome` is what
the body did, which decides how the stage's process ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)
from flows.harness.monitor import Monitor, api_failure, close_current, current
from flows.harness.tags import experiment, run_tags
from sra2.runtime import procs

PARENT_RUN = "SRA2_PARENT_FLOW_RUN"  # the sra2-pipeline run whose subflows the stages become


@dataclass
class Outcome:
    """What a stage's flow body did: whether it started and finished, its result or error, and
    whether SIGTERM stopped it after the workers saved (``stopped``: the first rank's report)."""

    started: bool = False
    finished: bool = False
    result: Any = None
    error: BaseException | None = None
    stopped: dict | None = None
    preempted: bool = False


_outcome: contextvars.ContextVar[Outcome | None] = contextvars.ContextVar("sra2_outcome",
                                                                           default=None)


def outcome() -> Outcome:
    """The outcome :func:`run_stage` is recording (a throwaway one for a flow called directly)."""
    found = _outcome.get()
    if found is None:
        found = Outcome()
        _outcome.set(found)
    return found


# --- the flow of a stage -------------------------------------------------------------------------

class LazyFlow:
    """``prefect.flow(**options)(fn)``, made when first called or asked for an attribute: a stage's
    module imports without Prefect (2-3 s), so that its --help answers at once."""

    def __init__(self, fn: Callable, options: dict):
        self._fn, self._options, self._flow = fn, options, None

    def made(self):
        """The Prefect flow itself."""
        if self._flow is None:
            from prefect import flow

            self._flow = flow(**self._options)(self._fn)
        return self._flow

    def __call__(self, *args, **kwargs):
        return self.made()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.made(), name)


def cancelled(message: str, name: str = "Cancelled"):
    """The state a stage stopped from outside ends in, of type Cancelled, saying what was saved:
    "Cancelled" (from Prefect) or "Preempted" (SIGTERM). The flow call then raises
    prefect.exceptions.CancelledRun, so the stage exits non-zero and DVC stops there."""
    from prefect.client.schemas.objects import State, StateType

    return State(type=StateType.CANCELLED, name=name, message=message)


def preempted(error: BaseException) -> bool:
    """Whether ``error`` is SIGTERM reaching the flow (Prefect raises it in the main thread)."""
    from prefect.exceptions import TerminationSignal

    return isinstance(error, TerminationSignal)


def stage_flow(stage: str):
    """Decorator: the Prefect flow ``sra2-<stage>`` (a :class:`LazyFlow`) of a body that records
    its :class:`Outcome`, says when it starts and ends, and logs what it prints."""

    from sra2.runtime.launch import StopAsked, WorkersStopped

    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)  # Prefect reads the parameters from the body's signature
        def recorded(*args, **kwargs):
            mon, did = current(stage), outcome()
            did.started = True
            mon.record_running()
            mon.say(f"{stage} started (pid {os.getpid()}; tags {', '.join(mon.tags) or 'none'}; "
                    f"log {mon.path})")
            end_watch = mon.watch_cancel()
            try:
                did.result = body(*args, **kwargs)
            except (WorkersStopped, StopAsked) as e:
                if not mon.cancel.is_set():
                    raise
                mon.say(f"{stage} cancelled after {mon.elapsed()}: {e}", logging.WARNING)
                return cancelled(f"cancelled from Prefect: {e}")
            except BaseException as e:
                if preempted(e) and did.stopped:  # SIGTERM, and the workers saved: no crash
                    mon.say(f"{stage} preempted after {mon.elapsed()}: {did.stopped['message']}",
                            logging.WARNING)
                    did.preempted = True
                    return cancelled(f"preempted (SIGTERM): {did.stopped['message']}",
                                     "Preempted")
                did.error = e
                mon.say(f"{stage} failed after {mon.elapsed()}: {type(e).__name__}: {e}",
                        logging.ERROR)
                raise
            finally:
                end_watch()
            did.finished = True
            lost = f" (no Prefect API since {mon.lost_at}: the UI does not show this end)"
            mon.say(f"{stage} finished in {mon.elapsed()}{lost if not mon.online else ''}")
            return did.result

        # Prefect resolves string annotations in the wrapper's module: give it the types
        recorded.__signature__ = inspect.signature(body, eval_str=True)
        return LazyFlow(recorded, {"name": f"sra2-{stage}", "log_prints": True})

    return decorate


# --- runs of killed stages -----------------------------------------------------------------------

def mark_crashed(mon: Monitor) -> None:
    """Mark Crashed the flow runs that stages killed without warning (SIGKILL, a lost node) left
    "Running": those of the records next to this stage's log whose process has gone."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    def crash(run: str, message: str) -> bool:
        """True once marked, False for a run this server does not know (another database)."""
        with get_client(sync_client=True) as client:
            try:
                client.set_flow_run_state(run, Crashed(message=message), force=True)
            except ObjectNotFound:
                return False
        return True

    for path in sorted(mon.path.parent.glob("*.running.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if procs.started_at(record["pid"]) == record["started"]:
            continue  # still running
        message = (f"the process that ran it (pid {record['pid']}) ended without reporting an "
                   "end: killed, or its machine lost")
        if mon.call(crash, record["flow_run"], message):
            mon.say(f"marked flow run '{record['name']}' ({record['flow_run']}) Crashed: {message}",
                    logging.WARNING)
        if mon.online:  # an unknown run is not retried; an unreachable server is, next time
            path.unlink(missing_ok=True)


# --- a stage as a subflow of the pipeline run ----------------------------------------------------

def _stage_node():
    """The task a stage's subflow hangs from in the pipeline run (it runs in another process)."""


def children(run_id: str, *, running: bool = True) -> list:
    """The stage runs (subflow runs) of flow run ``run_id``, oldest first; only those not yet
    ended by default."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    ongoing = FlowRunFilterState(type=FlowRunFilterStateType(any_=[
        StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])) if running else None
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]), state=ongoing),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def child_run(flow, parent: str, tags: list[str], parameters: dict):
    """Create the flow run of ``flow`` as a subflow of pipeline run ``parent``: a task run of the
    parent, named for the stage, whose child the new flow run is, waiting for the stage run before
    it (the edge the run graph draws). Returns (flow run, task run)."""
    from uuid import uuid4

    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRunResult
    from prefect.states import Running

    stage = flow.name.removeprefix("sra2-")
    before = children(parent, running=False)[-1:]
    with get_client(sync_client=True) as client:
        node = client.create_task_run(
            Task(_stage_node, name=stage), flow_run_id=parent, dynamic_key=uuid4().hex[:8],
            name=stage, extra_tags=tags, state=Running(),
            task_inputs={"wait_for": [FlowRunResult(id=run.id) for run in before]})
        run = client.create_flow_run(flow, name=flow.flow_run_name, parameters=parameters,
                                     tags=tags, parent_task_run_id=node.id)
    return run, node


def cancelled_run(run_id: str) -> bool:
    """Whether flow run ``run_id`` is being cancelled or was."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


def end_node(node, run_id) -> None:
    """Give the stage's task run in the pipeline run the end its subflow run came to."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State

    with get_client(sync_client=True) as client:
        end = client.read_flow_run(run_id).state
        client.set_task_run_state(node.id, State(type=end.type, name=end.name,
                                                 message=end.message), force=True)


def call_flow(flow, mon: Monitor, parameters: dict):
    """Call ``flow``: as a subflow of the pipeline run named by SRA2_PARENT_FLOW_RUN when there is
    one (and the API answers), else as a flow run of its own."""
    from prefect.flow_engine import run_flow

    parent = os.environ.get(PARENT_RUN)
    if parent and mon.call(cancelled_run, parent):
        raise SystemExit(f"error: the pipeline run {parent} was cancelled: {flow.name} does not "
                         "start")
    child = mon.call(child_run, flow, parent, mon.tags, parameters) if parent else None
    if child is None:
        return flow(**parameters)
    run, node = child
    try:
        return run_flow(flow, flow_run=run, parameters=parameters)
    finally:
        mon.call(end_node, node, run.id)


# --- running a stage -----------------------------------------------------------------------------

def run_stage(flow: LazyFlow, preset: str, **params):
    """Call a :func:`stage_flow` flow tagged with the preset, experiment and pipeline run, with its
    local log, against ``PREFECT_API_URL`` or a temporary server that dies with this process
    (flows.harness.server; its links are not printed: it is gone when the stage ends); runs that
    killed stages left "Running" are marked crashed first."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.harness import server
    from sra2.runtime.launch import Terminated

    stage = flow.name.removeprefix("sra2-")
    close_current()
    mon, did = current(stage), Outcome()
    mon.tags = run_tags(preset)
    token = _outcome.set(did)
    try:
        with contextlib.ExitStack() as stack:
            try:
                started = stack.enter_context(server.for_this_process())
            except RuntimeError as e:
                mon.lost(e, "the stage runs without Prefect")
                return flow.fn(**params)
            if started:
                mon.server_api, mon.server_pid = started
            # settings of this call's own, which Monitor.lost changes: no retries once the API
            # is gone
            mon.settings = stack.enter_context(temporary_settings(
                {PREFECT_API_URL: mon.server_api, PREFECT_UI_URL: ""} if mon.server_api else None))
            stack.enter_context(tags(*mon.tags))
            mark_crashed(mon)
            named = flow.with_options(flow_run_name=f"{stage} {preset} {experiment()}")
            return call_flow(named, mon, params)
    except Exception as e:
        if did.preempted:  # recorded as Preempted; the process ends as SIGTERM would end it
            raise Terminated(128 + signal.SIGTERM) from None
        if did.error is e:
            raise
        if did.error is not None:  # Prefect failed while failing: the body's error is the news
            raise did.error from None
        if did.finished:  # the work is done; only its record in Prefect is missing
            mon.lost(e, "the stage's work is done")
            return did.result
        if not did.started and api_failure(e):
            mon.lost(e, "the stage runs without Prefect")
            return flow.fn(**params)
        raise
    finally:
        _outcome.reset(token)
        mon.running_record.unlink(missing_ok=True)
        close_current()
