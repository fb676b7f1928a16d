"""Text to image: caption contexts in the store, guidance on captions, and the tiny-t2i pipeline
through `dvc repro`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_pipeline import copy_repo, run

from sra2.config.params import load
from sra2.data.captions import read_coco
from sra2.data.store import ShardedStore
from sra2.methods.checks import model_problems
from sra2.model.networks import build
from sra2.model.text import load_text_encoder
from sra2.sample.prompts import Prompts, picks
from sra2.sample.samplers import guided_velocity

from conftest import randomize

REPO = Path(__file__).resolve().parents[1]
ENCODE = ("import sys; from sra2.config.params import load; from sra2.data.encode import "
          "encode_dataset; encode_dataset(load(sys.argv[1]), sys.argv[2])")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """The tiny-t2i demo drawn under a temporary folder (16 images of each of 3 shapes, shards of
    8), and the params file that reads it."""
    from flows.stages.demo_data import write_captioned_demo

    root = tmp_path_factory.mktemp("t2i")
    clip = str(root / "clip")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "preset": "tiny-t2i",
        "data": {"root": str(root / "train2014"), "captions": str(root / "train.json"),
                 "val_root": str(root / "val2014"), "val_captions": str(root / "val.json"),
                 "demo": {"classes": 3, "per_class": 16, "val_per_class": 4, "min_side": 40,
                          "max_side": 100, "seed": 0,
                          "text": {"hidden_size": 32, "layers": 1, "heads": 2, "seed": 0,
                                   "clip": clip}}},
        "text": {"source": str(root / "text")},
        "encode": {"batch_size": 4, "shard_size": 8, "chunk_size": 4},
        "evaluate": {"clip": clip, "pickscore": clip, "pickscore_processor": clip}}))
    cfg = load(params)
    write_captioned_demo(cfg)
    return root, params, cfg


def encode(params: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENCODE, str(params), str(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_caption_contexts_in_the_store_are_the_encoders_row_for_row_after_a_resumed_encode(
        captioned):
    root, params, cfg = captioned
    out = root / "killed"
    proc = encode(params, out)
    deadline = time.monotonic() + 300
    while len(list((out / "done").glob("shard-*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "encoder ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ShardedStore(out, check=False)
    assert 2 <= len(store.done_shards()) < store.num_shards  # really killed part-way
    assert encode(params, out).wait() == 0

    store = ShardedStore(out)
    split = read_coco(cfg.data.root, cfg.data.captions, 5)
    assert store.array("captions")[:].tolist() == split.captions
    encoder = load_text_encoder(cfg.text.source, cfg.text.max_length)
    stored = store.array("context")[:]
    assert stored.shape == (48, 5, 16, 32) and stored.dtype == np.float16
    for i, said in enumerate(split.captions):  # every image's five captions, in their order
        np.testing.assert_array_equal(stored[i], encoder(said).numpy().astype(np.float16))
    np.testing.assert_array_equal(store.array("empty_context")[:],
                                  encoder([""]).numpy().astype(np.float16))
    # float16 keeps CLIP-like features to 2^-11 of their size: a relative 5e-4 at most
    exact = encoder(split.captions[0]).numpy()
    assert np.abs(stored[0] - exact).max() <= 2 ** -11 * np.abs(exact).max()


def test_guidance_on_captions_uses_the_empty_captions_context(captioned):
    root, _, cfg = captioned
    prompts = Prompts(cfg)
    encoder = load_text_encoder(cfg.text.source, cfg.text.max_length)
    null = prompts.null(3)
    torch.testing.assert_close(null[1], encoder([""])[0].half().float(), rtol=0, atol=0)
    said = ["a red disc on a blue field", "green stripes, black background", "a white ring"]
    y = prompts.contexts(said)
    model = randomize(build("MMDiT-Micro/2", input_size=4, context_dim=32)).eval()
    x, t = torch.randn(3, 4, 4, 4), 0.4
    tt = torch.full((3,), t)
    with torch.no_grad():
        cond, uncond = model(x, tt, y), model(x, tt, null)
        # scale 1 is the conditional model itself: one batch, no unconditional half
        torch.testing.assert_close(guided_velocity(model, y, 1.0, null=null)(x, t), cond,
                                   rtol=0, atol=0)
        guided = guided_velocity(model, y, 1.5, null=null)(x, t)
    torch.testing.assert_close(guided, uncond + 1.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-3  # the captions matter to this network
    # the val captions sampled: image i mod 12 (4 of each of 3 shapes), a caption of its five
    found = prompts.fixed(seed=0, total=30)
    assert found["labels"].tolist() == picks(0, 30, 12, 5).tolist()
    assert [i // 5 for i in found["labels"]] == [i % 12 for i in range(30)]
    assert found["captions"][13] == prompts.captions[found["labels"][13]]
    ralu = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"sampler": "ralu"})})
    (refused,) = model_problems(ralu)
    assert refused.startswith("sample.sampler: ralu samples a SiT's token sets")


def test_each_step_trains_on_one_drawn_caption_of_each_image(captioned):
    from types import SimpleNamespace

    from sra2.data.encode import encode_dataset
    from sra2.data.latents import StepBatches, batch_indices
    from sra2.train.loop import condition

    root, _, cfg = captioned
    encode_dataset(cfg, root / "plain")
    one = StepBatches(root / "plain", global_batch=8, seed=0)
    batch, picks = one[3], one.caption_picks(3)
    rows = one.rows[batch_indices(3, 8, len(one), 0)]
    stored = ShardedStore(root / "plain").array("context")[:]
    np.testing.assert_array_equal(batch["context"].numpy(), stored[rows, picks].astype(np.float32))
    assert len(set(picks.tolist())) > 1 and picks.max() < 5
    assert not np.array_equal(one.caption_picks(4), picks)  # drawn again each step
    # two processes draw the one-process batch between them
    halves = [StepBatches(root / "plain", global_batch=8, seed=0, rank=r, world=2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h[3]["context"] for h in halves]), batch["context"],
                               rtol=0, atol=0)
    # a dropped caption is the empty caption's context
    trainer = SimpleNamespace(null=torch.from_numpy(one.empty_context), cfg=cfg)
    y = condition(trainer, batch, torch.tensor([True, False] * 4))
    torch.testing.assert_close(y[0], trainer.null[0], rtol=0, atol=0)
    torch.testing.assert_close(y[1], batch["context"][1], rtol=0, atol=0)


def test_an_mmdit_run_resumed_halfway_ends_in_the_unbroken_runs_bytes(captioned):
    from sra2.data.encode import encode_dataset
    from sra2.train.loop import train

    root, _, cfg = captioned
    encode_dataset(cfg, root / "resume-store")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": 6, "ckpt_every": 3, "log_every": 3, "workers": 0,
        "copy_dir": str(root / "copies")})})
    summary = train(cfg, root / "resume-store", root / "straight")
    half = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    train(half, root / "resume-store", root / "resumed")
    train(cfg, root / "resume-store", root / "resumed")
    assert summary["loss_align"] > 0  # SRA 2's head on the MMDiT's image stream
    for name in ("metrics.csv", "ema.pt"):
        assert (root / "straight" / name).read_bytes() == (root / "resumed" / name).read_bytes()


@pytest.mark.slow
def test_the_tiny_t2i_pipeline_runs_through_dvc_repro(tmp_path, prefect_api):
    work = copy_repo(tmp_path / "repo", preset="tiny-t2i")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_api,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = run(["dvc", "repro"], work, env)
    assert "MMDiT-Micro/2" in log and "heads" in log
    metrics = json.loads((work / "data/metrics.json").read_text())
    for key in ("fid", "sfid", "inception_score", "clip_score", "pickscore"):
        assert np.isfinite(metrics[key]), key
    assert metrics["comparable"] is False and "text.source" in metrics["why"]
    assert "RANDOM" in metrics["caption_scorers"]
    assert "val2014" in metrics["fid_reference"]
    samples = np.load(work / "data/samples/samples.npz")
    said = samples["captions"].tolist()
    assert samples["arr_0"].shape == (12, 32, 32, 3) and len(said) == 12
    val = read_coco(work / "data/demo/val2014",
                    work / "data/demo/annotations/captions_val2014.json", 5)
    assert all(c in val.captions[i % len(val.captions)] for i, c in enumerate(said))
    grid = Image.open(work / "data/samples/grid.png")
    assert grid.width >= 3 * 128  # 9 samples, each enlarged for the caption under it
    ema = torch.load(work / "data/train/ema.pt", weights_only=True)
    assert ema["name"] == "MMDiT-Micro/2" and "context_embedder.weight" in ema["ema"]
