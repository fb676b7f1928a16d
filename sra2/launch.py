"""Start a stage's worker processes with torch.distributed.run and follow what they report.

The parent (a Prefect flow, or any caller) runs ``python -m torch.distributed.run ... -m
sra2.worker <module:function>`` on every GPU of the node, or on several nodes (the same command on each).
Workers report through a file of JSON lines (:mod:`sra2.worker`): rank 0 appends progress and its
result, any rank appends its error. The parent reads the file as it grows, hands each record to
``on_event`` and returns the result, or raises :class:`WorkerFailed` with the worker's own message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from sra2 import worker
from sra2.config import Config, ConfigError, Launch

Event = dict
SLURM_PORT = 29500


class WorkerFailed(RuntimeError):
    """A worker process failed; the message starts with its rank and its own error."""


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


def _stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM the launcher we started (it passes it to its workers), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def failure(errors: list[Event], returncode: int) -> WorkerFailed:
    if not errors:
        return WorkerFailed(f"the workers exited with code {returncode} without reporting an "
                            "error (killed, or out of memory?); their output is above")
    first = errors[0]
    others = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
    return WorkerFailed(f"rank {first['rank']}: {first['error']}{others}\n\n"
                        f"worker traceback:\n{first['traceback']}")


def shielded(on_event: Callable[[Event], None] | None) -> Callable[[Event], None]:
    """``on_event`` whose failures (a monitoring server gone, say) are reported once and then
    ignored: monitoring never stops the work."""
    warned = False

    def call(event: Event) -> None:
        nonlocal warned
        try:
            if on_event is not None:
                on_event(event)
        except Exception as e:  # noqa: BLE001 - any monitoring failure, whatever its kind
            if not warned:
                warned = True
                print(f"warning: progress reporting failed ({type(e).__name__}: {e}); the work "
                      "goes on without it", file=sys.stderr)

    return call


def run(work: Callable, cfg: Config, args: dict, on_event: Callable[[Event], None] | None = None,
        poll: float = 0.5) -> dict | None:
    """Call the library function ``work(cfg, **args, progress=...)`` on every process
    ``cfg.launch`` describes; returns rank 0's result (None on a node without rank 0)."""
    settings = plan(cfg.launch)
    with tempfile.TemporaryDirectory(prefix=f"sra2-{work.__name__}-") as tmp:
        config, events = Path(tmp) / "config.json", Path(tmp) / "events.jsonl"
        config.write_text(cfg.model_dump_json())
        events.touch()
        cmd = [sys.executable, "-m", "torch.distributed.run", *settings.launcher_args(),
               "-m", worker.__name__, f"{work.__module__}:{work.__name__}", str(config), json.dumps(args)]
        proc = subprocess.Popen(cmd, env={**os.environ, "SRA2_EVENTS": str(events)})
        read, result, errors, report = follow(events), None, [], shielded(on_event)
        try:
            while True:
                finished = proc.poll() is not None  # read after it ends: nothing is missed
                for event in read():
                    if event["kind"] == "result":
                        result = event["result"]
                    elif event["kind"] == "error":
                        errors.append(event)
                    else:
                        report(event)
                if finished:
                    break
                time.sleep(poll)
        finally:
            _stop(proc)
    if errors or proc.returncode:
        raise failure(errors, proc.returncode)
    return result
