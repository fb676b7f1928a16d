"""A stage's account of itself: a local log, the Prefect run's logs, and every Prefect call.

Prefect is a window on the work, never a condition of it. Every Prefect call goes through
:meth:`Monitor.call`: the first failure is reported once, and from then on the stage stops calling
the API and keeps its account in ``data/logs/<stage>.log`` alone. A flow whose body has finished
does not fail because Prefect could not record the end, and a stage whose server is down from the
start runs without Prefect.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)
from sra2.runtime.once import WarnOnce

LOG_DIR = "data/logs"  # under the working directory (dvc runs stages at the repository root)
# Prefect loggers that report, again and again, a server we already know is gone
NOISY = ("prefect.events.clients", "prefect._internal.concurrency")
CANCEL_POLL = 1.0  # seconds between reads of the run's own state (~20 ms and 2 KB each)


def api_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the Prefect API not answering, or answering with an error (Prefect may
    raise its own error from the client's: "Failed to reach API")."""
    import httpx

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (httpx.HTTPError, ConnectionError)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def duration(seconds: float | None) -> str:
    """``seconds`` as a person reads them: 42s, 3m07s, 2h05m."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --- the stage's account: local log file and Prefect run logs -----------------------------------

class _WhenOffline(logging.Filter):
    """Once the API has failed, records stay local (Prefect's API handler honours ``send_to_api``)
    and Prefect's own reports of the failure are dropped: the monitor has said it once."""

    def __init__(self, monitor: Monitor):
        super().__init__()
        self.monitor = monitor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.monitor.online:
            return True
        record.send_to_api = False
        if record.name in NOISY:
            return False
        return not (record.exc_info and api_failure(record.exc_info[1]))


class Monitor:
    """One stage's account of itself: every line goes to ``<log_dir>/<stage>.log`` (appended,
    timestamped) and, inside the flow run, to Prefect's run logger (terminal, and the Logs tab
    while the API answers); outside a flow run, to the terminal. Prefect calls go through
    :meth:`call`; :attr:`cancel` is set once the run is cancelled (:meth:`watch_cancel`)."""

    def __init__(self, stage: str, log_dir: str | Path | None = None):
        # SRA2_LOG_DIR puts the logs elsewhere (tests, batch jobs)
        log_dir = log_dir or os.environ.get("SRA2_LOG_DIR") or LOG_DIR
        self.stage, self.path = stage, Path(log_dir) / f"{stage}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.online, self.tags = True, []
        self.refused = WarnOnce(lambda text: self.say(text, logging.WARNING))
        self.raise_exceptions = logging.raiseExceptions
        self.settings = None  # the flow call's own copy of Prefect's settings (run_stage)
        self.began, self.lost_at = time.monotonic(), ""
        self.server_api, self.server_pid = None, None  # a temporary server of this stage's own
        self.cancel = threading.Event()  # set when the flow run is cancelled (watch_cancel)
        # while the flow body runs: its flow run id and this process, for mark_crashed
        self.running_record = self.path.with_suffix(".running.json")
        self.file = logging.FileHandler(self.path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s",
                                                "%H:%M:%S"))
        self.local = logging.getLogger(f"sra2.flows.{stage}")
        self.local.setLevel(logging.INFO)
        self.local.propagate = False
        self.local.handlers = [self.file, terminal]
        # the file also takes what the flow run logs by itself: the engine's lines, prints
        self.offline_filter = _WhenOffline(self)
        logging.getLogger("prefect.flow_runs").addHandler(self.file)
        for name in ("prefect.flow_runs", *NOISY):
            logging.getLogger(name).addFilter(self.offline_filter)

    def close(self) -> None:
        logging.getLogger("prefect.flow_runs").removeHandler(self.file)
        for name in ("prefect.flow_runs", *NOISY):
            logging.getLogger(name).removeFilter(self.offline_filter)
        self.local.handlers = []
        self.file.close()
        logging.raiseExceptions = self.raise_exceptions

    def say(self, text: str, level: int = logging.INFO) -> None:
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            self.local.log(level, text)
        else:
            from prefect.logging import get_run_logger

            get_run_logger().log(level, text)

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, a Prefect call; None if it fails, and without calling once
        the API has failed. Other failures (a payload Prefect refuses) leave that call out only."""
        if not self.online:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever Prefect did, the work goes on
            if api_failure(e):
                self.lost(e)
            else:
                self.refused(f"a Prefect call failed ({type(e).__name__}: {e}); left out, the "
                             "stage goes on")
            return None

    def lost(self, exc: BaseException, going_on: str = "the stage goes on without it") -> None:
        """Say once that the API failed; make no more calls to it."""
        if not self.online:
            return
        self.online, self.lost_at = False, datetime.now().strftime("%H:%M:%S")
        # Prefect's log worker writes every failed batch to stderr unless this is off
        logging.raiseExceptions = False
        if self.settings is not None:  # the engine's last calls (the final state) fail at once
            self.settings.client.max_retries = 0
        self.say(f"the Prefect API failed ({type(exc).__name__}: {exc}); {going_on}, its account "
                 f"continues in {self.path} only", logging.WARNING)

    def record_running(self) -> None:
        """Write which flow run this process runs (:func:`mark_crashed` reads it if we die)."""
        from prefect.context import FlowRunContext

        from sra2.runtime import atomic, procs

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:
            atomic.write_json(self.running_record, {
                "flow_run": str(context.flow_run.id), "name": context.flow_run.name,
                "pid": os.getpid(), "started": procs.started_at(os.getpid()),
                "server_pid": self.server_pid})

    def watch_cancel(self, every: float = CANCEL_POLL) -> Callable[[], None]:
        """Poll this flow run's state every ``every`` seconds from a daemon thread and set
        :attr:`cancel` once it is Cancelling (a Cancel from the UI, API or CLI) or Cancelled (the
        server's own end of one): Prefect tells a run that no runner started nothing, so the
        stage asks. Returns what ends the watch. An API failure ends the polling (:meth:`call`),
        never the stage."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType
        from prefect.context import FlowRunContext

        context, done = FlowRunContext.get(), threading.Event()
        if context is None or context.flow_run is None:
            return done.set
        run_id = context.flow_run.id
        stopping = {StateType.CANCELLING, StateType.CANCELLED}

        def poll() -> None:
            with get_client(sync_client=True) as client:
                while self.online and not done.wait(every):
                    state = self.call(lambda: client.read_flow_run(run_id).state)
                    if state is not None and state.type in stopping:
                        self.say(f"{self.stage}: the run was cancelled from Prefect; stopping and "
                                 "saving", logging.WARNING)
                        self.cancel.set()
                        return

        # in this context: the thread then reaches the server the flow call uses
        threading.Thread(target=contextvars.copy_context().run, args=(poll,),
                         name="sra2-watch-cancel", daemon=True).start()
        return done.set

    def stop_if_cancelled(self, where: str) -> None:
        """For work in the stage's own process, called between its steps: raise
        sra2.runtime.launch.StopAsked once the run is cancelled (``where`` says how far it got)."""
        if self.cancel.is_set():
            from sra2.runtime.launch import StopAsked

            raise StopAsked(f"stopped at {where}; this stage's work in its own process is not "
                            "kept: it starts over when run again")

    def elapsed(self) -> str:
        return duration(time.monotonic() - self.began)


_current: Monitor | None = None


def current(stage: str | None = None) -> Monitor:
    """The monitor of the stage this process runs; if none is open, one is opened for ``stage``
    (by default the script's name: ``python -m flows.stages.demo_data`` logs to demo_data.log)."""
    global _current
    if _current is None:
        _current = Monitor(stage or Path(sys.argv[0]).stem or "flow")
    return _current


def close_current() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None
