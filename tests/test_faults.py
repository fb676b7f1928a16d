"""Faults cost at most the time since the last save: a signal saves the step in progress (every
rank at one step) and the rerun ends with the bytes of an unbroken run; a non-finite step is never
saved; old checkpoints go by a retention rule; workers of a launch killed with SIGKILL stop too.

Every process a test starts is ended in a finally block, by the pid it got (or learned from the
records of the processes it started), never by name."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sra2.runtime import atomic, launch, procs
from sra2.runtime.stopping import Stopped
from sra2.train.checkpoints import step_file
from sra2.train.loop import NonFiniteError, build_trainer, check_weights, train

from conftest import encoded_tiny, with_overrides

PARENT = '''
import json, sys
from sra2.runtime import launch
from sra2.config.params import Config
from sra2.train.loop import train

if __name__ == "__main__":
    config, latents, out, events = sys.argv[1:]

    def record(event):
        with open(events, "a") as f:
            f.write(json.dumps(event) + "\\n")

    cfg = Config.model_validate_json(open(config).read())
    launch.run(train, cfg, {"latents": latents, "out": out}, record, poll=0.2)
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 2 micro-batches of 4 on one process, one on each of two: the same bytes
    return encoded_tiny(tmp_path_factory.mktemp("faults"),
                        train={"batch_per_gpu": 4, "workers": 1, "log_every": 5})


def run_folder(out: Path) -> Path:
    (run,) = (out / "checkpoints").iterdir()
    return run


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "ema.pt").read_bytes() == (b / "ema.pt").read_bytes()
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(path: Path, kind: str, proc: subprocess.Popen, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not any(e["kind"] == kind for e in records(path)):
        assert proc.poll() is None, f"the launch ended ({proc.returncode}) before a {kind} record"
        assert time.monotonic() < deadline, f"no {kind} record after {timeout} s"
        time.sleep(0.2)
    return records(path)


def start_launch(tmp_path: Path, cfg, latents: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """A process that runs sra2.runtime.launch.run(train, ...) as a flow does, writing the records
    it gets to a file; its output goes to tmp_path/launch.log."""
    (tmp_path / "parent.py").write_text(PARENT)
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    events = tmp_path / "events.jsonl"
    with open(tmp_path / "launch.log", "w") as log:
        args = [tmp_path / "parent.py", tmp_path / "config.json", latents, out, events]
        proc = subprocess.Popen([sys.executable, *map(str, args)],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, events


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_signal_saves_the_step_in_progress_and_the_rerun_ends_as_an_unbroken_run(tmp_path, setup):
    """Step 11 lies between two metrics rows: the checkpoint carries the half-done row."""
    cfg, latents = setup
    cfg = with_overrides(cfg, train={"steps": 20, "ckpt_every": 100})
    train(cfg, latents, tmp_path / "straight")

    def signal_at_10(done, total, info):
        if done == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped, match=r"^stopped at step 11 on SIGTERM: saved .*step-0000011\.pt; "
                                      r"run the stage again \(dvc repro\)"):
        train(cfg, latents, tmp_path / "resumed", signal_at_10)
    run = run_folder(tmp_path / "resumed")
    assert (run / "latest").read_text() == "step-0000011.pt\n"
    assert not (tmp_path / "resumed" / "ema.pt").exists()
    train(cfg, latents, tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.fixture
def torch_one_thread():
    """This process computes as the workers do (OMP_NUM_THREADS=1): the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interrupt_a_launch(tmp_path: Path, cfg, latents: Path, nproc: int) -> int:
    """SIGTERM to a process running sra2.runtime.launch.run(train, ...) once training has started:
    the launch waits for its workers to save one step, all of them the same, and exits 143.
    Returns that step."""
    proc, events = start_launch(tmp_path, cfg, latents, tmp_path / "resumed")
    try:
        wait_for(events, "progress", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
    finally:
        end(proc)
    stops = [e for e in records(events) if e["kind"] == "stopped"]
    assert sorted(e["rank"] for e in stops) == list(range(nproc))
    (step,) = {e["step"] for e in stops}
    checkpoint = Path(stops[0]["checkpoint"])
    assert checkpoint.name == f"{step_file(step)}.pt" and checkpoint.exists()
    assert (checkpoint.parent / "latest").read_text() == checkpoint.name + "\n"
    assert f"stopped at step {step} on SIGTERM" in (tmp_path / "launch.log").read_text()
    return step


def test_sigterm_to_a_launch_saves_the_step_and_the_rerun_ends_as_an_unbroken_run(
        tmp_path, setup, torch_one_thread):
    """One worker; the rerun and the unbroken run go in this process (the same bytes)."""
    cfg, latents = setup
    cfg = with_overrides(cfg, launch={"nproc_per_node": 1},
                         train={"steps": 100_000, "ckpt_every": 100_000})
    step = interrupt_a_launch(tmp_path, cfg, latents, nproc=1)
    # the last row is off the cadence; no reader processes (the same batches, sooner)
    finish = with_overrides(cfg, train={"steps": step + 7, "workers": 0})
    for out in ("resumed", "straight"):
        train(finish, latents, tmp_path / out)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_two_ranks_stop_at_one_step_and_the_rerun_ends_as_an_unbroken_run(tmp_path, setup):
    """Two workers (gloo). ckpt_minutes 0.001 adds a timed save every few steps, which rank 0
    decides for both; the checkpoints hold each rank's half-done metrics row."""
    cfg, latents = setup
    cfg = with_overrides(cfg, launch={"nproc_per_node": 2},
                         train={"steps": 100_000, "ckpt_every": 100_000, "ckpt_minutes": 0.001})
    step = interrupt_a_launch(tmp_path, cfg, latents, nproc=2)
    finish = with_overrides(cfg, train={"steps": step + 7, "workers": 0})

    def finish_in(out: str) -> None:
        launch.run(train, finish, {"latents": str(latents), "out": str(tmp_path / out)})

    with ThreadPoolExecutor(2) as pool:  # two independent launches, at once
        list(pool.map(finish_in, ("resumed", "straight")))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_a_non_finite_step_fails_the_run_and_is_never_saved(tmp_path, setup):
    cfg, latents = setup
    cfg = with_overrides(cfg, train={"lr": 1e20, "steps": 20, "ckpt_every": 1, "log_every": 1})
    with pytest.raises(NonFiniteError, match=r"^training step \d+ is not finite \(loss=nan.*"
                                             r"stopped before saving it") as failed:
        train(cfg, latents, tmp_path)
    bad = int(re.search(r"training step (\d+)", str(failed.value))[1])
    run = run_folder(tmp_path)
    if (run / "latest").exists():  # the last finite step, if any
        state = torch.load(run / (run / "latest").read_text().strip(), weights_only=True)
        assert state["step"] < bad
        assert all(torch.isfinite(t).all() for part in ("model", "ema", "heads")
                   for t in state[part].values())
    assert not any(int(p.name[5:12]) >= bad for p in run.glob("step-*.pt"))
    for path in tmp_path.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda word: pytest.fail(f"{path}: {word}"))
    assert "nan" not in (tmp_path / "metrics.csv").read_text()
    with pytest.raises(NonFiniteError, match=f"training step {bad} is not finite"):
        train(cfg, latents, tmp_path)  # resumes from the last finite checkpoint, and fails again


def test_non_finite_weights_are_never_saved(setup):
    cfg, latents = setup
    tr = build_trainer(cfg, (4, 4, 4), torch.device("cpu"), world=1)
    check_weights(tr, 1)
    with torch.no_grad():
        next(tr.ema.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="the weights after training step 7 are not finite"):
        check_weights(tr, 7)


def test_json_files_refuse_nan(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic.write_json(tmp_path / "m.json", {"fid": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_retention_keeps_the_newest_step_files_and_never_snapshots(tmp_path, setup):
    cfg, latents = setup
    cfg = with_overrides(cfg, train={"steps": 4, "ckpt_every": 2, "keep_checkpoints": 2})
    train(cfg, latents, tmp_path)
    run = run_folder(tmp_path)
    (run / "snapshots").mkdir()
    (run / "snapshots" / "step-0000002.pt").write_bytes(b"an evaluation snapshot")
    train(with_overrides(cfg, train={"steps": 12}), latents, tmp_path)
    assert sorted(p.name for p in run.iterdir()) == [
        "latest", "metrics.csv", "signature.json", "snapshots", "step-0000010.pt",
        "step-0000012.pt"]
    assert (run / "latest").read_text() == "step-0000012.pt\n"
    assert (run / "snapshots" / "step-0000002.pt").exists()


def test_checkpoints_also_come_every_ckpt_minutes(tmp_path, setup):
    cfg, latents = setup
    cfg = with_overrides(cfg, train={"steps": 5, "ckpt_every": 100, "ckpt_minutes": 1e-9,
                                     "keep_checkpoints": 10})
    train(cfg, latents, tmp_path)
    assert sorted(p.name for p in run_folder(tmp_path).glob("step-*.pt")) == [
        f"{step_file(s)}.pt" for s in range(1, 6)]


def test_workers_of_a_launch_killed_with_sigkill_save_and_exit(tmp_path, setup):
    """The workers watch the launching process: once it is gone they save and exit, and their
    fork servers and readers go with them."""
    cfg, latents = setup
    cfg = with_overrides(cfg, launch={"nproc_per_node": 2}, train={"steps": 100_000})
    proc, events = start_launch(tmp_path, cfg, latents, tmp_path / "out")
    watched: dict[int, str | None] = {}  # pid: start token, of the workers and torchrun
    workers: list[int] = []
    try:
        seen = wait_for(events, "progress", proc)
        workers = [e["pid"] for e in seen if e["kind"] == "started"]
        torchrun = {procs.parent(pid) for pid in workers}
        watched = {pid: procs.started_at(pid) for pid in (*workers, *torchrun)}
        assert len(workers) == 2 and len(torchrun) == 1 and None not in watched.values()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                any(procs.started_at(pid) == token for pid, token in watched.items())
                or any(procs.session(pid) for pid in workers)):
            time.sleep(0.5)
        assert not [pid for pid, token in watched.items() if procs.started_at(pid) == token]
        # fork servers, readers
        assert not [procs.session(pid) for pid in workers if procs.session(pid)]
    finally:
        end(proc)
        leftovers = [pid for pid, token in watched.items() if procs.started_at(pid) == token]
        for pid in leftovers + [p for leader in workers for p in procs.session(leader)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    run = run_folder(tmp_path / "out")  # they saved on the way out
    assert (run / (run / "latest").read_text().strip()).exists()
