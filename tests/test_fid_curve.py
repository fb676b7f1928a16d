"""FID over training: snapshots, scores in fid.csv, nothing evaluated twice, snapshots sampleable."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sra2.fid_curve import evaluate_step
from sra2.generate import sample_stage
from sra2.plots import PALETTE
from sra2.train import build_model

from conftest import encoded_tiny, randomize, with_overrides


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return encoded_tiny(tmp_path_factory.mktemp("fid"), train={"eval_samples": 6},
                        sample={"steps": 4})


def test_each_step_is_scored_once_and_its_snapshot_samples(tmp_path, setup):
    cfg, latents = setup
    ema = randomize(build_model(cfg, 4), seed=3, std=0.05)
    row = evaluate_step(cfg, ema, 20, tmp_path, latents, tmp_path / "out.csv")
    assert row["step"] == 20 and all(np.isfinite(row[k]) for k in ("fid", "sfid", "inception_score"))
    assert Path(row["grid"]).is_file()
    assert evaluate_step(cfg, ema, 20, tmp_path, latents, tmp_path / "out.csv") is None  # not redone
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "fid.csv").read_text()
    with open(tmp_path / "fid.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [20] and float(rows[0]["fid"]) == row["fid"]
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["step-0000020.pt"]
    # the sample stage takes any snapshot
    result = sample_stage(with_overrides(cfg, sample={"num_samples": 2, "shard_size": 2}),
                          tmp_path / "snapshots/step-0000020.pt", tmp_path / "samples")
    assert result["samples"] == 2 and (tmp_path / "samples/samples.npz").exists()


def test_training_writes_the_fid_curve(tmp_path, setup):
    from sra2.train import train

    cfg, latents = setup
    rows = []
    train(with_overrides(cfg, train={"steps": 10, "eval_every": 10, "ckpt_every": 10, "log_every": 5}),
          latents, tmp_path, lambda done, total, info: rows.append(info))
    with open(tmp_path / "fid.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10]
    assert rows[-1]["fid_step"] == 10 and np.isfinite(rows[-1]["fid"])
    (run,) = (tmp_path / "checkpoints").iterdir()  # everything of the run lives in its own folder
    # the monitor gets a picture of the evaluated EMA's samples
    assert rows[-1]["preview"] == str(run / "evals/step-0000010/grid.png")
    assert Image.open(rows[-1]["preview"]).size[0] > 0
    assert (run / "snapshots/step-0000010.pt").exists()
    assert (run / "fid.csv").read_text() == (tmp_path / "fid.csv").read_text()
    assert (run / "metrics.csv").read_text() == (tmp_path / "metrics.csv").read_text()
    # the FID picture (an image plot of dvc.yaml) draws the evaluated step: a dot of the line colour
    drawn = np.asarray(Image.open(tmp_path / "fid.png").convert("RGB"))
    assert (drawn == PALETTE[0]).all(axis=-1).sum() > 20
