import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sra2.data.latents import StepBatches, batch_indices, step_loader, write_synthetic_store
from sra2.data.store import ShardedStore
from sra2.evaluate.plots import PALETTE
from sra2.methods import registry
from sra2.sample.generate import generate
from sra2.train.loop import build_trainer, draws, step_inputs, train, train_step

from conftest import Probe, encoded_tiny, with_overrides


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return encoded_tiny(tmp_path_factory.mktemp("tiny"))[1]


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
    empty = np.asarray(Image.open(tmp_path / "fid.png").convert("RGB"))  # no FID: says so, no line
    assert not (empty == PALETTE[0]).all(axis=-1).any()
    export = torch.load(tmp_path / "ema.pt", weights_only=False)
    assert not any(k.startswith("projector") for k in export["ema"])
    (run,) = (tmp_path / "checkpoints").iterdir()
    assert sorted(p.name for p in run.iterdir()) == [
        "latest", "metrics.csv", "signature.json", "step-0000030.pt", "step-0000060.pt"]


def test_resume_ends_where_an_unbroken_run_ends(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": 20, "ckpt_every": 10, "log_every": 5})
    train(cfg, latents, tmp_path / "straight")
    train(with_overrides(cfg, train={"steps": 10}), latents, tmp_path / "resumed")
    train(cfg, latents, tmp_path / "resumed")
    a, b = (torch.load(next((tmp_path / d / "checkpoints").glob("*/step-0000020.pt")),
                       weights_only=False)
            for d in ("straight", "resumed"))
    for part in ("model", "ema", "heads"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert ((tmp_path / "straight" / "metrics.csv").read_text()
            == (tmp_path / "resumed" / "metrics.csv").read_text())


class TimeProbe(Probe):
    """Its head's output, averaged over block 1's tokens, predicts t x u."""

    name, title, weight = "probe", "time probe", 0.5

    def losses(self, cfg, aid, head, step, inputs):
        guess = head(step.patches(1)).mean(dim=(1, 2))
        return [(guess - step.t * inputs["u"]).square().mean()]


def test_a_method_of_a_test_trains_through_the_loop_and_resumes(tmp_path, tiny, latents):
    """The registry is the loop's only source of methods: one defined here, which no code of the
    project names, trains with its own column and draws and resumes to the same bytes."""
    cfg = with_overrides(tiny, train={"steps": 6, "ckpt_every": 3, "log_every": 3})
    with registry.added(TimeProbe()):
        summary = train(cfg, latents, tmp_path / "straight")
        train(with_overrides(cfg, train={"steps": 3}), latents, tmp_path / "resumed")
        train(cfg, latents, tmp_path / "resumed")
    metrics = (tmp_path / "straight" / "metrics.csv").read_text()
    assert metrics.splitlines()[0] == "step,loss,loss_velocity,loss_align,loss_probe,grad_norm"
    assert summary["loss_probe"] > 0
    # the row's means are rounded to 6 decimals: three of them, 1.5e-6 off at most
    assert summary["loss"] == pytest.approx(summary["loss_velocity"] + summary["loss_align"]
                                            + 0.5 * summary["loss_probe"], abs=2e-6)
    assert metrics == (tmp_path / "resumed" / "metrics.csv").read_text()
    a, b = (torch.load(tmp_path / d / "ema.pt", weights_only=True)["ema"]
            for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    loop = Path(__file__).resolve().parents[1] / "sra2" / "train" / "loop.py"
    assert TimeProbe.name not in loop.read_text()


def test_other_settings_start_a_new_run_beside_the_old_one(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, train={"steps": 10, "ckpt_every": 10})
    train(cfg, latents, tmp_path)
    train(with_overrides(cfg, train={"lr": 1e-3}), latents, tmp_path)
    runs = sorted((tmp_path / "checkpoints").iterdir())
    assert len(runs) == 2 and all((r / "step-0000010.pt").exists() for r in runs)


def test_any_length_in_any_order_ends_as_an_unbroken_run_of_that_length(tmp_path, tiny, latents,
                                                                        one_thread):
    """train.steps 40 -> 20 -> 40 -> 60 in one folder: 20 resumes from step 15 below the longer
    run's checkpoints and leaves them, 40 takes its checkpoint again, 60 resumes from it. Rows
    every 7 steps, checkpoints every 15: 20 and 40 end off both, 60 resumes off the rows'."""
    cfg = with_overrides(tiny, train={"log_every": 7, "ckpt_every": 15, "workers": 0})
    names = ("ema.pt", "metrics.csv", "loss.png", "fid.csv", "fid.png")

    def run(steps: int, out: Path) -> tuple[dict, dict]:
        summary = train(with_overrides(cfg, train={"steps": steps}), latents, out)
        return summary, {name: (out / name).read_bytes() for name in names}

    def step_files() -> list[int]:
        return [int(p.name[5:12]) for p in sorted(tmp_path.glob("chain/checkpoints/*/step-*.pt"))]

    straight = {}
    for steps, files in ((40, [15, 30, 40]), (20, [15, 20, 30, 40]), (40, [15, 20, 30, 40]),
                         (60, [40, 45, 60])):
        before = step_files()
        summary, got = run(steps, tmp_path / "chain")
        if steps not in straight:
            straight[steps] = run(steps, tmp_path / f"straight-{steps}")
        assert summary == straight[steps][0], steps
        assert [name for name in names if got[name] != straight[steps][1][name]] == [], steps
        assert step_files() == files, steps
        if steps < 60:  # no longer run's checkpoint lost; latest names the longest run's newest
            assert set(before) <= set(files)
            assert [p.read_text() for p in tmp_path.glob("chain/checkpoints/*/latest")] == [
                "step-0000040.pt\n"]
    rows = (tmp_path / "chain" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [7, 14, 21, 28, 35, 42, 49, 56, 60]


def test_baseline_has_no_projector(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, align={"enabled": False}, train={"steps": 5, "log_every": 5})
    summary = train(cfg, latents, tmp_path)
    assert summary["projector_parameters"] == 0 and "loss_align" not in summary
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,loss_velocity,grad_norm"  # the columns follow the terms on


def test_streamed_batches_are_the_in_memory_rows(tmp_path):
    """Reader processes give, step by step and in order, the rows an in-memory copy of the
    accepted latents gives for batch_indices."""
    store = write_synthetic_store(tmp_path / "s", 50, (2, 4, 4), 5, chunk_size=4, shard_size=16,
                                  rejected=(3, 17, 40))
    keep = np.array([i for i in range(50) if i not in (3, 17, 40)])
    memory = {k: store.array(k)[:][keep] for k in ("mean", "std", "labels")}
    batches = StepBatches(tmp_path / "s", 32, seed=1, rank=1, world=2)
    streamed = list(step_loader(batches, 2, 6, workers=2, pin=False))
    assert len(streamed) == 4
    for step, got in zip(range(2, 6), streamed):
        rows = batch_indices(step, 32, 47, seed=1, rank=1, world=2)
        for k in memory:
            np.testing.assert_array_equal(got[k].numpy(), memory[k][rows])


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tiny, latents):
    """batch_per_gpu 2 (4 micro-batches) and 8 (one): the same step, up to float32 summation
    order."""
    cpu = torch.device("cpu")
    data = StepBatches(latents, tiny.train.global_batch, tiny.train.seed)
    steps = {}
    for size in (2, 8):
        cfg = with_overrides(tiny, train={"batch_per_gpu": size})
        tr = build_trainer(cfg, data.shape, cpu, world=1)
        values, _ = train_step(tr, step_inputs(tr, data[0], draws(cfg, 0, data.shape, 0, 1, cpu)))
        steps[size] = (tr.micro, values, {n: p.grad for n, p in tr.loss_fn.named_parameters()
                                          if p.grad is not None})
    (m2, v2, g2), (m8, v8, g8) = steps[2], steps[8]
    assert (m2, m8) == (4, 1) and g2.keys() == g8.keys()
    # each value is a float32 sum of at most a few hundred products taken in another order: it may
    # move by ~1e2 * 2^-24 ~ 1e-5 of the tensor's scale; 1e-4 leaves room for the chain of layers
    torch.testing.assert_close(v2, v8, rtol=1e-4, atol=1e-6)
    for name in g8:
        torch.testing.assert_close(g2[name], g8[name],
                                   rtol=1e-4, atol=1e-4 * float(g8[name].abs().max()), msg=name)


def test_host_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of a short run on 40,000 latents is within 200 MB of one on 10,000 (an in-memory
    copy would differ by ~250 MB at this latent size, float32)."""
    import subprocess
    import sys

    peaks = {}
    for items in (10_000, 40_000):
        write_synthetic_store(tmp_path / f"s{items}", items, (4, 16, 16), 3, chunk_size=16,
                              shard_size=4096, dtype="float16")
        code = ("import resource, sys\nfrom sra2.config.params import resolve\n"
                "from sra2.train.loop import train\n"
                "sys.path.insert(0, sys.argv[3])\nfrom conftest import with_overrides\n"
                "cfg = with_overrides(resolve({'preset': 'tiny'}), "
                "train={'steps': 6, 'workers': 1})\n"
                "train(cfg, sys.argv[1], sys.argv[2])\n"
                "print(max(resource.getrusage(w).ru_maxrss for w in "
                "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))\n")
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{items}"),
                              str(tmp_path / f"out{items}"), str(Path(__file__).parent)],
                             capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[items] = int(run.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert abs(peaks[40_000] - peaks[10_000]) < 200, peaks


def test_sra_trains_with_its_teacher_and_resumes_to_the_same_bytes(tmp_path, tiny, latents):
    cfg = with_overrides(tiny, align={"enabled": False}, sra={"enabled": True},
                         train={"steps": 10, "ckpt_every": 5, "log_every": 5})
    summary = train(cfg, latents, tmp_path / "straight")
    header = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,loss_velocity,loss_sra,grad_norm"
    assert summary["loss_sra"] > 0 and summary["projector_parameters"] > 0
    train(with_overrides(cfg, train={"steps": 5}), latents, tmp_path / "resumed")
    train(cfg, latents, tmp_path / "resumed")
    a, b = (torch.load(tmp_path / d / "ema.pt", weights_only=True)["ema"]
            for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ((tmp_path / "straight" / "metrics.csv").read_text()
            == (tmp_path / "resumed" / "metrics.csv").read_text())


@pytest.fixture(scope="module")
def with_pixels(tmp_path_factory):
    """The tiny preset encoded with its crops (encode.pixels), which REPA and REG read."""
    return encoded_tiny(tmp_path_factory.mktemp("pixels"), encode={"pixels": True})


def test_repa_trains_on_the_stored_images_beside_every_other_term(tmp_path, with_pixels):
    """REPA (with random DINOv2 weights) reads the crops stored with encode.pixels; with every term
    on, each has its column."""
    terms = {"align": {"enabled": True}, "repa": {"enabled": True}, "sra": {"enabled": True}}
    cfg, latents = with_pixels
    cfg = with_overrides(cfg, train={"steps": 4, "log_every": 2, "ckpt_every": 4}, **terms)
    summary = train(cfg, latents, tmp_path / "out")
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "loss", "loss_velocity",
                      *[f"loss_{t}" for t in ("align", "sra", "repa") if terms[t]["enabled"]],
                      "grad_norm"]
    assert -1 <= summary["loss_repa"] <= 1 and np.isfinite(summary["loss"])


def test_reg_trains_exports_its_class_token_and_resumes_to_the_same_bytes(tmp_path, with_pixels):
    """REG (random DINOv2 weights) beside SRA 2: its two columns, a SiT exported with the class
    token's modules (what the sample stage needs), and a resumed run ending in the same bytes."""
    cfg, latents = with_pixels
    cfg = with_overrides(cfg, reg={"enabled": True},
                         train={"steps": 4, "log_every": 2, "ckpt_every": 2})
    summary = train(cfg, latents, tmp_path / "straight")
    train(with_overrides(cfg, train={"steps": 2}), latents, tmp_path / "resumed")
    train(cfg, latents, tmp_path / "resumed")
    metrics = (tmp_path / "straight" / "metrics.csv").read_text()
    assert metrics.splitlines()[0] == ("step,loss,loss_velocity,loss_align,loss_reg,loss_reg_cls,"
                                       "grad_norm")
    assert -1 <= summary["loss_reg"] <= 1 and summary["loss_reg_cls"] > 0
    assert metrics == (tmp_path / "resumed" / "metrics.csv").read_text()
    a, b = (torch.load(tmp_path / d / "ema.pt", weights_only=True)["ema"]
            for d in ("straight", "resumed"))
    assert "cls_projectors2.weight" in a and "final_layer.linear_cls.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    sampled = generate(with_overrides(cfg, sample={"num_samples": 2, "steps": 4}),
                       tmp_path / "straight" / "ema.pt", tmp_path / "samples")
    assert ShardedStore(sampled).array("images").shape == (2, 32, 32, 3)
