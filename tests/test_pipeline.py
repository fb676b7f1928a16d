"""End to end: `dvc repro` and `dvc exp run` of the tiny preset in a temporary copy of the
repository."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sra2.evaluate.plots import PALETTE

from conftest import stop

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(cmd, cwd, env, stdout_only=False):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout if stdout_only else out.stdout + out.stderr


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
    for key, value in (("user.name", "sra2 tests"), ("user.email", "tests@sra2.invalid")):
        subprocess.run(["git", "config", key, value], cwd=work, check=True)  # experiments commit
    return work


@contextlib.contextmanager
def serving(work: Path, env: dict, log: Path):
    """`sra2 serve` in ``work`` (its output in ``log``) until the block ends; stopped by its pid."""
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=work,
                                  env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not deployed("sra2-pipeline/repro"):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        yield
    finally:
        stop(server, grace=60)


def deployed(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name) is not None
        except ObjectNotFound:
            return False


def run_deployment(name: str, timeout: float = 1800, **parameters):
    """Start deployment ``name`` through the API, as the UI's Run button does; its flow run once
    it has ended."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment as start

    started = start(name, parameters=parameters, timeout=0)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while not (run := client.read_flow_run(started.id)).state.is_final():
            assert time.monotonic() < deadline, f"{name}: still {run.state.name}"
            time.sleep(2)
    return run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    """The tiny preset's pipeline, run as a user starts it from the Prefect UI: the served
    sra2-pipeline deployment, started through the API; its stages' output is the serve log."""
    work = copy_repo(tmp_path_factory.mktemp("repo"), preset="tiny")
    # one intra-op thread in every process, as torchrun gives each of several: comparable bytes
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    served = work.parent / "serve.log"
    with serving(work, env, served):
        parent = run_deployment("sra2-pipeline/repro")
    log = served.read_text()
    assert parent.state.is_completed(), f"{parent.state}\n{log[-4000:]}"
    return work, env, log, parent


def test_repro_runs_every_stage_and_writes_every_artifact(pipeline):
    work, env, log, _ = pipeline
    assert ran_stages(log) == ["demo-data", "encode", "train", "sample", "evaluate"]
    import zarr

    assert len(list((work / "data/demo/train").rglob("*.JPEG"))) == 24
    # the store of these encode settings, data/latents/<digest>/, named by data/latents.json
    pointer = json.loads((work / "data/latents.json").read_text())
    assert pointer["store"] == f"latents/{pointer['digest']}"
    latents = zarr.open_group(work / "data" / pointer["store"], mode="r")
    assert latents["mean"].shape == (24, 4, 4, 4) and latents["std"].dtype == np.float32
    assert (latents["std"][:] > 0).all()
    summary = json.loads((work / "data/encode.json").read_text())
    assert summary["encoded"] == summary["encoded_now"] == 24
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
    # the small results are git's (experiments commit them), the big outputs are not
    results = ["data/latents.json", "data/encode.json", "data/train.json", "data/metrics.json",
               "data/train/metrics.csv", "data/train/fid.csv"]
    big = ["data/latents", "data/train/ema.pt", "data/train/checkpoints",
           "data/samples/samples.npz"]
    ignored = subprocess.run(["git", "check-ignore", *results, *big], cwd=work,
                             capture_output=True, text=True).stdout.split()
    assert ignored == big


def test_the_served_pipeline_is_one_run_with_each_stage_a_subflow_in_order(pipeline):
    """Checked through the API, as the UI draws it: the deployment's run is the parent of one
    subflow run per stage, each hanging from a task of the parent named for it, tagged with the
    parent's pipeline id, and the run graph chains them in DVC's order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    *_, parent = pipeline
    stages = ["demo-data", "encode", "train", "sample", "evaluate"]
    with get_client(sync_client=True) as client:
        assert client.read_flow(parent.flow_id).name == "sra2-pipeline"
        assert client.read_deployment(parent.deployment_id).name == "repro"
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        by_stage = {client.read_flow(r.flow_id).name.removeprefix("sra2-"): r for r in runs}
        assert sorted(by_stage) == sorted(stages) and len(runs) == len(stages)
        for stage, run in by_stage.items():
            node = client.read_task_run(run.parent_task_run_id)
            assert (node.flow_run_id, node.name) == (parent.id, stage)
            assert node.state.is_completed() and run.state.is_completed()
            assert f"pipeline:{parent.id}" in run.tags and "preset:tiny" in run.tags
        graph = client._client.get(f"/flow_runs/{parent.id}/graph-v2").json()
    nodes = dict(graph["nodes"])
    assert set(nodes) == {str(r.id) for r in runs}
    for before, after in zip(stages, stages[1:]):
        assert nodes[str(by_stage[after].id)]["parents"] == [{"id": str(by_stage[before].id)}]


def test_second_repro_has_nothing_to_do(pipeline):
    work, env, _, _ = pipeline
    log = run(["dvc", "repro"], work, env)
    assert ran_stages(log) == [] and "up to date" in log


def file_bytes(*paths: Path) -> int:
    """Bytes of the files at or under ``paths`` (a file's own size: no folders, no blocks)."""
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*"))
               if f.is_file())


def test_the_plan_foresees_the_bytes_the_repro_left_in_each_folder(pipeline):
    """`sra2 plan`'s figures, computed before anything runs, against what the tiny pipeline left
    (the pictures and logs it does not count, < 100 KB whatever the scale, aside)."""
    work, env, _, _ = pipeline
    run([sys.executable, "-m", "sra2.tools.plan", "--json", "plan.json"], work, env)
    planned = {k: v["end"]
               for k, v in json.loads((work / "plan.json").read_text())["folders"].items()}
    store = work / "data" / json.loads((work / "data/latents.json").read_text())["store"]
    [copy] = [m.parent for m in Path(os.environ["SRA2_COPY_DIR"]).glob("*/manifest.json")
              if json.loads(m.read_text())["source"]["store"] == str(store.resolve())]
    left = {"data/latents": file_bytes(store),
            str(Path(os.environ["SRA2_COPY_DIR"])): file_bytes(*copy.glob("*.npy")),
            "data/train": file_bytes(*(work / "data/train/checkpoints").glob("*/step-*.pt"),
                                     work / "data/train/ema.pt"),
            "data/samples/shards": file_bytes(work / "data/samples/shards")}
    for folder, nbytes in left.items():
        assert abs(planned[folder] - nbytes) <= 0.05 * nbytes, (folder, planned[folder], nbytes)
    # the samples once: the stage's .npz is the one assembled where the shards were, and DVC's
    [kept] = (work / "data/samples/shards").glob("*/samples.npz")
    assert (work / "data/samples/samples.npz").stat().st_ino == kept.stat().st_ino
    assert (kept.stat().st_nlink == 3
            and sorted(p.name for p in kept.parent.iterdir()) == [kept.name])
    # no second copy: DVC's cache is the outputs' own files (hard links), bar its listings
    cached = [p for p in (work / ".dvc/cache/files").rglob("*") if p.is_file()]
    own = sum(p.stat().st_size for p in cached if p.stat().st_nlink == 1)
    assert own <= 0.01 * sum(p.stat().st_size for p in cached)
    assert not [f for f in planned if ".dvc" in f]  # and the plan counts nothing for it


def recorded_outs(work: Path, skip: str) -> dict[str, str]:
    """What dvc.lock records of each stage's outputs: path -> hash."""
    stages = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])
            if o["path"] != skip}


def damaged_cache_entries(work: Path) -> list[str]:
    """DVC cache entries whose bytes no longer have the MD5 that names them."""
    import hashlib

    files = [p for p in (work / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
    return [str(p) for p in files
            if hashlib.md5(p.read_bytes()).hexdigest() != p.parent.name + p.name.split(".")[0]]


def test_damaged_outputs_are_found_repaired_by_repro_and_never_recorded(pipeline):
    """With the repository's cache.type (hard links), bytes changed in a cached store or in the
    samples are changed in DVC's cache too: the rerun repairs both, and leaves every other entry
    alone."""
    work, env, _, _ = pipeline
    outs = recorded_outs(work, skip="data/encode.json")
    latents = work / "data" / json.loads((work / "data/latents.json").read_text())["store"]
    changed = latents / "mean/c/0/0/0/0"  # bytes changed inside a chunk, the size kept
    assert changed.stat().st_nlink == 2  # the cache entry and the store's file are one file
    entries = {p: p.stat().st_ino for p in (work / ".dvc/cache/files/md5").rglob("*")}
    data = bytearray(changed.read_bytes())
    data[10:14] = bytes(b ^ 0xFF for b in data[10:14])
    changed.write_bytes(bytes(data))
    assert len(damaged_cache_entries(work)) == 1
    samples = work / "data/samples/samples.npz"  # a pixel changed: the zip still opens
    data = bytearray(samples.read_bytes())
    data[-1000] ^= 0xFF
    samples.write_bytes(bytes(data))
    assert len(damaged_cache_entries(work)) == 2

    log = run(["dvc", "repro"], work, env)
    assert ran_stages(log) == ["encode", "sample"]  # the rest see the bytes they saw before
    assert "moved 1 damaged shard(s) [0]" in log and "CRC32C differs" in log
    assert "arr_0.npy's bytes fail its CRC32" in log and "the samples are drawn again" in log
    # the bytes of the undisturbed run (encode.json, its summary, counts this run's work)
    assert recorded_outs(work, skip="data/encode.json") == outs
    checked = run([sys.executable, "-m", "sra2.tools.verify", "data/latents",
                   "data/samples/shards"],
                  work, env)
    assert checked.count(": clean") == 2
    assert len(list((work / "data/latents/.quarantine").rglob("mean/c/0/0/0/0"))) == 1
    assert "up to date" in run(["dvc", "status"], work, env)
    assert damaged_cache_entries(work) == [] and changed.stat().st_nlink == 2
    # the damaged entry was moved aside and cached anew; every other entry is the file it was
    now = {p: p.stat().st_ino for p in (work / ".dvc/cache/files/md5").rglob("*")}
    renewed = [p for p in entries if now.get(p) != entries[p]]
    assert len(renewed) == 2 and all(f"DVC cache entry {p} of " in log for p in renewed)


def flow_runs_since(start) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=start)))
        return sorted(client.read_flow(r.flow_id).name for r in runs)


def test_two_processes_give_the_bytes_of_one_and_one_flow_run_per_stage(pipeline, tmp_path_factory):
    from datetime import datetime, timezone

    work, env, _, _ = pipeline
    two = copy_repo(tmp_path_factory.mktemp("repo2"), preset="tiny", launch={"nproc_per_node": 2})
    start = datetime.now(timezone.utc)
    # up to sample: evaluate runs in the flow's own process, whatever the launch section says
    run(["dvc", "repro", "sample"], two, env)
    assert flow_runs_since(start) == sorted(f"sra2-{s}" for s in
                                            ("demo-data", "encode", "train", "sample"))
    for output in ("data/train/ema.pt", "data/samples/samples.npz"):
        assert (work / output).read_bytes() == (two / output).read_bytes(), output
    processes = [json.loads((w / "data/train.json").read_text())["processes"] for w in (work, two)]
    assert processes == [1, 2]


def wait_for_queue(work: Path, env: dict, timeout: float = 1800) -> str:
    """`dvc queue status` once no experiment is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], work, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(5)


def test_queued_experiments_keep_their_results(pipeline):
    """Two Table 1 rows (alignment off and on, 20 steps, FID at step 20) as queued experiments:
    each keeps its metrics, losses, loss and FID curves and training times, beside the
    baseline's; encode is restored, not run. The convergence command draws the two."""
    work, env, _, _ = pipeline
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "baseline"], work, env)
    rows = ["vanilla", "layer2"]
    names = [f"table1-{r}" for r in rows]
    # two at once (-j 2): the stages spend much of their time starting processes, not computing
    run([sys.executable, "-m", "flows.tables", "queue", "--preset", "tiny", "--rows", *rows,
         "-S", "train.steps=20", "-S", "train.eval_every=20", "-S", "train.eval_samples=6",
         "--start", "-j", "2"], work, env)
    status = wait_for_queue(work, env)
    for name in names:
        log = run(["dvc", "queue", "logs", name], work, env)
        # a training parameter re-runs train, sample and evaluate only: encode's outputs are
        # restored in the experiment's workspace, so it is up to date
        assert ran_stages(log) == ["train", "sample", "evaluate"], (status, log)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], work, env, stdout_only=True))
    baseline = next(b for b in shown if b["rev"] != "workspace")
    runs = {"baseline": baseline["data"],
            **{e["name"]: e["revs"][0]["data"] for e in baseline["experiments"] or []}}
    assert set(names) <= set(runs), list(runs)
    results = {name: {path: m["data"] for path, m in runs[name]["metrics"].items()}
               for name in ["baseline", *names]}
    for name, metrics in results.items():
        fid, losses = metrics["data/metrics.json"], metrics["data/train.json"]
        values = [fid["fid"], fid["inception_score"], fid["sfid"], losses["loss"],
                  losses["loss_velocity"]]
        assert np.isfinite(values).all(), (name, metrics)
        assert metrics["data/encode.json"] == results["baseline"]["data/encode.json"]
        assert losses["steps"] == (40 if name == "baseline" else 20)
    vanilla, aligned = (results[n]["data/train.json"] for n in names)
    assert "loss_align" not in vanilla and vanilla["projector_parameters"] == 0
    assert aligned["loss_align"] > 0 and aligned["projector_parameters"] > 0

    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", *names, "--json"], work, env,
                           stdout_only=True))
    curves = plots["data"]["data/train/metrics.csv"]
    assert {v["rev"] for c in curves for v in c["content"]["data"]["values"]} == {"HEAD", *names}
    # FID over training ran in the experiments (the baseline's curve is its header only)
    fid_curves = plots["data"]["data/train/fid.csv"]
    assert {v["rev"] for c in fid_curves for v in c["content"]["data"]["values"]} == set(names)
    assert plots.get("errors", []) == []
    for image in ("data/train/loss.png", "data/train/fid.png", "data/samples/grid.png"):
        shown = {rev for entry in plots["data"][image] for rev in entry["revisions"]}
        assert shown == {"HEAD", *names} and {e["type"] for e in plots["data"][image]} == {"image"}

    # FID against step, images and process-hours, from the experiments' commits; the speed-up
    printed = run([sys.executable, "-m", "sra2.evaluate.convergence", *names,
                   "--out", "convergence.png"],
                  work, env)
    for name in names:  # the times each experiment committed give the hours
        assert re.search(rf"{name}: 1 evaluation\(s\) up to step 20, final FID [0-9.]+, [0-9.e-]+ "
                         r"process-hours on CPU", printed), printed
    assert re.search(rf"{names[1]} (reaches|does not reach) {names[0]}'s final FID [0-9.]+",
                     printed)
    picture = np.asarray(Image.open(work / "convergence.png").convert("RGB"))
    # two text lines under the panels: the speed-up, and what FIDs over training are
    assert re.search(r"FIDs over training: train.eval_samples images each", printed)
    assert picture.shape == (64 + 400 + 14 + 2 * 18, 3 * 520, 3)
    for i in range(3):  # each panel (step, images, hours) has both runs' points: not blank
        panel = picture[64:464, i * 520:(i + 1) * 520].reshape(-1, 3)
        for colour in PALETTE[:2]:
            assert (panel == colour).all(axis=1).sum() > 10, (i, colour)

    table = run([sys.executable, "-m", "flows.tables", "show", "--rows", *rows], work, env)
    for row, name in zip(rows, names):
        fid = results[name]["data/metrics.json"]["fid"]
        # no noise measured (the tiny preset: one set, no bootstrap), not comparable (the
        # reasons listed under the table, read from metrics.json's why), and the cost of its
        # settings beside vanilla's
        assert re.search(rf"\| {fid:.2f} \| - \| [0-9.]+ \| no \[\d\] \| [0-9.e+-]+ \| [0-9.]+ \| "
                         rf"SiT-Micro/2, 20 steps \(tiny\) \| {name} ", table), table
    assert re.search(r"\[1\] vanilla: FID against our crops of the training set.*"
                     r"random Inception weights", table), table

    # applying an experiment brings back its own results
    run(["dvc", "exp", "apply", names[0]], work, env)
    assert (json.loads((work / "data/metrics.json").read_text())
            == results[names[0]]["data/metrics.json"])
    assert json.loads((work / "data/train.json").read_text())["steps"] == 20

    # the FID curve's plot (train.eval_every writes it; written by hand here): FID against step
    (work / "data/train/fid.csv").write_text("step,fid,sfid,inception_score\n10,90.5,80,1.1\n"
                                             "20,70.25,60,1.2\n")
    plots = json.loads(run(["dvc", "plots", "diff", "--json"], work, env, stdout_only=True))
    (curve,) = plots["data"]["data/train/fid.csv"]
    assert curve["content"]["encoding"]["x"]["field"] == "step"
    assert [(v["step"], v["fid"]) for v in curve["content"]["data"]["values"]
            if v["rev"] == "workspace"] == [("10", "90.5"), ("20", "70.25")]
    (work / "data/train/fid.csv").unlink()


def test_encode_settings_get_their_own_store_and_going_back_reuses_it(pipeline):
    import zarr

    work, env, _, _ = pipeline
    first = json.loads((work / "data/latents.json").read_text())
    store = work / "data" / first["store"]
    files = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    set_params(work, preset="tiny", encode={"dtype": "float16"})
    log = run(["dvc", "repro", "encode"], work, env)  # no StoreMismatch: a store beside the first
    assert ran_stages(log) == ["encode"]
    half = json.loads((work / "data/latents.json").read_text())
    assert half["digest"] != first["digest"] and half["signature"]["dtype"] == "float16"
    assert zarr.open_group(work / "data" / half["store"], mode="r")["mean"].dtype == np.float16
    # what it changes downstream: train and what follows it (float16 batches: test_latent_copy)
    stale = run(["dvc", "status", "--json"], work, env, stdout_only=True)
    assert {"train", "evaluate"} <= set(json.loads(stale)) and "encode" not in json.loads(stale)

    set_params(work, preset="tiny")  # back: the first store, finished, not encoded again
    log = run(["dvc", "repro", "encode"], work, env)
    assert ran_stages(log) == ["encode"]
    assert json.loads((work / "data/latents.json").read_text()) == first
    assert json.loads((work / "data/encode.json").read_text())["encoded_now"] == 0
    # the same bytes, and no second copy of them: DVC copies a persistent output's linked files
    # out of its cache before the stage runs, and the stage links them back (README, "Disk"); a
    # file both stores hold alike (their labels) is one cache entry for both
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == files
    assert min(p.stat().st_nlink for p in files) >= 2
    assert "that DVC had copied out of its cache are its files again" in log
    stores = [p.name for p in (work / "data/latents").iterdir() if not p.name.startswith(".")]
    assert sorted(stores) == sorted([first["digest"], half["digest"]])  # .quarantine aside


def stage_runs(parent) -> dict[str, list]:
    """The subflow runs of ``parent`` by stage, oldest first."""
    from prefect.client.orchestration import get_client

    from flows.harness.runner import children

    with get_client(sync_client=True) as client:
        found: dict[str, list] = {}
        for run in children(str(parent.id), running=False):
            stage = client.read_flow(run.flow_id).name.removeprefix("sra2-")
            found.setdefault(stage, []).append(run)
    return found


def test_a_cancelled_served_experiment_saves_its_step_and_a_retry_resumes_there(pipeline):
    """The UI's Cancel on a served experiment (of the train stage: sample and evaluate would add a
    minute) during training: the train stage saves the step in progress and ends Cancelled naming
    it, the experiment ends Cancelled; the UI's Retry (AwaitingRetry) runs it again from the step
    saved to the end. Last in this file: the experiment leaves its parameters in the workspace."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry, Cancelling

    from flows.pipeline import STOP_WAIT

    work, env, _, _ = pipeline
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "--allow-empty", "-m", "before the experiment"], work, env)
    train_log = work / "data/logs/train.log"
    logged = train_log.read_text()
    with serving(work, env, work.parent / "serve-cancel.log"), \
            get_client(sync_client=True) as client:
        from prefect.deployments import run_deployment as start

        parent = start("sra2-experiment/run", timeout=0,
                       parameters={"overrides": ["train.steps=800"], "name": "cancelled",
                                   "targets": ["train"]})
        deadline = time.monotonic() + 600
        while not re.search(r"train: step (6\d|[7-9]\d|\d{3}) / 800",
                            train_log.read_text()[len(logged):]):
            assert time.monotonic() < deadline and not client.read_flow_run(
                parent.id).state.is_final(), client.read_flow_run(parent.id).state
            time.sleep(0.5)
        asked = time.monotonic()
        client.set_flow_run_state(parent.id, Cancelling(message="Cancel from the UI"))
        while not (ended := client.read_flow_run(parent.id)).state.is_final():
            assert time.monotonic() - asked < STOP_WAIT + 60, ended.state
            time.sleep(0.5)
        took = time.monotonic() - asked
        stages = stage_runs(parent)
        (train,) = stages["train"]
        assert ended.state.is_cancelled() and train.state.name == "Cancelled", stages
        saved = int(re.search(r"stopped at step (\d+)", train.state.message).group(1))
        assert 60 <= saved < 800 and list(work.glob(
            f"data/train/checkpoints/*/step-{saved:07d}.pt")), train.state.message
        print(f"Cancel -> the experiment's end: {took:.1f} s; saved step {saved}")

        retried = train_log.read_text()
        client.set_flow_run_state(parent.id, AwaitingRetry(message="Retry from the UI"),
                                  force=True)
        deadline = time.monotonic() + 900
        while not (ended := client.read_flow_run(parent.id)).state.is_final():
            assert time.monotonic() < deadline, ended.state
            time.sleep(1)
    assert ended.state.is_completed(), ended.state
    stages = stage_runs(parent)
    assert [r.state.name for r in stages["train"]] == ["Cancelled", "Completed"]
    first = int(re.search(r"train: step (\d+) / 800", train_log.read_text()[len(retried):])[1])
    assert saved < first <= saved + 5  # the retry resumed at the step saved (rows every 5)
    assert json.loads((work / "data/train.json").read_text())["steps"] == 800
