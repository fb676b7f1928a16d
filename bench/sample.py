"""Sampling throughput in one run on one machine: the sample stage against bare model forwards.

The bare rate is ``sample.steps`` forwards of the SiT on a batch already on the device (the
network evaluations a sampler cannot avoid); the stage is ``sra2.sample.generate.sample_stage``:
noise from per-sample generators, the sampler's arithmetic, VAE decode, shards written, the ADM .npz
and the grid. Goal: stage/bare >= 0.95. The SiT has its initial weights (the speed does not
depend on them); the VAE is the preset's.

    python bench/sample.py                                    # demo preset, CPU
    python bench/sample.py --preset sit-xl2 --num 2000 --vae random-sd --precision bf16   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.encode import SD_VAE_SHAPE
from sra2.config.params import Config, resolve
from sra2.runtime import atomic, dist
from sra2.sample.generate import sample_stage
from sra2.train.loop import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--model", help="override model.name, e.g. SiT-XL/2")
    p.add_argument("--num", type=int, default=256, help="images the stage samples")
    p.add_argument("--batch", type=int, help="images per network call (default: the preset's)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the preset's, 250)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--vae", choices=["preset", "random", "random-sd"], default="random",
                   help="random: the preset's demo VAE shape with seeded weights (speed does not "
                        "depend on them); random-sd: the SD-VAE architecture with seeded weights; "
                        "preset: vae.source")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    data = resolve({"preset": args.preset}).model_dump()
    sample = {"num_samples": args.num, "device": args.device, "grid": min(16, args.num)}
    for key, value in (("batch_size", args.batch), ("steps", args.steps),
                       ("precision", args.precision)):
        if value is not None:
            sample[key] = value
    sample["shard_size"] = sample.get("batch_size", data["sample"]["batch_size"])
    data["sample"] = {**data["sample"], **sample}
    if args.model:
        data["model"] = {**data["model"], "name": args.model}
    if args.vae != "preset":
        shape = data["vae"].get("random") if args.vae == "random" else None
        data["vae"] = {**data["vae"], "source": "random", "random": shape or SD_VAE_SHAPE}
    return Config.model_validate(data)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(cfg: Config, model: torch.nn.Module, device: torch.device, windows: int = 3) -> float:
    """Images/s of ``steps`` forwards per image on a batch on the device (median of windows)."""
    n, side = cfg.sample.batch_size, model.input_size
    x = torch.randn(n, model.in_channels, side, side, device=device)
    t, y = torch.full((n,), 0.5, device=device), torch.zeros(n, dtype=torch.long, device=device)
    rates = []
    with torch.no_grad(), dist.autocast(device, cfg.sample.precision):
        model(x, t, y)
        for _ in range(windows):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(cfg.sample.steps):
                model(x, t, y)
            synchronize(device)
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    device = dist.device(args.device)
    sc = cfg.sample
    model = build_model(cfg, cfg.data.image_size // 8).to(device).eval()
    print(f"machine: {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}")
    print(f"config:  {cfg.model.name}, {sc.sampler} {sc.steps} steps, batch {sc.batch_size}, "
          f"{sc.precision}, {sc.num_samples} images, VAE {cfg.vae.source} "
          f"{cfg.vae.random and list(cfg.vae.random.block_out_channels)}")
    before = bare_rate(cfg, model, device)
    with tempfile.TemporaryDirectory() as tmp:
        ema = Path(tmp) / "ema.pt"
        atomic.save_torch({"name": cfg.model.name, "ema": model.state_dict()}, ema)
        stamps = []
        start = time.perf_counter()
        sample_stage(cfg, ema, Path(tmp) / "samples",
                     lambda done, todo: stamps.append((time.perf_counter(), done)))
        wall = time.perf_counter() - start
    after = bare_rate(cfg, model, device)
    bare = (before + after) / 2
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    rates = {"bare forwards (before)": before, "bare forwards (after)": after,
             "stage after its first batch": (n1 - n0) / (t1 - t0) if n1 > n0 else float("nan"),
             "stage, whole call (wall)": sc.num_samples / wall}
    print(f"\n{'':30}{'images/s':>10}{'/ bare':>8}")
    for name, rate in rates.items():
        print(f"{name:30}{rate:10.2f}{rate / bare:8.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print("stage/bare ratio (after the first batch): "
          f"{rates['stage after its first batch'] / bare:.3f}")


if __name__ == "__main__":
    main()
