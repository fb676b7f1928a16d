"""Start a stage's worker processes with torch.distributed.run and follow what they report.

The parent (a Prefect flow, or any caller) runs ``python -m torch.distributed.run ... -m
sra2.runtime.worker <module:function>`` on every GPU of the node, or on several nodes (the same
command on each). Workers report through a file of JSON lines (:mod:`sra2.runtime.worker`): rank 0
appends progress and its result, any rank appends its error. The parent reads the file as it grows,
hands each record to ``on_event`` and returns the result, or raises :class:`WorkerFailed` with the
worker's own message.

Stopping: when the parent is interrupted (Ctrl-C, SIGTERM), it sends SIGTERM to its workers and
waits for them to save (training checkpoints its current step) before it exits with 130 or 143;
workers stopped by a signal of their own make it raise :class:`WorkersStopped` ("stopped at step N
... run the stage again"): either way the stage fails and ``dvc repro`` resumes it. Workers watch
the parent (``SRA2_PARENT_PID``) and stop by themselves when it is killed outright.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from sra2.config.params import Config, ConfigError, Launch
from sra2.runtime import procs, worker
from sra2.runtime.once import WarnOnce, harmless

Event = dict
SLURM_PORT = 29500


class WorkerFailed(RuntimeError):
    """A worker process failed; the message starts with its rank and its own error."""


class WorkersStopped(WorkerFailed):
    """The workers stopped on a signal after saving their work: running the stage again resumes."""


class Terminated(SystemExit):
    """SIGTERM reached a launch that nothing else handles: once the workers are stopped, the
    process exits with 143 (128 + SIGTERM), as Ctrl-C ends it with KeyboardInterrupt (130)."""


@dataclass(frozen=True)
class Plan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    endpoint: str | None  # host:port of node 0, for several nodes
    max_restarts: int

    def launcher_args(self) -> list[str]:
        common = [f"--nproc_per_node={self.nproc_per_node}", f"--max_restarts={self.max_restarts}"]
        if self.nnodes == 1:
            return ["--standalone", *common]
        host, port = self.endpoint.rsplit(":", 1)
        # static rendezvous: node_rank fixes the global ranks, so rank 0 is on node 0
        return [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
                f"--master_addr={host}", f"--master_port={port}", *common]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def gpus_visible() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_threads(processes: int, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """OpenMP settings for each of ``processes`` processes computing at once on the cores this
    process may use, where ``env`` (the user) sets none: an equal share of the cores as intra-op
    threads, the same for the same cores and process count (CPU results are bitwise repeatable
    with the same thread count), and idle threads that sleep instead of spinning (with another job
    on the cores, spinning threads made the demo VAE 3-9x slower). Data loader processes need no
    share: torch runs each with one thread."""
    share = max(1, len(os.sched_getaffinity(0)) // processes)
    defaults = {"OMP_NUM_THREADS": str(share), "OMP_WAIT_POLICY": "PASSIVE"}
    return {key: value for key, value in defaults.items() if key not in env}


def import_torch() -> None:
    """Import torch in this process (a stage's flow: demo-data and evaluate compute in it) with
    :func:`cpu_threads` for one process, which OpenMP reads once, as torch loads. They are not left
    in os.environ: the workers get their own share (:func:`worker_env`)."""
    added = cpu_threads(1)
    os.environ.update(added)
    try:
        import torch  # noqa: F401
    finally:
        for key in added:
            del os.environ[key]


def worker_env(nproc_per_node: int, extra: Mapping[str, str],
               env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The workers' environment: ``env`` with ``extra`` and, without a GPU, :func:`cpu_threads`.
    With a GPU it is left to torchrun, which gives each worker 1 thread when there are several."""
    return {**env, **extra, **({} if gpus_visible() else cpu_threads(nproc_per_node, env))}


def plan(launch: Launch, env: Mapping[str, str] = os.environ) -> Plan:
    """The launcher's settings: ``launch`` where set, else Slurm's environment, else one node."""
    slurm = "SLURM_JOB_ID" in env
    nproc = launch.nproc_per_node
    if nproc == "auto":
        nproc = gpus_visible() or 1
    nnodes = launch.nnodes or (int(env.get("SLURM_NNODES", 1)) if slurm else 1)
    node_rank = launch.node_rank if launch.node_rank is not None else (
        int(env.get("SLURM_NODEID", 0)) if slurm else 0)
    endpoint = launch.rdzv_endpoint
    if endpoint is None and slurm and nnodes > 1:
        endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{SLURM_PORT}"
    for key, value, low in (("nproc_per_node", nproc, 1), ("nnodes", nnodes, 1),
                            ("node_rank", node_rank, 0), ("max_restarts", launch.max_restarts, 0)):
        if value < low:
            raise ConfigError(f"launch.{key} must be at least {low}, got {value}")
    if node_rank >= nnodes:
        raise ConfigError(f"launch.node_rank ({node_rank}) must be below launch.nnodes ({nnodes})")
    if nnodes > 1 and (endpoint is None or not re.fullmatch(r"[^:\s]+:\d+", endpoint)):
        raise ConfigError(f"launch.rdzv_endpoint must be host:port of node 0 when launch.nnodes is "
                          f"{nnodes}, got {endpoint!r}")
    return Plan(nproc, nnodes, node_rank, endpoint, launch.max_restarts)


def follow(path: Path) -> Callable[[], list[Event]]:
    """A reader of the complete lines appended to ``path`` since the last call."""
    f, pending = open(path), ""

    def read() -> list[Event]:
        nonlocal pending
        pending += f.read()
        *lines, pending = pending.split("\n")
        return [json.loads(line) for line in lines if line]

    return read


def failure(errors: list[Event], returncode: int) -> WorkerFailed:
    if not errors:
        return WorkerFailed(f"the workers exited with code {returncode} without reporting an "
                            "error (killed, or out of memory?); their output is above")
    first = errors[0]
    others = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    return WorkerFailed(f"rank {first['rank']}: {first['error']}{others}\n\n"
                        f"worker traceback:\n{first['traceback']}")


def stop_message(stopped: list[Event]) -> str:
    first = min(stopped, key=lambda e: e["rank"])
    return f"rank {first['rank']}: {first['message']}"


def shielded(on_event: Callable[[Event], None] | None) -> Callable[[Event], None]:
    """``on_event`` whose failures (a monitoring server gone, say) are reported once and then
    ignored: monitoring never stops the work."""
    warn = WarnOnce(lambda text: print(f"warning: {text}", file=sys.stderr))
    return harmless(on_event or (lambda event: None), warn, "progress reporting")


@dataclass
class Reports:
    """What the workers have reported so far; records other than results and errors go on to
    ``report``."""

    read: Callable[[], list[Event]]
    report: Callable[[Event], None]
    result: dict | None = None
    errors: list[Event] = field(default_factory=list)
    stopped: list[Event] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # this node's workers, as they started

    def take(self) -> None:
        for event in self.read():
            if event["kind"] == "result":
                self.result = event["result"]
            elif event["kind"] == "error":
                self.errors.append(event)
            else:
                if event["kind"] == "started":
                    self.pids.append(event["pid"])
                elif event["kind"] == "stopped":
                    self.stopped.append(event)
                self.report(event)


# --- stopping the workers when the caller is interrupted

ASK_EVERY = 30.0  # seconds between two SIGTERMs to a worker that has not stopped yet


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises :class:`Terminated` in the main thread while the workers run, unless the
    caller handles SIGTERM itself (Prefect's flow engine raises its own exception)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_ignored():
    """SIGINT and SIGTERM do nothing (in the main thread) while the workers save: a second Ctrl-C
    does not cut the wait short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(proc: subprocess.Popen, workers: list[int], expected: int, grace: float) -> None:
    """Ask the workers of torchrun ``proc`` to stop, wait up to ``grace`` seconds for them to save
    (training: a checkpoint at its current step) and exit, then SIGKILL torchrun if still there.

    When all ``expected`` workers have reported their pid, SIGTERM goes to each of them (while it
    is still a child of ``proc``) every ASK_EVERY seconds: a repeat changes nothing, and it makes up
    for one that came before a worker set its handler. Else it goes once to torchrun, which passes
    it on but kills its workers after its own shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT from
    torch 2.12, 30 s before)."""
    if proc.poll() is not None:
        return
    print(f"stopping the workers: waiting up to {grace:.0f} s for them to save their work (Ctrl-C "
          f"is ignored meanwhile; kill -9 {os.getpid()} leaves it to them)", file=sys.stderr)
    with _signals_ignored():
        direct = len([pid for pid in workers if procs.parent(pid) == proc.pid]) == expected
        if not direct:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in workers if direct else ():
                if procs.parent(pid) == proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(ASK_EVERY, max(deadline - time.monotonic(), 0.0)))
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class StopAsked(Exception):
    """``stop`` was set while the workers ran (:func:`run`), or a stage's work in its own process
    was asked to stop (a Cancel from Prefect)."""


def run(work: Callable, cfg: Config, args: dict, on_event: Callable[[Event], None] | None = None,
        poll: float = 0.5, grace: float | None = None,
        stop: threading.Event | None = None) -> dict | None:
    """Call the library function ``work(cfg, **args, progress=...)`` on every process
    ``cfg.launch`` describes; returns rank 0's result (None on a node without rank 0).

    Interrupted (Ctrl-C, SIGTERM, an exception), it asks the workers to stop and waits up to
    ``grace`` seconds (default: ``SRA2_STOP_GRACE`` or 600) for them to save, then the interrupt
    goes on: the process ends with 130 after Ctrl-C, 143 after SIGTERM. Workers that stopped on a
    signal of their own raise :class:`WorkersStopped`, and so do workers stopped because ``stop``
    was set (a Cancel from Prefect): training saves the step in progress first."""
    settings = plan(cfg.launch)
    grace = worker.stop_grace() if grace is None else grace
    with tempfile.TemporaryDirectory(prefix=f"sra2-{work.__name__}-") as tmp:
        config, events = Path(tmp) / "config.json", Path(tmp) / "events.jsonl"
        config.write_text(cfg.model_dump_json())
        events.touch()
        cmd = [sys.executable, "-m", "torch.distributed.run", *settings.launcher_args(),
               "-m", worker.__name__, f"{work.__module__}:{work.__name__}",
               str(config), json.dumps(args)]
        env = worker_env(settings.nproc_per_node, {
            "SRA2_EVENTS": str(events), worker.PARENT_PID: str(os.getpid()),
            worker.STOP_GRACE: str(grace), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(math.ceil(grace))})
        with _sigterm_raises():
            # a session of its own: a terminal's Ctrl-C reaches this process alone, which stops the
            # workers once and waits for them (torchrun would give them 30 s at most)
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            reports = Reports(follow(events), shielded(on_event))
            try:
                while True:
                    finished = proc.poll() is not None  # read after it ends: nothing is missed
                    reports.take()
                    if finished:
                        break
                    if stop is None:
                        time.sleep(poll)
                    elif stop.wait(poll):
                        raise StopAsked
            except BaseException as e:
                _stop(proc, reports.pids, settings.nproc_per_node, grace)
                reports.take()
                said = (stop_message(reports.stopped) if reports.stopped else
                        "the workers were stopped; what they finished is kept: run the stage "
                        "again to go on")
                if isinstance(e, StopAsked):
                    raise WorkersStopped(said) from None
                if reports.stopped:
                    print(said, file=sys.stderr)
                raise
    if reports.errors:
        raise failure(reports.errors, proc.returncode)
    if reports.stopped:
        raise WorkersStopped(stop_message(reports.stopped))
    if proc.returncode:
        raise failure([], proc.returncode)
    return reports.result
