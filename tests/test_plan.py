"""sra2 plan: a paper run's time and bytes from its FLOPs and arrays, computed by hand here."""

import json

import pytest

from sra2.config.params import resolve
from sra2.model import flops
from sra2.tools import plan
from sra2.train import cost


def test_a_paper_plan_is_its_flops_at_the_mfu_and_its_arrays_bytes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    plan.main(["--params", str(tmp_path / "none.yaml"), "-S", "preset=sit-b2", "--gpus", "8",
               "--gpu", "H100", "--cores", "64", "--mfu", "0.5", "--json", str(out)])
    figures = json.loads(out.read_text())
    cfg = resolve({"preset": "sit-b2"})
    assert figures["images"] == plan.IMAGENET_TRAIN  # no data.root here: ImageNet's count
    per_gpu = flops.PEAK_TFLOPS["H100"] * 1e12 * 0.5
    trained = 400_000 * 256 * cost.train_flops(cfg)
    assert figures["stages"]["train"]["gpu_seconds"] == pytest.approx(trained / per_gpu)
    assert figures["stages"]["train"]["seconds"] == pytest.approx(trained / per_gpu / 8)
    # float32 mean and std of 4 x 32 x 32: 16 KiB each an image, at their assumed ratios
    store = figures["folders"]["data/latents"]["end"]
    assert store == pytest.approx(plan.IMAGENET_TRAIN * 16384 * (0.92 + 0.80), rel=0.01)
    # the samples once at the end (the .npz), beside their shards while it is written
    samples = figures["folders"]["data/samples/shards"]
    assert samples["end"] == pytest.approx(50_000 * 256 * 256 * 3, rel=1e-5)
    assert samples["peak"] == pytest.approx(2 * samples["end"], rel=0.01)
    # JPEG decoding: 8 ranks of 64 / 8 - 1 = 7 workers at DECODE_PER_CORE each, the GPUs faster
    assert figures["stages"]["encode"]["seconds"] == pytest.approx(
        plan.IMAGENET_TRAIN / (8 * 7 * plan.DECODE_PER_CORE))
    assert "| train | 400,000 steps x 256 images" in capsys.readouterr().out


def test_an_unknown_gpu_is_named():
    with pytest.raises(ValueError, match="--gpu 'B300': unknown; one of H100"):
        plan.main(["-S", "preset=sit-b2", "--gpu", "B300"])
