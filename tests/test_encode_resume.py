"""The encode stage killed part-way resumes to the same bytes; two processes write what one does."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sra2.data.demo import write_demo_dataset
from sra2.data.store import ShardedStore

REPO = Path(__file__).resolve().parents[1]
ENCODE = "import sys; from sra2.config.params import load; " \
         "from sra2.data.encode import encode_dataset; " \
         "encode_dataset(load(sys.argv[1]), sys.argv[2])"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An ImageFolder big enough to kill the encoder in the middle, and params that read it."""
    root = tmp_path_factory.mktemp("resume")
    write_demo_dataset(root / "images", classes=4, per_class=48, min_side=64, max_side=200, seed=1)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "preset": "tiny",
        "data": {"root": str(root / "images"), "image_size": 64, "demo": None},
        "encode": {"batch_size": 4, "shard_size": 8, "chunk_size": 4, "workers": 0}}))
    return root, params


def snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file()}


def encode(params: Path, out: Path, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", ENCODE, str(params), str(out)], cwd=REPO,
                            env=env, **popen)


@pytest.fixture(scope="module")
def reference(setup):
    root, params = setup
    assert encode(params, root / "reference").wait() == 0
    return snapshot(root / "reference")


def test_killed_run_resumes_to_identical_bytes(setup, reference):
    root, params = setup
    out = root / "killed"
    proc = encode(params, out)
    deadline = time.monotonic() + 120
    while not (out / "done").is_dir() or len(list((out / "done").glob("shard-*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "encoder ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ShardedStore(out)
    assert 3 <= len(partial.done_shards()) < partial.num_shards  # really killed part-way
    assert encode(params, out).wait() == 0
    assert snapshot(out) == reference


def test_two_processes_write_the_store_one_writes(setup, reference):
    root, params = setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = root / "two"
    script = root / "encode_script.py"
    script.write_text(ENCODE.replace("; ", "\n"))
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script),
                          str(params), str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert snapshot(out) == reference
