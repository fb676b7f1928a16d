"""Where a stage's work stands: the texts of progress reports (counts, ETA, log lines, table rows)
and :class:`Watch`, which shows the workers' reports as they come as Prefect artifacts, log lines
and pictures. Monitoring never stops the work: a failing step is said once and skipped."""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Callable

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)
from flows.harness.monitor import Monitor, current, duration
from flows.harness.pictures import Picture, show_pictures
from sra2.runtime.once import WarnOnce, harmless

TABLE_ROWS = 20  # newest rows the table artifact shows (rows with an FID are all kept)


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


# --- following a stage's progress ----------------------------------------------------------------

def _harmless(method: Callable) -> Callable:
    """A Watch method whose failure (a bug, a picture that cannot be read) is said once, through
    the watch's :class:`sra2.runtime.once.WarnOnce`, and ignored."""

    @functools.wraps(method)
    def call(self: Watch, *args, **kwargs):
        return harmless(method, self.warn, "monitoring")(self, *args, **kwargs)

    return call


class Watch:
    """Progress reports (done, total, info) shown as they come: the progress artifact (updated at
    most every ``every`` s, its description says where the work stands), a log line for each
    metrics row (otherwise every ``log_every`` s), and for rows a table and pictures, republished
    at most every ``show_every`` s and at the end. ``pictures(rows)`` draws pictures of the rows;
    a ``preview`` path in a row's info adds that picture. :attr:`stopped` keeps the first rank's
    report that it stopped and saved."""

    def __init__(self, mon: Monitor, stage: str, unit: str, description: str,
                 pictures: Callable[[list[dict]], list[Picture]] | None = None,
                 every: float = 5.0, log_every: float = 30.0, show_every: float = 30.0):
        from prefect.artifacts import create_progress_artifact

        self.mon, self.stage, self.unit, self.pictures = mon, stage, unit, pictures
        self.every, self.log_every, self.show_every = every, log_every, show_every
        self.warn = WarnOnce(lambda text: mon.say(text, logging.WARNING))
        self.pending, self.preview, self.stopped = False, None, None
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
        """``on_event`` for :func:`sra2.runtime.launch.run`."""
        if event["kind"] == "progress":
            self.update(event["done"], event["total"], event["info"], event.get("time"))
        elif event["kind"] == "stopped":
            self.stopped = self.stopped or event
            self.mon.say(f"{self.stage}: rank {event['rank']}: {event['message']}", logging.WARNING)

    @_harmless
    def update(self, done: int, total: int, info: dict | None = None,
               at: float | None = None) -> None:
        """One report: ``done`` of ``total``, the workers' ``info``, sent at time ``at``."""
        from prefect.artifacts import update_progress_artifact
        from prefect.events import emit_event

        info = info or {}
        if info.get("nonfinite"):  # a step training skipped: the log, and an event to act on
            self.mon.say(f"{self.stage}: {info['nonfinite']}", logging.WARNING)
            self.mon.call(emit_event, event=f"sra2.{self.stage}.nonfinite",
                          resource={"prefect.resource.id": f"sra2.{self.stage}"},
                          payload={"step": done, "message": info["nonfinite"]})
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



class InProcessProgress:
    """A :class:`sra2.runtime.worker.Progress` for work in the flow's own process (workers report
    through flows.harness.common.run_workers): the progress artifact ``<name>-progress``, updated
    at most every ``every`` seconds; ``progress(done, total, ...)``, which raises
    sra2.runtime.launch.StopAsked once the run is cancelled."""

    def __init__(self, key: str, description: str, every: float = 5.0):
        self.watch = Watch(current(), key.removesuffix("-progress"), "steps", description,
                           every=every)

    def __call__(self, done: int, total: int, *_) -> None:
        self.watch.update(done, total)
        self.watch.mon.stop_if_cancelled(f"step {done} / {total}")
