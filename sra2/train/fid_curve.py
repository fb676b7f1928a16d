"""FID over training: at every ``train.eval_every`` steps the EMA weights are kept as a snapshot,
``train.eval_samples`` images are sampled from it with the configured sampler on all processes,
and rank 0 scores them (FID, sFID, Inception Score) into ``fid.csv``, the curve that ``dvc plots``
draws against the step. All of it lives in the run's checkpoint folder (``snapshots/``,
``evals/``, ``fid.csv``), so runs with other settings never share a row; ``fid.csv`` is mirrored to
the stage's output.

Resumable: a snapshot is written once, the samples are sharded like the sample stage's (finished
shards are kept), and a step that has its row in ``fid.csv`` is never evaluated again. A resumed
run re-reaches the same step with the same bytes, so its row would be the same anyway. The
reference side (statistics of ``evaluate.reference`` or of the real images) is computed once per
run folder and cached in ``fid_reference.npz``.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sra2.config.params import Config
from sra2.data.store import ShardedStore
from sra2.evaluate import noise
from sra2.evaluate.metrics import (
    ArrayImages,
    feature_function,
    frechet_scores,
    inception_score,
    reference_side,
)
from sra2.runtime import atomic, dist
from sra2.sample.generate import generate
from sra2.sample.outputs import write_grid
from sra2.train.checkpoints import ema_export, step_file

# fid_sd: the FID's bootstrap standard deviation (evaluate.bootstrap resamples; empty without)
COLUMNS = ["step", "fid", "sfid", "inception_score", "fid_sd"]


def snapshot(cfg: Config, ema: torch.nn.Module, step: int, out: Path) -> Path:
    """The EMA weights at ``step`` in the export format the sample stage reads (written once)."""
    path = out / "snapshots" / f"{step_file(step)}.pt"
    if not path.exists():
        atomic.save_torch(ema_export(cfg, ema, step), path)
    return path


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_rows(rows: list[dict], *paths: Path) -> None:
    atomic.write_csv(paths, COLUMNS, sorted(rows, key=lambda r: int(r["step"])))


def mirror(run: Path, path: Path, steps: int) -> None:
    """The run's curve up to ``steps`` at ``path`` (a longer run's rows stay in ``run`` only; just
    the header when nothing was evaluated)."""
    write_rows([r for r in read_rows(run / "fid.csv") if int(r["step"]) <= steps], path)


def eval_config(cfg: Config) -> Config:
    """The sample settings of an evaluation: the configured sampler, ``eval_samples`` images."""
    n = cfg.train.eval_samples
    sample = {**cfg.sample.model_dump(), "num_samples": n, "seeds": 1,
              "shard_size": min(cfg.sample.shard_size, n)}
    return cfg.model_copy(update={"sample": cfg.sample.model_validate(sample)})


def reference(cfg: Config, latents: str | Path, out: Path, features) -> dict:
    """The reference statistics (FID and sFID), computed once per run folder."""
    path = out / "fid_reference.npz"
    if not path.exists():
        side = reference_side(cfg, latents, features)
        atomic.write_with(path, lambda f: np.savez(f, mu=side["fid"][0], sigma=side["fid"][1],
                                                   mu_s=side["sfid"][0], sigma_s=side["sfid"][1]))
    with np.load(path) as npz:
        return {"fid": (npz["mu"], npz["sigma"]), "sfid": (npz["mu_s"], npz["sigma_s"])}


def score(cfg: Config, images, latents: str | Path, out: Path) -> dict:
    device = dist.device(cfg.evaluate.device)
    with tempfile.TemporaryDirectory() as scratch:
        features = feature_function(cfg, device, Path(scratch))
        fake = features(ArrayImages(images))
        ref = reference(cfg, latents, out, features)
    scores, warned = frechet_scores(fake, ref)
    for line in warned:
        print(f"WARNING: FID during training: {line}", file=sys.stderr)
    ec = cfg.evaluate
    sd = (noise.bootstrap(fake, ref, ec.bootstrap, ec.seed, device, ("fid",))["fid"]["sd"]
          if ec.bootstrap else None)  # FID's alone: the curve has no other noise column
    return {**scores, "inception_score": inception_score(fake["logits"]), "fid_sd": sd}


def evaluate_step(cfg: Config, ema: torch.nn.Module, step: int, run: str | Path,
                  latents: str | Path, mirror_to: str | Path) -> dict | None:
    """Snapshot, sample (all ranks) and score (rank 0) the EMA at ``step`` in the run folder
    ``run``; returns the row and a grid of the samples (``grid``, a PNG) on rank 0 (None
    elsewhere, or when the step was evaluated before)."""
    run = Path(run)
    rows = read_rows(run / "fid.csv")
    if any(int(r["step"]) == step for r in rows):
        return None
    rank = dist.init()[0]
    if rank == 0:
        snapshot(cfg, ema, step, run)
    dist.barrier()
    path = generate(eval_config(cfg), run / "snapshots" / f"{step_file(step)}.pt",
                    run / "evals" / step_file(step))
    if rank != 0:
        return None
    images = ShardedStore(path).array("images")
    scores = score(cfg, images, latents, run)
    row = {"step": step, **{k: None if v is None else round(v, 6) for k, v in scores.items()}}
    write_rows(rows + [row], run / "fid.csv", Path(mirror_to))
    grid = run / "evals" / step_file(step) / "grid.png"  # what the monitor shows of the EMA
    write_grid(images[: cfg.sample.grid], grid)
    return {**row, "grid": str(grid)}
