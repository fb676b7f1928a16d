"""The stage's temporary Prefect server, which dies with the stage.

Without ``PREFECT_API_URL`` Prefect starts a temporary server of its own for each process that
runs a flow, and stops it at a normal exit only: a stage killed with SIGKILL left it running for
good (~200 MB). This module starts the same server (Prefect's API app under uvicorn, on a free
local port, the UI off) through ``python -m flows.harness.server PARENT_PID PORT``, which first asks
the kernel to send it SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``), so however the
stage ends, its server ends too. The database is the usual one (``PREFECT_HOME``), so runs stay
browsable with ``prefect server start``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def wanted() -> bool:
    """Whether Prefect would start a temporary server here: no API URL, temporary servers
    allowed."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def temporary() -> Iterator[tuple[str, int]]:
    """Start a server for this process; yields its API URL and pid, and stops it on the way out
    (and, through the kernel, when this process dies). RuntimeError if it does not answer within
    Prefect's ``server.ephemeral.startup_timeout_seconds``."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    server = subprocess.Popen([sys.executable, "-m", "flows.harness.server",
                               str(os.getpid()), str(port)],
                              env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + max(settings.server.ephemeral.startup_timeout_seconds, 30)
        while not healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server (pid {server.pid}, port {port}) "
                                   f"did not start (exit code {server.poll()})")
            time.sleep(0.2)
        yield api, server.pid
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def for_this_process() -> Iterator[tuple[str, int] | None]:
    """Where no server is named (:func:`wanted`), a :func:`temporary` one, drained of the run's
    last lines before it stops: yields its API URL and pid, else None."""
    if not wanted():
        yield None
        return
    with temporary() as started:
        try:
            yield started
        finally:
            drain()


def drain() -> None:
    """Send what Prefect's background workers still hold (the run's last log lines, its events)
    while the server still answers; at most a few seconds each."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # monitoring: never an error of the stage's
            worker.drain_all(timeout=5)


def die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere nothing),
    and exit at once if the parent is already gone (it may die before the request is made)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    die_with(int(sys.argv[1]))
    serve(int(sys.argv[2]))
