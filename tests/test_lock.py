"""One writer per output: a second run on an output stops at once naming the holder; a killed
holder leaves no lock behind; two encode stages started together on one store: one writes. And
the shared lock of readers keeps a builder out until their with-block ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.harness.common import output_locks
from sra2.data.demo import write_demo_dataset
from sra2.data.store import ShardedStore
from sra2.runtime.lock import EXCLUSIVE, SHARED, FileLock, OutputBusy, hold, lock_path

from conftest import stop, with_overrides

REPO = Path(__file__).resolve().parents[1]
HOLD = """import sys, time
from sra2.runtime.lock import hold
with hold(sys.argv[1:]):
    print("locked", flush=True)
    time.sleep(600)
"""
TAKE = """import sys
from sra2.runtime.lock import hold
with hold(sys.argv[1:]):
    print("took it")
"""
READ = """import sys, time
from pathlib import Path
from sra2.runtime.lock import SHARED, FileLock
with FileLock(Path(sys.argv[1])) as lock:
    lock.take(SHARED)
    print("reading", flush=True)
    sys.stdin.readline()
print("closed", flush=True)
time.sleep(600)
"""


def python(code: str, *args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def take(*outputs) -> subprocess.CompletedProcess:
    proc = python(TAKE, *outputs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock of tmp_path/out until it is killed."""
    proc = python(HOLD, tmp_path / "out", stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        stop(proc, signal.SIGKILL)


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path, holder):
    start = time.monotonic()
    second = take(tmp_path / "out")
    assert second.returncode != 0 and "OutputBusy" in second.stderr
    assert f"pid {holder.pid} on host " in second.stderr and "since " in second.stderr
    assert "time.sleep(600)" in second.stderr  # the holder's command line
    assert time.monotonic() - start < 10  # at once: no waiting for the lock


def test_the_lock_is_free_once_its_holder_is_killed(tmp_path, holder):
    stop(holder, signal.SIGKILL)
    assert lock_path(tmp_path / "out").exists()  # the file outlives kill -9, the lock does not
    again = take(tmp_path / "out")
    assert again.returncode == 0 and again.stdout.strip() == "took it", again.stderr
    assert not lock_path(tmp_path / "out").exists()  # a clean exit removes its lock file


def test_a_busy_output_leaves_the_others_unlocked(tmp_path, holder):
    with pytest.raises(OutputBusy, match=f"pid {holder.pid} "):
        with hold([tmp_path / "another", tmp_path / "out"]):
            pass
    with hold([tmp_path / "another"]):  # released when the busy one was refused
        pass


def test_readers_keep_a_builder_out_until_their_with_block_ends(tmp_path):
    path = tmp_path / "copy.lock"
    reader = python(READ, path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert reader.stdout.readline().strip() == "reading"
        with FileLock(path) as lock:
            assert lock.take(SHARED, wait=False)  # readers share it
            lock.release()
            assert not lock.take(EXCLUSIVE, wait=False)  # a builder is refused at once
            reader.stdin.write("done\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "closed"
            # the reader still runs: its with-block, not its exit, let go
            assert reader.poll() is None and lock.take(EXCLUSIVE, wait=False)
    finally:
        stop(reader, signal.SIGKILL)


def test_only_node_rank_0_takes_the_lock(tmp_path, holder, tiny):
    nodes = {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": "node0:29500"}
    with output_locks(with_overrides(tiny, launch={**nodes, "node_rank": 1}), [tmp_path / "out"]):
        pass  # another node of the same run: it writes the output alongside node 0
    with pytest.raises(OutputBusy):
        with output_locks(with_overrides(tiny, launch={**nodes, "node_rank": 0}),
                          [tmp_path / "out"]):
            pass


def test_two_encode_stages_on_one_store_one_writes(tmp_path, prefect_api):
    write_demo_dataset(tmp_path / "images", classes=3, per_class=8, min_side=40, max_side=140,
                       seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny",
                                      "data": {"root": str(tmp_path / "images"), "demo": None}}))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    runs = []
    try:
        for i in range(2):  # started together, on one --out, each with its own summary
            command = [sys.executable, "-m", "flows.stages.encode", "--params", str(params),
                       "--out", str(tmp_path / "latents"),
                       "--summary", str(tmp_path / f"encode-{i}.json")]
            with open(tmp_path / f"encode-{i}.log", "w") as log:  # a file: no pipe to fill up
                runs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT))
        codes = [proc.wait(300) for proc in runs]
        logs = [(tmp_path / f"encode-{i}.log").read_text() for i in range(2)]
        assert codes.count(0) == 1, (codes, logs)  # exactly one succeeds
        winner = codes.index(0)
        loser = 1 - winner
        assert "OutputBusy" in logs[loser], logs[loser]
        assert f"pid {runs[winner].pid} " in logs[loser], logs[loser]  # names the holder
        store = ShardedStore(tmp_path / "latents")
        assert len(store.done_shards()) == store.num_shards  # the winner wrote all of it
        assert (tmp_path / f"encode-{winner}.json").exists()
        assert not (tmp_path / f"encode-{loser}.json").exists()
    finally:
        for proc in runs:
            # SIGINT lets the flow stop its torchrun launcher and workers
            # (sra2.runtime.launch._stop)
            stop(proc, signal.SIGINT, grace=60)
