"""What a stage shows while it runs and keeps afterwards: a local log, the Prefect run's logs and
tags, and artifacts (progress, a table of the workers' rows, pictures).

Prefect is a window on the work, never a condition of it. Every Prefect call goes through
:meth:`Monitor.call`: the first failure is reported once, and from then on the stage stops calling
the API and keeps its account in ``data/logs/<stage>.log`` alone. A flow whose body has finished
does not fail because Prefect could not record the end, and a stage whose server is down from the
start runs without Prefect.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import inspect
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping

from PIL import Image

LOG_DIR = "data/logs"  # under the working directory (dvc runs stages at the repository root)
TABLE_ROWS = 20  # newest rows the table artifact shows (rows with an FID are all kept)
PICTURE_WIDTH = (384, 1024)  # pictures are shown at least / at most this wide (pixels)
# Prefect loggers that report, again and again, a server we already know is gone
NOISY = ("prefect.events.clients", "prefect._internal.concurrency")
CANCEL_POLL = 1.0  # seconds between reads of the run's own state (~20 ms and 2 KB each)

Picture = tuple[str, "Image.Image | Path | str"]  # caption, image or PNG file


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
    :meth:`call`. ``started``, ``finished``, ``result`` and ``error`` record the flow body's
    outcome."""

    def __init__(self, stage: str, log_dir: str | Path | None = None):
        # SRA2_LOG_DIR puts the logs elsewhere (tests, batch jobs)
        log_dir = log_dir or os.environ.get("SRA2_LOG_DIR") or LOG_DIR
        self.stage, self.path = stage, Path(log_dir) / f"{stage}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.online, self.started, self.finished, self.refused = True, False, False, False
        self.preempted = False  # ended by SIGTERM after saving: the process exits 143
        self.raise_exceptions = logging.raiseExceptions
        self.result, self.error, self.tags = None, None, []
        self.settings = None  # the flow call's own copy of Prefect's settings (run_stage)
        self.began, self.lost_at = time.monotonic(), ""
        self.server_api, self.server_pid = None, None  # a temporary server of this stage's own
        self.cancel = threading.Event()  # set when the flow run is cancelled (watch_cancel)
        self.stopped: dict | None = None  # the first rank's report that it stopped and saved
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
            elif not self.refused:
                self.refused = True
                self.say(f"a Prefect call failed ({type(e).__name__}: {e}); left out, the stage "
                         "goes on", logging.WARNING)
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

        from sra2 import atomic
        from sra2.worker import started_at

        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:
            atomic.write_json(self.running_record, {
                "flow_run": str(context.flow_run.id), "name": context.flow_run.name,
                "pid": os.getpid(), "started": started_at(os.getpid()),
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

    def elapsed(self) -> str:
        return duration(time.monotonic() - self.began)


_current: Monitor | None = None


def current(stage: str | None = None) -> Monitor:
    """The monitor of the stage this process runs; if none is open, one is opened for ``stage``
    (by default the script's name: ``python -m flows.demo_data`` logs to demo_data.log)."""
    global _current
    if _current is None:
        _current = Monitor(stage or Path(sys.argv[0]).stem or "flow")
    return _current


def close_current() -> None:
    global _current
    if _current is not None:
        _current.close()
        _current = None


# --- tags: which preset, experiment and pipeline run a flow run belongs to -----------------------

def experiment(env: Mapping[str, str] = os.environ) -> str:
    """The experiment's name (DVC sets DVC_EXP_NAME for the stages of `dvc exp run`)."""
    return env.get("DVC_EXP_NAME") or "workspace"


def _stat(pid: int) -> list[str] | None:
    """sra2.worker.proc_stat, None also without /proc."""
    from sra2.worker import proc_stat

    with contextlib.suppress(OSError):
        return proc_stat(pid)
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` or ``python -m dvc ...``."""
    return "dvc" in [os.path.basename(a) for a in argv[:2]] or argv[1:3] == ["-m", "dvc"]


def dvc_ancestor() -> int | None:
    """The pid of the nearest dvc process above this one (DVC runs a stage's command in a shell)."""
    pid = os.getppid()
    while pid > 1:
        if _is_dvc(_cmdline(pid)):
            return pid
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 0
    return None


def started(pid: int) -> datetime:
    """When process ``pid`` started (now, where /proc cannot say)."""
    fields = _stat(pid)
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return datetime.fromtimestamp(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, StopIteration, TypeError, IndexError, ValueError):
        return datetime.now()


def pipeline_id(env: Mapping[str, str] = os.environ) -> str:
    """One id for the stages of one `dvc repro` or `dvc exp run`: the start time and pid of the dvc
    process that runs them (together unique on a machine, and the same for each of its stages).
    SRA2_PIPELINE_RUN overrides it (a batch script running stages itself); a stage run by hand is a
    pipeline of its own."""
    if env.get("SRA2_PIPELINE_RUN"):
        return env["SRA2_PIPELINE_RUN"]
    pid = (dvc_ancestor() if "DVC_STAGE" in env else None) or os.getpid()
    return f"{started(pid):%Y%m%d-%H%M%S}-{pid}"


def run_tags(preset: str, env: Mapping[str, str] = os.environ) -> list[str]:
    return [f"preset:{preset}", f"exp:{experiment(env)}", f"pipeline:{pipeline_id(env)}"]


# --- runs of killed stages -------------------------------------------------------------------

def mark_crashed(mon: Monitor) -> None:
    """Mark Crashed the flow runs that stages killed without warning (SIGKILL, a lost node) left
    "Running": those of the records next to this stage's log whose process has gone."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    from sra2.worker import started_at

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
        if started_at(record["pid"]) == record["started"]:
            continue  # still running
        message = (f"the process that ran it (pid {record['pid']}) ended without reporting an "
                   "end: killed, or its machine lost")
        if mon.call(crash, record["flow_run"], message):
            mon.say(f"marked flow run '{record['name']}' ({record['flow_run']}) Crashed: {message}",
                    logging.WARNING)
        if mon.online:  # an unknown run is not retried; an unreachable server is, next time
            path.unlink(missing_ok=True)


# --- running a stage's flow ----------------------------------------------------------------------

class LazyFlow:
    """``prefect.flow(**options)(fn)``, made when first called or asked for an attribute: a stage's
    module imports without Prefect (2-3 s), so that its --help answers at once."""

    def __init__(self, fn: Callable, options: dict):
        self._fn, self._options, self._flow = fn, options, None

    def _made(self):
        if self._flow is None:
            from prefect import flow

            self._flow = flow(**self._options)(self._fn)
        return self._flow

    def __call__(self, *args, **kwargs):
        return self._made()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._made(), name)


def flow(**options) -> Callable[[Callable], LazyFlow]:
    """``prefect.flow(**options)`` as a :class:`LazyFlow`."""
    return lambda fn: LazyFlow(fn, options)


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
    its outcome in the stage's monitor, says when it starts and ends, and logs what it prints."""

    from sra2.launch import WorkersStopped

    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)  # Prefect reads the parameters from the body's signature
        def recorded(*args, **kwargs):
            mon = current(stage)
            mon.started = True
            mon.record_running()
            mon.say(f"{stage} started (pid {os.getpid()}; tags {', '.join(mon.tags) or 'none'}; "
                    f"log {mon.path})")
            end_watch = mon.watch_cancel()
            try:
                mon.result = body(*args, **kwargs)
            except WorkersStopped as e:
                if not mon.cancel.is_set():
                    raise
                mon.say(f"{stage} cancelled after {mon.elapsed()}: {e}", logging.WARNING)
                return cancelled(f"cancelled from Prefect: {e}")
            except BaseException as e:
                if preempted(e) and mon.stopped:  # SIGTERM, and the workers saved: no crash
                    mon.say(f"{stage} preempted after {mon.elapsed()}: {mon.stopped['message']}",
                            logging.WARNING)
                    mon.preempted = True
                    return cancelled(f"preempted (SIGTERM): {mon.stopped['message']}",
                                     "Preempted")
                mon.error = e
                mon.say(f"{stage} failed after {mon.elapsed()}: {type(e).__name__}: {e}",
                        logging.ERROR)
                raise
            finally:
                end_watch()
            mon.finished = True
            lost = f" (no Prefect API since {mon.lost_at}: the UI does not show this end)"
            mon.say(f"{stage} finished in {mon.elapsed()}{lost if not mon.online else ''}")
            return mon.result

        # Prefect resolves string annotations in the wrapper's module: give it the types
        recorded.__signature__ = inspect.signature(body, eval_str=True)
        return flow(name=f"sra2-{stage}", log_prints=True)(recorded)

    return decorate


def run_stage(flow, preset: str, **params):
    """Call a :func:`stage_flow` flow tagged with the preset, experiment and pipeline run, with its
    local log, against ``PREFECT_API_URL`` or a temporary server that dies with this process
    (flows.server); runs that killed stages left "Running" are marked crashed first. The body's
    own errors fail the stage; the Prefect API failing does not: before the body starts, the body
    runs without Prefect; after it has finished, its result stands."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import server
    from sra2.launch import Terminated

    stage = flow.name.removeprefix("sra2-")
    close_current()
    mon = current(stage)
    mon.tags = run_tags(preset)
    try:
        with contextlib.ExitStack() as stack:
            if server.wanted():
                try:
                    mon.server_api, mon.server_pid = stack.enter_context(server.temporary())
                except RuntimeError as e:
                    mon.lost(e, "the stage runs without Prefect")
                    return flow.fn(**params)
                stack.callback(server.drain)  # the run's last lines, before the server goes
            # settings of this call's own, which Monitor.lost changes: no retries once the API
            # is gone
            mon.settings = stack.enter_context(temporary_settings(
                {PREFECT_API_URL: mon.server_api} if mon.server_api else None))
            stack.enter_context(tags(*mon.tags))
            mark_crashed(mon)
            return flow.with_options(flow_run_name=f"{stage} {preset} {experiment()}")(**params)
    except Exception as e:
        if mon.preempted:  # recorded as Preempted; the process ends as SIGTERM would end it
            raise Terminated(128 + signal.SIGTERM) from None
        if mon.error is e:
            raise
        if mon.error is not None:  # Prefect failed while failing: the body's error is the news
            raise mon.error from None
        if mon.finished:  # the work is done; only its record in Prefect is missing
            mon.lost(e, "the stage's work is done")
            return mon.result
        if not mon.started and api_failure(e):
            mon.lost(e, "the stage runs without Prefect")
            return flow.fn(**params)
        raise
    finally:
        mon.running_record.unlink(missing_ok=True)
        close_current()


# --- what progress reports look like --------------------------------------------------------------

def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _value(key: str, value) -> str:
    if key == "checkpoint":
        return Path(value).name if value else "none yet"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _item(key: str, value) -> str:
    return f"{value:.4g} img/s" if key == "images_per_s" else f"{key} {_value(key, value)}"


def counted(unit: str, done: int, total: int) -> str:
    """'step 1200 / 4000' or '96 / 128 images'; 'nothing left to do' for an empty total."""
    if total == 0:
        return "nothing left to do"
    return f"step {done} / {total}" if unit == "step" else f"{done} / {total} {unit}"


def headline(unit: str, done: int, total: int, info: dict, eta: float | None) -> str:
    """The progress artifact's description, e.g. 'step 1200 / 4000 · loss 0.4321 · 123 img/s ·
    ETA 3m20s'."""
    parts = [counted(unit, done, total)]
    parts += [f"{name} {info[key]:.4g}" for key, name in (("loss", "loss"), ("fid", "FID"))
              if key in info]
    if "images_per_s" in info:
        parts.append(f"{info['images_per_s']:.0f} img/s")
    if total:
        parts.append("done" if done >= total else f"ETA {duration(eta)}")
    return " · ".join(parts)


def row_line(stage: str, unit: str, done: int, total: int, info: dict, eta: float | None,
             elapsed: float) -> str:
    """One log line: where the work stands, every value the workers sent, elapsed time and ETA."""
    where = counted(unit, done, total) + (f" ({100 * done / total:.0f}%)" if total else "")
    values = [_item(k, v) for k, v in info.items() if k not in ("step", "preview")]
    times = [f"elapsed {duration(elapsed)}"] + ([f"ETA {duration(eta)}"] if done < total else [])
    return " · ".join([f"{stage}: {where}", *values, *times])


def table_row(info: dict, eta: float | None) -> dict:
    """A table artifact row: the workers' values (the checkpoint's file name) and the ETA."""
    row = {k: (_value(k, v) if k == "checkpoint" else v) for k, v in info.items()
           if k != "preview"}
    row["ETA"] = duration(eta)
    return row


def table_rows(rows: list[dict], keep: int = TABLE_ROWS) -> list[dict]:
    """Newest first: the last ``keep`` rows and every row with an FID, each with every column."""
    shown = [r for i, r in enumerate(rows) if i >= len(rows) - keep or "fid" in r][::-1]
    columns = list(dict.fromkeys(k for r in shown for k in r))
    return [{k: r.get(k, "") for k in columns} for r in shown]


class Eta:
    """Time left at the mean rate since the first report (None until a second one shows a rate)."""

    def __init__(self):
        self.first: tuple[float, int] | None = None

    def __call__(self, now: float, done: int, total: int) -> float | None:
        if self.first is None:
            self.first = (now, done)
        t0, d0 = self.first
        if done >= total:
            return 0.0
        if done <= d0 or now <= t0:
            return None
        return (total - done) * (now - t0) / (done - d0)


# --- pictures as Markdown artifacts ------------------------------------------------------------

def _load(picture: Image.Image | Path | str) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture
    with Image.open(picture) as img:
        return img.convert("RGB")


def img_tag(picture: Image.Image | Path | str, caption: str) -> str:
    """An <img> holding the PNG as a data: URI (the UI renders it offline; nothing to serve),
    shrunk to the widest PICTURE_WIDTH, shown at least the narrowest wide (small grids)."""
    img = _load(picture)
    low, high = PICTURE_WIDTH
    if img.width > high:
        img = img.resize((high, max(1, round(img.height * high / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    shown = img.width * max(1, math.ceil(low / img.width))
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{shown}" alt="{caption}"/>'


def pictures_markdown(pictures: list[Picture]) -> str:
    return "\n\n".join(f"**{caption}**\n\n{img_tag(picture, caption)}"
                       for caption, picture in pictures)


def show_pictures(mon: Monitor, key: str, pictures: list[Picture], description: str) -> None:
    """A Markdown artifact of the pictures (a new version of ``key``); unreadable files are left
    out."""
    from prefect.artifacts import create_markdown_artifact

    readable = [(c, p) for c, p in pictures if isinstance(p, Image.Image) or Path(p).is_file()]
    if readable and mon.online:
        mon.call(create_markdown_artifact, pictures_markdown(readable), key=key,
                 description=description)


# --- following a stage's progress ----------------------------------------------------------------

def _harmless(method: Callable) -> Callable:
    """A failing monitoring step (a bug, a picture that cannot be read) is reported once and
    ignored: it must never stop the work it watches."""

    @functools.wraps(method)
    def call(self: Watch, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if not self.broken:
                self.broken = True
                self.mon.say(f"monitoring failed ({type(e).__name__}: {e}); the work goes on",
                             logging.WARNING)

    return call


class Watch:
    """Progress reports (done, total, info) shown as they come: the progress artifact (updated at
    most every ``every`` s, its description says where the work stands), a log line for each
    metrics row (otherwise every ``log_every`` s), and for rows a table and pictures, republished
    at most every ``show_every`` s and at the end. ``pictures(rows)`` draws pictures of the rows;
    a ``preview`` path in a row's info adds that picture."""

    def __init__(self, mon: Monitor, stage: str, unit: str, description: str,
                 pictures: Callable[[list[dict]], list[Picture]] | None = None,
                 every: float = 5.0, log_every: float = 30.0, show_every: float = 30.0):
        from prefect.artifacts import create_progress_artifact

        self.mon, self.stage, self.unit, self.pictures = mon, stage, unit, pictures
        self.every, self.log_every, self.show_every = every, log_every, show_every
        self.broken, self.pending, self.preview = False, False, None
        self.rows: list[dict] = []  # what the table shows
        self.infos: list[dict] = []  # what the pictures are drawn from
        self.eta, self.began = Eta(), time.monotonic()
        self.last = {"progress": -math.inf, "log": -math.inf, "show": -math.inf}
        self.id = mon.call(create_progress_artifact, 0.0, key=f"{stage}-progress",
                           description=description)

    def _due(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now - self.last[what] < every:
            return False
        self.last[what] = now
        return True

    @_harmless
    def __call__(self, event: dict) -> None:
        """``on_event`` for :func:`sra2.launch.run`."""
        if event["kind"] == "progress":
            self.update(event["done"], event["total"], event["info"], event.get("time"))
        elif event["kind"] == "stopped":
            self.mon.stopped = self.mon.stopped or event
            self.mon.say(f"{self.stage}: rank {event['rank']}: {event['message']}", logging.WARNING)

    @_harmless
    def update(self, done: int, total: int, info: dict | None = None,
               at: float | None = None) -> None:
        """One report: ``done`` of ``total``, the workers' ``info``, sent at time ``at``."""
        from prefect.artifacts import update_progress_artifact

        info = info or {}
        eta = self.eta(time.time() if at is None else at, done, total)
        complete = done >= total
        is_row = any(isinstance(v, (int, float)) for k, v in info.items() if k != "step")
        if is_row:
            self.rows.append(table_row(info, eta))
            self.infos.append(info)
            self.pending = True
        if info.get("preview"):  # the samples of the latest FID evaluation, or of this step
            self.preview = (info.get("fid_step", info.get("step", done)), info["preview"])
            self.pending = True
        if is_row or complete or self._due("log", self.log_every):
            self.mon.say(row_line(self.stage, self.unit, done, total, info, eta,
                                  time.monotonic() - self.began))
        if self.id is not None and (self._due("progress", self.every) or complete):
            percent = 100.0 * done / total if total else 100.0
            self.mon.call(update_progress_artifact, self.id, percent,
                          description=headline(self.unit, done, total, info, eta))
        if self.pending and (complete or self._due("show", self.show_every)):
            self.show()

    @_harmless
    def finish(self) -> None:
        """Publish what the last reports added (call when the work has ended, even by failing)."""
        if self.pending:
            self.show()

    def show(self) -> None:
        from prefect.artifacts import create_table_artifact

        self.pending = False
        if not self.mon.online:  # nobody to draw for
            return
        if self.rows:
            shown = table_rows(self.rows)
            self.mon.call(create_table_artifact, shown, key=f"{self.stage}-metrics",
                          description=f"{self.stage}: newest first, {len(shown)} of "
                                      f"{len(self.rows)} rows")
        pictures = self.pictures(self.infos) if self.pictures and self.infos else []
        if self.preview:
            pictures.append((f"EMA samples at step {self.preview[0]}", self.preview[1]))
        if pictures:
            show_pictures(self.mon, f"{self.stage}-pictures", pictures,
                          f"{self.stage}: latest pictures")
