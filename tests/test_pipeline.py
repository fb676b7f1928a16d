"""End to end: `dvc repro` of the tiny preset in a temporary copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", log)


def set_params(work: Path, **values) -> None:
    """params.yaml keeps every section (DVC needs the keys it tracks), with these values set."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump({**params, **values}))


def copy_repo(work: Path, **params) -> Path:
    """The repository's tracked and new files (no data) in ``work``, a git repo of its own."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file() and not rel.startswith("data/"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    set_params(work, **params)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    work = copy_repo(tmp_path_factory.mktemp("repo"), preset="tiny")
    # one intra-op thread in every process, as torchrun gives each of several: comparable bytes
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = run(["dvc", "repro"], work, env)
    return work, env, log


def test_repro_runs_every_stage_and_writes_every_artifact(pipeline):
    work, env, log = pipeline
    assert ran_stages(log) == ["demo-data", "encode", "train", "sample", "evaluate"]
    import zarr

    assert len(list((work / "data/demo/train").rglob("*.JPEG"))) == 24
    latents = zarr.open_group(work / "data/latents", mode="r")
    assert latents["mean"].shape == (24, 4, 4, 4) and latents["std"].dtype == np.float32
    assert (latents["std"][:] > 0).all()
    assert json.loads((work / "data/encode.json").read_text())["encoded"] == 24
    rows = (work / "data/train/metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 1 + 40 // 5
    with np.load(work / "data/samples/samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert (work / "data/samples/grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((work / "data/metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["inception_score"])
    assert "RANDOM" in metrics["inception_weights"]
    shown = run(["dvc", "metrics", "show", "--json"], work, env)
    assert '"fid"' in shown and '"inception_score"' in shown


def test_second_repro_has_nothing_to_do(pipeline):
    work, env, _ = pipeline
    log = run(["dvc", "repro"], work, env)
    assert ran_stages(log) == [] and "up to date" in log


def flow_runs_since(start) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=start)))
        return sorted(client.read_flow(r.flow_id).name for r in runs)


def test_two_processes_give_the_bytes_of_one_and_one_flow_run_per_stage(pipeline, tmp_path_factory):
    from datetime import datetime, timezone

    work, env, _ = pipeline
    two = copy_repo(tmp_path_factory.mktemp("repo2"), preset="tiny", launch={"nproc_per_node": 2})
    start = datetime.now(timezone.utc)
    run(["dvc", "repro"], two, env)
    assert flow_runs_since(start) == sorted(f"sra2-{s}" for s in
                                            ("demo-data", "encode", "train", "sample", "evaluate"))
    for output in ("data/train/ema.pt", "data/samples/samples.npz"):
        assert (work / output).read_bytes() == (two / output).read_bytes(), output
    processes = [json.loads((w / "data/train.json").read_text())["processes"] for w in (work, two)]
    assert processes == [1, 2]


def test_a_training_parameter_reruns_train_sample_evaluate_only(pipeline):
    work, env, _ = pipeline
    set_params(work, preset="tiny", train={"lr": 2.0e-4})
    log = run(["dvc", "repro"], work, env)
    assert ran_stages(log) == ["train", "sample", "evaluate"]
