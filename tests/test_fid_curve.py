"""FID over training: snapshots, scores in fid.csv, nothing evaluated twice, snapshots
sampleable."""

import csv

import numpy as np
import pytest
from PIL import Image

from sra2.evaluate.plots import PALETTE
from sra2.sample.generate import sample_stage
from sra2.train.fid_curve import evaluate_step
from sra2.train.loop import build_model

from conftest import encoded_tiny, with_overrides


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return encoded_tiny(tmp_path_factory.mktemp("fid"), train={"eval_samples": 6},
                        sample={"steps": 4})


def test_training_writes_the_fid_curve_once_per_step_and_its_snapshots_sample(tmp_path, setup):
    from sra2.train.loop import train

    cfg, latents = setup
    rows = []
    train(with_overrides(cfg, train={"steps": 10, "eval_every": 10, "ckpt_every": 10,
                                     "log_every": 5}),
          latents, tmp_path, lambda done, total, info: rows.append(info))
    with open(tmp_path / "fid.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10]
    assert rows[-1]["fid_step"] == 10 and np.isfinite(rows[-1]["fid"])
    (run,) = (tmp_path / "checkpoints").iterdir()  # everything of the run lives in its own folder
    # the monitor gets a picture of the evaluated EMA's samples
    assert rows[-1]["preview"] == str(run / "evals/step-0000010/grid.png")
    assert Image.open(rows[-1]["preview"]).size[0] > 0
    assert (run / "fid.csv").read_text() == (tmp_path / "fid.csv").read_text()
    assert (run / "metrics.csv").read_text() == (tmp_path / "metrics.csv").read_text()
    # the FID picture (an image plot of dvc.yaml) draws the evaluated step: a dot of the line colour
    drawn = np.asarray(Image.open(tmp_path / "fid.png").convert("RGB"))
    assert (drawn == PALETTE[0]).all(axis=-1).sum() > 20
    with open(tmp_path / "fid.csv") as f:
        (row,) = csv.DictReader(f)
    assert all(np.isfinite(float(row[k])) for k in ("fid", "sfid", "inception_score"))
    # a step with its row is never scored again (one evaluation per step, also after a restart)
    model = build_model(cfg, 4)
    assert evaluate_step(cfg, model, 10, run, latents, tmp_path / "fid.csv") is None
    assert [p.name for p in (run / "snapshots").iterdir()] == ["step-0000010.pt"]
    # the sample stage takes any snapshot
    result = sample_stage(with_overrides(cfg, sample={"num_samples": 2, "shard_size": 2}),
                          run / "snapshots/step-0000010.pt", tmp_path / "samples")
    assert result["samples"] == 2 and (tmp_path / "samples/samples.npz").exists()
