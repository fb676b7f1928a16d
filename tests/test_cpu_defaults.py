"""CPU thread defaults (sra2.runtime.launch.cpu_threads) and a --help that imports no heavy
package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sra2.runtime import launch

REPO = Path(__file__).resolve().parents[1]
OMP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


def without_omp() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OMP}


@pytest.mark.parametrize("processes, threads", [(1, "8"), (3, "2"), (8, "1"), (16, "1")])
def test_processes_share_the_cores(eight_cores, processes, threads):
    assert launch.cpu_threads(processes, {}) == {"OMP_NUM_THREADS": threads,
                                                 "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_workers_get_a_share_on_the_cpu_unless_the_user_chose(eight_cores, monkeypatch):
    monkeypatch.setattr(launch, "gpus_visible", lambda: 0)
    env = launch.worker_env(2, {"SRA2_EVENTS": "e"}, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "SRA2_EVENTS": "e", "OMP_NUM_THREADS": "4",
                   "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert launch.worker_env(2, {}, mine) == mine


def test_gpu_workers_keep_torchrun_s_defaults(eight_cores, monkeypatch):
    monkeypatch.setattr(launch, "gpus_visible", lambda: 8)
    assert launch.worker_env(8, {"SRA2_EVENTS": "e"}, {"PATH": "/bin"}) == {
        "PATH": "/bin", "SRA2_EVENTS": "e"}


def test_the_flow_process_imports_torch_with_its_share_and_leaves_the_environment():
    code = ("import os\n"
            "os.sched_getaffinity = lambda pid: {0}  # one core: 1 thread, "
            "whatever torch's default\n"
            "from sra2.runtime import launch\n"
            "launch.import_torch()\n"
            "import torch\n"
            f"print(torch.get_num_threads(), [k for k in {OMP} if k in os.environ])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=without_omp(),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split("\n")[-2] == "1 []"


def stage_help(stage: str) -> str:
    return (f"sys.argv = ['flows.stages.{stage}', '--help']\n"
            f"runpy.run_module('flows.stages.{stage}', run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("run", [*map(stage_help, ("demo_data", "encode", "train", "sample",
                                                   "evaluate")),
                                 "from flows.cli import main; main(['train', '--help'])"])
def test_help_imports_neither_torch_nor_prefect(run):
    code = ("import runpy, sys\n"
            "try:\n"
            + "".join(f"    {line}\n" for line in run.split("\n")) +
            "except SystemExit:\n"
            "    pass\n"
            "print([m for m in ('torch', 'prefect', 'zarr') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "usage:" in out and out.split("\n")[-2] == "[]"
