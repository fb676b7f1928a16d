"""Monitoring never costs work: a training stage whose Prefect server dies part-way through
finishes, writes its outputs and exits 0, having warned once and kept its local log."""

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.harness.server import free_port, healthy
from sra2.data.latents import write_synthetic_store
from sra2.runtime.procs import started_at

from conftest import stop

REPO = Path(__file__).resolve().parents[1]
STEPS = 300  # the server dies at step 5; the rest takes 8-15 s here (tiny: 20-40 steps/s)


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` of this test's own (its own home and database); yields the
    process and its API URL, and ends it by its pid."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                                   "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not healthy(api):
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the Prefect server did not start in 60 s"
            time.sleep(0.5)
        yield server, api
    finally:
        stop(server)


def artifact_keys(api: str) -> set[str]:
    request = urllib.request.Request(f"{api}/artifacts/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return {a["key"] for a in json.load(answer)}


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the stage ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def test_training_finishes_when_the_prefect_server_dies_mid_run(tmp_path, prefect_server):
    server, api = prefect_server
    write_synthetic_store(tmp_path / "latents", 24, (4, 4, 4), 3, chunk_size=4, shard_size=8)
    params = tmp_path / "params.yaml"
    # workers 0: batches read in the training process, one process less to start
    params.write_text(yaml.safe_dump({"preset": "tiny", "train": {
        "steps": STEPS, "log_every": 5, "ckpt_every": 200, "workers": 0}}))
    # the repository's code, run from a scratch folder: data/logs lands there
    env = {**os.environ, "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "data/logs/train.log"
    start = time.monotonic()
    with open(tmp_path / "stage.out", "w") as out:
        stage = subprocess.Popen(
            [sys.executable, "-m", "flows.stages.train", "--params", str(params), "--latents",
             str(tmp_path / "latents"), "--out", str(tmp_path / "train"), "--summary",
             str(tmp_path / "train.json")], cwd=tmp_path, env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        # the first metrics row: training runs, and the UI has its progress, table and picture
        wait_for(lambda: log.exists() and f"train: step 5 / {STEPS}" in log.read_text(), 60, stage,
                 "first training row")
        shown = {"train-progress", "train-metrics", "train-pictures"}
        wait_for(lambda: shown <= artifact_keys(api), 20, stage, "artifacts")
        stop(server, signal.SIGKILL)  # the server dies mid-run
        killed = time.monotonic() - start
        code = stage.wait(75)
    finally:
        stop(stage, signal.SIGINT)
    output = (tmp_path / "stage.out").read_text()
    took = time.monotonic() - start
    assert code == 0, output[-4000:]
    assert (tmp_path / "train/ema.pt").stat().st_size > 0
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == STEPS

    lines = log.read_text().splitlines()
    warnings = [i for i, line in enumerate(lines) if "the Prefect API failed" in line]
    assert len(warnings) == 1, "\n".join(lines)  # warned once, however many calls came after
    assert lines[warnings[0]].split()[2] == "WARNING"
    # the local log goes on: every row after the kill (at step 5), then the end
    rows = [line for line in lines if f" / {STEPS} (" in line]
    assert len(rows) == STEPS // 5 and f"step {STEPS} / {STEPS}" in rows[-1]
    assert any("train finished in" in line for line in lines[warnings[0]:])
    assert "Traceback" not in output, output[-4000:]  # no storm of retried-call tracebacks
    print(f"server killed {killed:.0f} s after the stage started; the stage took {took:.0f} s")



def descendants(pid: int) -> dict[int, str | None]:
    """The processes below ``pid``, each with its start token (sra2.runtime.procs.started_at)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    below, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        below[p] = started_at(p)
        todo += children.get(p, [])
    return below


def stage_command(tmp_path: Path, steps: int) -> list[str]:
    params = tmp_path / f"params-{steps}.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "train": {
        "steps": steps, "log_every": 5, "ckpt_every": 200, "workers": 0}}))
    return [sys.executable, "-m", "flows.stages.train", "--params", str(params), "--latents",
            str(tmp_path / "latents"), "--out", str(tmp_path / "train"), "--summary",
            str(tmp_path / "train.json")]


def test_a_killed_stage_takes_its_server_along_and_the_next_start_marks_its_run_crashed(tmp_path):
    """SIGKILL gives a stage no chance to clean up: its temporary Prefect server must still go
    (the kernel ends it with its parent), and the run it left "Running" in the database is marked
    Crashed when the next stage starts."""
    write_synthetic_store(tmp_path / "latents", 24, (4, 4, 4), 3, chunk_size=4, shard_size=8)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    record = tmp_path / "data/logs/train.running.json"
    below: dict[int, str | None] = {}
    with open(tmp_path / "killed.out", "w") as out:
        stage = subprocess.Popen(stage_command(tmp_path, 100_000), cwd=tmp_path, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(record.exists, 90, stage, "the flow run's record")
        run = json.loads(record.read_text())
        below = descendants(stage.pid)
        assert run["server_pid"] in below
        stop(stage, signal.SIGKILL)
        deadline = time.monotonic() + 60  # the workers save their step before they go
        while any(started_at(pid) == token for pid, token in below.items()):
            assert time.monotonic() < deadline, "processes of the killed stage are still running"
            time.sleep(0.5)
    finally:
        stop(stage, signal.SIGKILL)
        for pid, token in below.items():  # what this test started, by pid
            if started_at(pid) == token:
                os.kill(pid, signal.SIGKILL)

    database = tmp_path / "prefect-home/prefect.db"

    def state() -> str:
        with contextlib.closing(sqlite3.connect(database)) as db:
            (kind,) = db.execute("SELECT state_type FROM flow_run WHERE id = ?",
                                 (run["flow_run"],)).fetchone()
        return kind

    assert state() == "RUNNING"  # what a killed stage leaves behind
    done = subprocess.run(stage_command(tmp_path, 2), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert state() == "CRASHED"
    assert f"pid {run['pid']}" in (tmp_path / "data/logs/train.log").read_text()
    assert not record.exists()
    # the second run's last log line reached its server before the server stopped
    with contextlib.closing(sqlite3.connect(database)) as db:
        (finished,) = db.execute("SELECT count(*) FROM log WHERE message LIKE "
                                 "'Finished in state Completed%'").fetchone()
    assert finished == 1 and "Error logging to API" not in done.stderr, done.stderr[-3000:]


CANCEL_BOUND = 30  # s from the Cancel to the stage's end: a 1 s poll, the 0.5 s launch loop, the
# workers ending the step in progress and saving it (a few s here), torchrun's exit


def start_training(tmp_path: Path, api: str, steps: int = 100_000):
    """A tiny train stage against ``api``, once it has logged its first row; returns the process,
    its command line, environment and parameter file, and its flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    write_synthetic_store(tmp_path / "latents", 24, (4, 4, 4), 3, chunk_size=4, shard_size=8)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "train": {
        "steps": steps, "log_every": 5, "ckpt_every": 100_000, "workers": 0}}))
    env = {**os.environ, "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.stages.train", "--params", str(params), "--latents",
               str(tmp_path / "latents"), "--out", str(tmp_path / "train"), "--summary",
               str(tmp_path / "train.json")]
    log = tmp_path / "data/logs/train.log"
    with open(tmp_path / "stage.out", "w") as out:
        stage = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log.exists() and f"train: step 5 / {steps}" in log.read_text(), 90,
                 stage, "first training row")
        with get_client(sync_client=True) as client:
            [run] = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["sra2-train"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    except BaseException:
        stop(stage, signal.SIGINT)
        raise
    return stage, command, env, params, run


def saved_step(tmp_path: Path, message: str) -> int:
    """The step a state's message says was saved, checked against the step file on disk."""
    step = int(re.search(r"stopped at step (\d+)", message)[1])
    [saved] = (tmp_path / "train/checkpoints").glob(f"*/step-{step:07d}.pt")
    assert f"saved {saved}" in message, message
    return step


def test_a_cancel_from_prefect_saves_the_step_and_ends_the_run_cancelled(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateType

    stage, command, env, params, run = start_training(tmp_path, prefect_api)
    try:
        with get_client(sync_client=True) as client:
            asked = time.monotonic()
            client.set_flow_run_state(run.id, State(type=StateType.CANCELLING), force=True)
            code = stage.wait(CANCEL_BOUND)
            took = time.monotonic() - asked
            state = client.read_flow_run(run.id).state
    finally:
        stop(stage, signal.SIGINT)
    output = (tmp_path / "stage.out").read_text()
    assert code != 0, output[-4000:]  # dvc repro stops here: sample never starts
    assert state.type == StateType.CANCELLED and state.name == "Cancelled", state
    step = saved_step(tmp_path, state.message)
    assert "error: cancelled from Prefect" in output
    print(f"cancelled at step {step}: the stage ended {took:.1f} s after the Cancel")

    # the rerun resumes there (byte-identical resumes: tests/test_faults.py, the same save)
    params.write_text(yaml.safe_dump({"preset": "tiny", "train": {
        "steps": step + 5, "log_every": 5, "ckpt_every": 100_000, "workers": 0}}))
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == step + 5


def test_sigterm_that_saved_is_recorded_as_preempted_not_crashed(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    stage, _, _, _, run = start_training(tmp_path, prefect_api)
    try:
        stage.send_signal(signal.SIGTERM)  # what Slurm and Kubernetes send before the end
        code = stage.wait(CANCEL_BOUND)
    finally:
        stop(stage, signal.SIGINT)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert code == 128 + signal.SIGTERM, (tmp_path / "stage.out").read_text()[-4000:]
    assert state.type == StateType.CANCELLED and state.name == "Preempted", state
    assert state.message.startswith("preempted (SIGTERM)")
    saved_step(tmp_path, state.message)


def test_no_stage_starts_under_a_cancelled_pipeline_run(prefect_api, tmp_path, monkeypatch):
    """A Cancel of the pipeline run that lands while DVC moves on to the next stage: that stage
    ends at once, naming the run, and its body never runs (flows.harness.runner.call_flow)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from flows.harness.runner import PARENT_RUN, run_stage, stage_flow

    ran = []

    @stage_flow("probe")
    def probe_flow() -> None:
        ran.append("body")

    @flow(name="sra2-pipeline-probe")
    def pipeline() -> None:
        pass

    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(pipeline, state=Cancelled(message="Cancel from the UI"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PARENT_RUN, str(parent.id))
    with pytest.raises(SystemExit, match=f"the pipeline run {parent.id} was cancelled: "
                                         "sra2-probe does not start"):
        run_stage(probe_flow, "tiny")
    assert ran == []
