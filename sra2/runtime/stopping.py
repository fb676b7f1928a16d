"""Stopping cleanly and saving on time: signals recorded instead of obeyed, the step every rank
acts at, and the wall clock of timed saves.

Work that can stop cleanly (training) holds :class:`StopSignals` open, saves what it has done when
a signal came and raises :class:`Stopped` (:func:`stopped`); :mod:`sra2.runtime.worker` turns that
into the rank's ``stopped`` record. Ranks agree on the step to stop or save at through
:class:`Consensus`.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as tdist


class Stopped(Exception):
    """The work stopped on a signal after saving what it had done; running it again resumes."""

    def __init__(self, message: str, step: int, checkpoint: str, signal_name: str):
        super().__init__(message)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopSignals:
    """While open, SIGTERM and SIGINT set ``received`` (the first one's number) instead of ending
    the process; the work polls it. Handlers can only be set in the main thread: elsewhere the
    signals keep theirs. The handler only records (printing there could re-enter a stream)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict = {}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stopped(signals: StopSignals, step: int, checkpoint: str) -> Stopped:
    """The :class:`Stopped` of a run that saved ``checkpoint`` at ``step`` on ``signals``' signal
    (or, where this rank received none, on another rank's)."""
    cause = signal.Signals(signals.received).name if signals.received else "another rank's signal"
    return Stopped(f"stopped at step {step} on {cause}: saved {checkpoint}; run the stage again "
                   "(dvc repro) to resume from there", step, checkpoint, cause)


class Consensus:
    """Flags every rank acts on at the same step, without waiting for each other at every step.

    With one process a flag counts at once. With several, each step's flags go into an
    asynchronous all-reduce (max) on a CPU (gloo) group, and its result is read one step later:
    by then every rank has sent its part (the gradient all-reduce keeps the ranks within a step of
    each other), so the wait is short, the device is never waited on, and all ranks see the same
    flags after the same step. Per step: an all-reduce of a few bytes on gloo's threads.
    """

    def __init__(self, world: int):
        self.group, self.pending = None, None
        if world > 1:
            gloo = tdist.get_backend() == "gloo"
            self.group = tdist.group.WORLD if gloo else tdist.new_group(backend="gloo")

    def __call__(self, *flags: bool) -> tuple[bool, ...]:
        """This rank's ``flags`` after this step -> the flags to act on now."""
        if self.group is None:
            return flags
        values = torch.tensor(flags, dtype=torch.int32)
        work = tdist.all_reduce(values, op=tdist.ReduceOp.MAX, group=self.group, async_op=True)
        previous, self.pending = self.pending, (work, values)
        return self._result(previous) if previous else (False,) * len(flags)

    def close(self) -> None:
        """Wait for the last all-reduce (each rank sent as many)."""
        if self.pending:
            self._result(self.pending)
            self.pending = None

    @staticmethod
    def _result(pending) -> tuple[bool, ...]:
        work, values = pending
        work.wait()
        return tuple(bool(v) for v in values.tolist())


class SaveClock:
    """Whether ``minutes`` of wall time have passed since the last save (never with 0)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds
