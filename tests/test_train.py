import numpy as np
import pytest
import torch

from sra2.encode import encode_dataset
from sra2.data import write_demo_dataset
from sra2.latents import batch_indices
from sra2.train import train

from conftest import with_overrides


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    from sra2.config import resolve

    cfg = resolve({"preset": "tiny"})
    root = tmp_path_factory.mktemp("tiny")
    d = cfg.data.demo
    write_demo_dataset(root / "images", d.classes, d.per_class, d.min_side, d.max_side, d.seed)
    cfg = with_overrides(cfg, data={"root": str(root / "images")})
    encode_dataset(cfg, root / "latents")
    return root / "latents"


def test_batches_walk_seeded_epochs_and_split_across_ranks():
    order = np.concatenate([batch_indices(s, 8, 20, seed=3) for s in range(5)])
    assert sorted(order[:20]) == list(range(20)) and sorted(order[20:40]) == list(range(20))
    assert not np.array_equal(order[:20], order[20:40])  # a new permutation each epoch
    halves = [batch_indices(4, 8, 20, seed=3, rank=r, world=2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), batch_indices(4, 8, 20, seed=3))


def test_training_lowers_the_loss_and_exports_a_plain_sit(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": 60, "log_every": 10, "ckpt_every": 30})
    summary = train(cfg, latents, tmp_path)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,loss_velocity,loss_align,grad_norm" and len(rows) == 7
    first, last = (float(r.split(",")[1]) for r in (rows[1], rows[-1]))
    assert np.isfinite(last) and last < first
    assert summary["loss_align"] > 0 and summary["projector_parameters"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    export = torch.load(tmp_path / "ema.pt", weights_only=False)
    assert not any(k.startswith("projector") for k in export["ema"])
    (run,) = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in run.iterdir()) == [
        "latest", "signature.json", "step-0000030.pt", "step-0000060.pt"]


def test_resume_ends_where_an_unbroken_run_ends(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": 20, "ckpt_every": 10, "log_every": 5})
    train(cfg, latents, tmp_path / "straight")
    train(with_overrides(cfg, train={"steps": 10}), latents, tmp_path / "resumed")
    train(cfg, latents, tmp_path / "resumed")
    a, b = (torch.load(next((tmp_path / d / "checkpoints").glob("*/step-0000020.pt")), weights_only=False)
            for d in ("straight", "resumed"))
    for part in ("model", "ema", "projector"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (tmp_path / "straight" / "metrics.csv").read_text() == (tmp_path / "resumed" / "metrics.csv").read_text()


def test_other_settings_start_a_new_run_beside_the_old_one(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": 10, "ckpt_every": 10})
    train(cfg, latents, tmp_path)
    train(with_overrides(cfg, train={"lr": 1e-3}), latents, tmp_path)
    runs = sorted((tmp_path / "checkpoints").iterdir())
    assert len(runs) == 2 and all((r / "step-0000010.pt").exists() for r in runs)


def test_fewer_steps_than_the_checkpoint_is_a_clear_error(tmp_path, tiny, latents):
    train(with_overrides(tiny, train={"steps": 10, "ckpt_every": 10}), latents, tmp_path)
    with pytest.raises(ValueError, match="train.steps is 5"):
        train(with_overrides(tiny, train={"steps": 5, "ckpt_every": 10}), latents, tmp_path)


def test_baseline_has_no_projector(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, align={"enabled": False}, train={"steps": 5, "log_every": 5})
    summary = train(cfg, latents, tmp_path)
    assert summary["projector_parameters"] == 0 and summary["loss_align"] == 0


def test_two_processes_train_like_one(tmp_path, tiny, latents):
    """DDP over gloo: each rank takes half of the global batch; the result matches one process."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "tiny", "train": {"steps": 6, "ckpt_every": 6, "log_every": 3}}))
    script = tmp_path / "train_script.py"
    script.write_text("import sys\nfrom sra2.config import load\nfrom sra2.train import train\n"
                      "train(load(sys.argv[1]), sys.argv[2], sys.argv[3])\n")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(params),
                          str(latents), str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    train(with_overrides(tiny, train={"steps": 6, "ckpt_every": 6, "log_every": 3}), latents, tmp_path / "one")
    one, two = (torch.load(tmp_path / d / "ema.pt", weights_only=False)["ema"] for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    rows = [(tmp_path / d / "metrics.csv").read_text().splitlines() for d in ("one", "two")]
    for a, b in zip(rows[0][1:], rows[1][1:]):
        np.testing.assert_allclose([float(v) for v in a.split(",")], [float(v) for v in b.split(",")], rtol=1e-3)
