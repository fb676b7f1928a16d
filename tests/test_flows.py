"""What the stage flows show and keep (flows.harness.monitor, progress, runner), without a Prefect
server: progress texts, the table, pictures, the local log, warning once when the API fails, tags,
and evaluate's progress through Inception."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from flows.harness.monitor import Monitor, _WhenOffline
from flows.harness.progress import Eta, Watch, counted, duration, headline, row_line, table_rows
from flows.harness.runner import run_stage, stage_flow
from flows.harness.tags import pipeline_id, run_tags
from sra2.evaluate.plots import loss_plot

from conftest import with_overrides

REPO = Path(__file__).resolve().parents[1]


class Recorder(Monitor):
    """A monitor whose Prefect calls are recorded instead of made."""

    def __init__(self, stage, log_dir):
        super().__init__(stage, log_dir)
        self.calls = []

    def call(self, fn, *args, **kwargs):
        self.calls.append((fn.__name__, args, kwargs))
        return "artifact-id"

    def made(self, name):
        return [(args, kwargs) for fn, args, kwargs in self.calls if fn == name]


@pytest.fixture
def recorder(tmp_path):
    mon = Recorder("train", tmp_path / "logs")
    yield mon
    mon.close()


def row(step, **extra):
    return {"step": step, "loss": 1.0 / step, "loss_velocity": 0.9 / step, "loss_align": 0.1,
            "grad_norm": 0.5, "images_per_s": 120.0, "checkpoint": "", **extra}


def test_progress_texts():
    assert [duration(s) for s in (None, 4.4, 59.6, 200, 7322)] == ["?", "4s", "1m00s", "3m20s",
                                                                   "2h02m"]
    assert counted("step", 1200, 4000) == "step 1200 / 4000"
    assert counted("images", 96, 128) == "96 / 128 images"
    assert counted("images", 0, 0) == "nothing left to do"
    assert headline("step", 1200, 4000, row(1200), 200.0) == \
        "step 1200 / 4000 · loss 0.0008333 · 120 img/s · ETA 3m20s"
    assert headline("step", 40, 40, {"checkpoint": "x/step-40.pt"}, 0.0) == "step 40 / 40 · done"
    line = row_line("train", "step", 10, 40, row(10, checkpoint="ckpt/step-0000010.pt", fid=31.5),
                    30.0, 65.0)
    assert line == ("train: step 10 / 40 (25%) · loss 0.1 · loss_velocity 0.09 · "
                    "loss_align 0.1 · grad_norm 0.5 · 120 img/s · checkpoint step-0000010.pt · "
                    "fid 31.5 · elapsed 1m05s · ETA 30s")


def test_the_eta_comes_from_the_rate_since_the_first_report():
    eta = Eta()
    assert eta(100.0, 10, 110) is None  # one report: no rate yet
    assert eta(110.0, 20, 110) == pytest.approx(90.0)  # 10 per 10 s, 90 left
    assert eta(115.0, 20, 110) == pytest.approx(135.0)  # slower since
    assert eta(120.0, 110, 110) == 0.0


def test_the_table_keeps_the_newest_rows_and_every_fid():
    rows = [{"step": s, "loss": 1.0} for s in range(1, 31)]
    rows[2]["fid"] = 40.0
    shown = table_rows(rows, keep=5)
    assert [r["step"] for r in shown] == [30, 29, 28, 27, 26, 3]  # newest first
    assert all(set(r) == {"step", "loss", "fid"} for r in shown)  # one set of columns
    assert shown[-1]["fid"] == 40.0 and shown[0]["fid"] == ""


def test_a_watch_shows_progress_rows_a_table_and_pictures(recorder, tmp_path):
    from PIL import Image

    preview = tmp_path / "preview.png"
    Image.new("RGB", (64, 64), "red").save(preview)
    watch = Watch(recorder, "train", "step", "training", every=0, show_every=0,
                  pictures=lambda rows: [("training loss", loss_plot(rows, "loss"))])
    events = [row(10), row(20, checkpoint="out/step-0000020.pt", fid=25.0),
              row(30, preview=str(preview)), row(40, checkpoint="out/step-0000040.pt")]
    for i, info in enumerate(events):
        watch({"kind": "progress", "done": info["step"], "total": 40, "info": info,
               "time": 1000.0 + i})
    watch({"kind": "stopped", "rank": 0, "message": "(not in a real run)"})  # said, not raised
    watch.finish()

    (progress_args, progress_kwargs), = recorder.made("create_progress_artifact")
    assert progress_kwargs["key"] == "train-progress"
    updates = recorder.made("update_progress_artifact")
    assert [args[1] for args, _ in updates] == [25.0, 50.0, 75.0, 100.0]
    assert updates[1][1]["description"] == \
        "step 20 / 40 · loss 0.05 · FID 25 · 120 img/s · ETA 2s"
    table = recorder.made("create_table_artifact")[-1]
    assert table[1]["key"] == "train-metrics"
    assert [r["step"] for r in table[0][0]] == [40, 30, 20, 10]
    assert table[0][0][0]["checkpoint"] == "step-0000040.pt" and table[0][0][0]["ETA"] == "0s"
    assert table[0][0][2]["fid"] == 25.0
    pictures = recorder.made("create_markdown_artifact")[-1]
    assert pictures[1]["key"] == "train-pictures"
    markdown = pictures[0][0]
    assert markdown.count("data:image/png;base64,") == 2  # the loss curve and the preview
    assert "EMA samples at step 30" in markdown and 'width="384"' in markdown  # 64 px shown x6
    lines = (tmp_path / "logs/train.log").read_text().splitlines()
    assert sum("train: step" in line for line in lines) == 4 and "(not in a real run)" in lines[-1]


def test_a_resume_with_nothing_left_to_do_shows_100_percent(recorder):
    watch = Watch(recorder, "encode", "images", "encoding", every=60)
    watch.update(0, 0)  # what encode and sample send when every shard is done
    (args, kwargs), = recorder.made("update_progress_artifact")
    assert args[1] == 100.0 and kwargs["description"] == "nothing left to do"
    watch = Watch(recorder, "train", "step", "training", every=60)
    watch.update(40, 40, {"checkpoint": "out/step-0000040.pt"})  # train's record on a resume
    assert recorder.made("update_progress_artifact")[-1][0][1] == 100.0
    assert not recorder.made("create_table_artifact")  # no rows: nothing to tabulate


def test_the_monitor_warns_once_and_stops_calling_an_api_that_failed(tmp_path):
    mon = Monitor("train", tmp_path / "logs")
    calls = []

    def refused(*args):
        calls.append(args)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    def rejected(*args):
        calls.append(args)
        raise ValueError("Out of range float values are not JSON compliant")

    try:
        assert mon.call(rejected, 1) is None and mon.online  # a bad payload: that call only
        assert mon.call(rejected, 2) is None
        assert mon.call(refused, 3) is None and not mon.online
        assert mon.call(refused, 4) is None and mon.call(lambda: 5) is None
        mon.say("the work goes on")
    finally:
        mon.close()
    assert calls == [(1,), (2,), (3,)]  # none after the API failed
    lines = (tmp_path / "logs/train.log").read_text().splitlines()
    assert [line.split()[2] for line in lines] == ["WARNING", "WARNING", "INFO"]
    assert "a Prefect call failed (ValueError" in lines[0]
    assert "the Prefect API failed (ConnectError" in lines[1]
    assert lines[2].split(maxsplit=3)[3] == "the work goes on"
    assert lines[2][:4].isdigit() and lines[2][10] == " "  # "2026-11-23 02:38:35,619 INFO ..."


def test_logging_restores_itself_after_the_monitor_closes(tmp_path):
    before = logging.raiseExceptions
    mon = Monitor("x", tmp_path)
    mon.lost(httpx.ConnectError("gone"))
    assert logging.raiseExceptions is False  # Prefect's log worker stays quiet about it
    mon.close()
    assert logging.raiseExceptions is before
    # the monitor's own filter is gone (Prefect's logging setup may have added its own)
    assert not [f for f in logging.getLogger("prefect.flow_runs").filters
                if isinstance(f, _WhenOffline)]


PRINT_ID = "from flows.harness.tags import pipeline_id; print(pipeline_id())"


def fake_dvc(folder: Path, runs: int) -> Path:
    """A script named dvc that runs ``runs`` stage commands through a shell, as `dvc repro`."""
    script = folder / "dvc"
    lines = [f'"{sys.executable}" -c "{PRINT_ID}"'] * runs
    script.write_text("#!/bin/sh\n" + "\n".join(lines) + "\ntrue\n")  # no exec of the last one
    script.chmod(0o755)
    return script


def test_the_stages_of_one_dvc_run_share_a_pipeline_id(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_STAGE": "train"}
    env.pop("SRA2_PIPELINE_RUN", None)
    dvc = fake_dvc(tmp_path, 2)
    first = subprocess.run([str(dvc)], env=env, capture_output=True, text=True, check=True)
    again = subprocess.run([str(dvc)], env=env, capture_output=True, text=True, check=True)
    ids = first.stdout.split()
    assert len(ids) == 2 and ids[0] == ids[1]  # one dvc process: one id for its stages
    assert again.stdout.split()[0] != ids[0]  # the next dvc run: another
    # "<start of the dvc process>-<its pid>": the dvc process is the shell running the script
    assert ids[0].split("-")[:2][0].isdigit() and len(ids[0].split("-")) == 3
    alone = subprocess.run([sys.executable, "-c", PRINT_ID], env={**env, "DVC_STAGE": ""},
                           capture_output=True, text=True, check=True)
    assert alone.stdout.split() != ids[:1]


def test_tags_name_the_preset_the_experiment_and_the_pipeline():
    env = {"DVC_EXP_NAME": "lr-sweep-3", "SRA2_PIPELINE_RUN": "nightly-42"}
    assert run_tags("sit-b2", env) == ["preset:sit-b2", "exp:lr-sweep-3", "pipeline:nightly-42"]
    assert run_tags("demo", {"SRA2_PIPELINE_RUN": "x"})[1] == "exp:workspace"
    assert pipeline_id({"SRA2_PIPELINE_RUN": "nightly-42"}) == "nightly-42"


@stage_flow("probe")
def probe_flow(value: int, fail: bool = False) -> dict:
    if fail:
        raise ValueError(f"the body's own error ({value})")
    return {"value": value}


@pytest.fixture
def unreachable_api(tmp_path, monkeypatch):
    """A Prefect API nobody answers at, and data/logs under tmp_path."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield tmp_path / "data/logs/probe.log"


def test_a_stage_whose_prefect_api_is_down_runs_without_it(unreachable_api):
    assert run_stage(probe_flow, "tiny", value=3) == {"value": 3}
    text = unreachable_api.read_text()
    assert text.count("the Prefect API failed") == 1 and "runs without Prefect" in text
    assert "probe started" in text and "probe finished in" in text


def test_the_body_s_own_error_fails_the_stage(unreachable_api):
    with pytest.raises(ValueError, match=r"the body's own error \(4\)"):
        run_stage(probe_flow, "tiny", value=4, fail=True)
    assert "probe failed after" in unreachable_api.read_text()


def test_evaluate_reports_the_images_through_inception(tmp_path, tiny, monkeypatch):
    from sra2.evaluate import scores

    # the formulas are tested in test_metrics; their matrix square roots take long on a CPU
    monkeypatch.setattr(scores, "adm_metrics",
                        lambda fake, reference, device: dict.fromkeys(scores.NUMBERS, 0.0))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    cfg = with_overrides(tiny, evaluate={"reference": str(tmp_path / "ref.npz"), "batch_size": 2})
    seen = []
    scores.evaluate(cfg, tmp_path / "samples.npz", tmp_path / "no-latents-needed",
                     progress=lambda done, total: seen.append((done, total)))
    # the total up front, then each batch: the 3 samples (2 + 1), the 4 reference images (2 + 2)
    assert seen == [(0, 7), (2, 7), (3, 7), (5, 7), (7, 7)]


def test_a_cancelled_evaluate_stops_between_batches_and_writes_nothing(tmp_path, tiny,
                                                                      unreachable_api):
    """evaluate computes in the flow's own process: once its run is cancelled (the monitor's
    cancel set, as flows.harness.monitor.Monitor.watch_cancel sets it) it stops at the next batch
    and ends Cancelled saying how far it got; no metrics file is written."""
    from flows.harness.monitor import close_current, current
    from flows.stages.evaluate import evaluate_flow

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    cfg = with_overrides(tiny, evaluate={"reference": str(tmp_path / "ref.npz"), "batch_size": 2})
    close_current()
    current("evaluate").cancel.set()
    try:
        state = evaluate_flow.fn(cfg, str(tmp_path / "samples.npz"), str(tmp_path / "latents"),
                                 str(tmp_path / "metrics.json"))
    finally:
        close_current()
    assert state.type.value == "CANCELLED" and state.name == "Cancelled"
    assert "stopped at 0 / 7 images" in state.message and "starts over" in state.message
    assert not (tmp_path / "metrics.json").exists()
