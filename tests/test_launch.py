"""Worker processes started by torch.distributed.run: the plan, several processes and nodes
training like one, and a worker's own error reaching the caller."""

import socket
import threading
from pathlib import Path

import pytest

from sra2.config.params import ConfigError, Launch
from sra2.runtime import launch
from sra2.train.loop import train

from conftest import encoded_tiny, with_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return encoded_tiny(tmp_path_factory.mktemp("launch"),
                        train={"steps": 4, "ckpt_every": 2, "log_every": 2, "batch_per_gpu": 4,
                               "workers": 1})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on(cfg, latents, out: Path, **launch_keys):
    events = []
    result = launch.run(train, with_overrides(cfg, launch=launch_keys),
                        {"latents": str(latents), "out": str(out)}, events.append)
    return result, events


def test_plan_takes_slurm_environment_where_keys_are_unset():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
             "SLURM_JOB_NODELIST": "gpu[07-10],cpu1"}
    plan = launch.plan(Launch(nproc_per_node=8), slurm)
    assert (plan.nnodes, plan.node_rank, plan.endpoint) == (4, 2, "gpu07:29500")
    assert "--node_rank=2" in plan.launcher_args() and "--master_addr=gpu07" in plan.launcher_args()
    explicit = launch.plan(Launch(nproc_per_node=2, nnodes=2, node_rank=0,
                                  rdzv_endpoint="h:1"), slurm)
    assert (explicit.nnodes, explicit.node_rank, explicit.endpoint) == (2, 0, "h:1")
    single = launch.plan(Launch(), {})
    assert single.nnodes == 1 and "--standalone" in single.launcher_args()
    assert single.nproc_per_node == max(launch.gpus_visible(), 1)


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("gpu[3-5]", "gpu3"),
                                            ("a[01,04-06],b7", "a01"), ("x-y.z,w", "x-y.z")])
def test_first_slurm_host(nodelist, host):
    assert launch.first_host(nodelist) == host


@pytest.mark.parametrize("keys, message", [
    ({"nnodes": 2}, "launch.rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "nohostport"}, "launch.rdzv_endpoint"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "launch.node_rank"),
    ({"nproc_per_node": 0}, "launch.nproc_per_node")])
def test_bad_launch_settings_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        launch.plan(Launch(**keys), {})


def test_two_processes_write_the_bytes_of_one(tmp_path, setup):
    """One process runs 2 micro-batches of 4, two processes one each: the same sums in the same
    order, so the same bytes."""
    cfg, latents = setup
    one, _ = train_on(cfg, latents, tmp_path / "one", nproc_per_node=1)
    two, events = train_on(cfg, latents, tmp_path / "two", nproc_per_node=2)
    assert ((one["processes"], one["micro_batches"], two["processes"], two["micro_batches"])
            == (1, 2, 2, 1))
    assert (tmp_path / "one/ema.pt").read_bytes() == (tmp_path / "two/ema.pt").read_bytes()
    rows = [e for e in events if e["kind"] == "progress"]
    assert [e["done"] for e in rows] == [2, 4] and rows[-1]["info"]["loss"] == two["loss"]
    assert rows[-1]["info"]["checkpoint"].endswith("step-0000004.pt")


def test_two_nodes_train_like_one_process(tmp_path, setup):
    cfg, latents = setup
    train_on(cfg, latents, tmp_path / "one", nproc_per_node=1)
    endpoint, results = f"127.0.0.1:{free_port()}", {}

    def node(rank):
        results[rank] = train_on(cfg, latents, tmp_path / "two", nproc_per_node=1, nnodes=2,
                                 node_rank=rank, rdzv_endpoint=endpoint)[0]

    nodes = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in nodes:
        t.start()
    for t in nodes:
        t.join(300)
    assert results[0]["processes"] == 2 and results[1] is None  # rank 0 lives on node 0
    assert (tmp_path / "one/ema.pt").read_bytes() == (tmp_path / "two/ema.pt").read_bytes()


def test_a_worker_error_comes_first(tmp_path, setup):
    cfg, latents = setup
    with pytest.raises(launch.WorkerFailed,
                       match=r"^rank \d: ValueError: train.global_batch \(8\) "
                             r"must split into 2 process\(es\) x micro-batches"):
        train_on(with_overrides(cfg, train={"batch_per_gpu": 3}), latents, tmp_path,
                 nproc_per_node=2)


def test_monitoring_failures_never_stop_the_work(tmp_path, setup, capfd):
    cfg, latents = setup

    def broken(event):
        raise ConnectionError("the monitoring server is gone")

    result = launch.run(train, with_overrides(cfg, launch={"nproc_per_node": 1}),
                        {"latents": str(latents), "out": str(tmp_path)}, broken)
    assert result["steps"] == 4 and (tmp_path / "ema.pt").exists()
    assert capfd.readouterr().err.count("progress reporting failed") == 1
