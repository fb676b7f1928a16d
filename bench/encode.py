"""Throughput of the whole encode stage next to the bare VAE encoder, in one run on one machine.

The stage (``sra2.data.encode.encode_dataset``) decodes and crops real JPEG files in worker
processes, runs the VAE and writes a compressed zarr store; the bare encoder
(``sra2.data.encode.measure_encoder``) only runs the VAE on a batch already on the device. Their
ratio says how much of the VAE's speed the stage keeps (goal: >= 0.9). Both use the same VAE, batch
size, resolution and precision.

    python bench/encode.py                                  # demo preset on the CPU
    python bench/encode.py --preset sit-b2 --vae random-sd  # SD-VAE shape at 256x256 on a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sra2.config.params import Config, resolve
from sra2.data.demo import write_demo_dataset
from sra2.data.encode import encode_dataset, measure_encoder
from sra2.data.images import list_images
from sra2.model import vae as vae_lib
from sra2.runtime import dist

SD_VAE_SHAPE = vae_lib.SD_VAE_SHAPE  # its weights cannot be downloaded here: seeded ones
CLASSES = 10


def vae_section(choice: str | None) -> dict:
    """``vae`` overrides for ``--vae``: none, the SD-VAE shape with random weights, or a path."""
    if choice is None:
        return {}
    if choice == "random-sd":
        return {"source": "random", "random": SD_VAE_SHAPE}
    return {"source": choice, "random": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo",
                   help="preset giving the image size, the VAE and the encode settings "
                        "(default: demo)")
    p.add_argument("--vae", default=None,
                   help="'random-sd' for the SD-VAE architecture with seeded random weights, or a "
                        "local diffusers VAE directory; default: the preset's VAE")
    p.add_argument("--images", type=int, default=512,
                   help=f"JPEG files to generate, rounded up to a multiple of {CLASSES} "
                        "(default: 512)")
    p.add_argument("--data", default=None,
                   help="encode this existing ImageFolder instead of generating one")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per VAE batch; default: the preset's encode.batch_size")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding worker processes; default: the preset's encode.workers")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="VAE compute precision (autocast on a GPU only); default: the preset's")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where the VAE runs; default: the preset's encode.device")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed batches of the bare encoder (after one warm-up), measured before "
                        "and after the stage (default: 5)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, root: Path) -> Config:
    encode = {"batch_size": args.batch_size, "workers": args.workers,
              "precision": args.precision, "device": args.device}
    return resolve({"preset": args.preset, "data": {"root": str(root), "demo": None},
                    "vae": vae_section(args.vae),
                    "encode": {k: v for k, v in encode.items() if v is not None}})


def make_dataset(root: Path, images: int, size: int) -> tuple[int, float]:
    """JPEGs larger than the crop (up to 2.5x), so every file is resized and cropped as usual."""
    start = time.perf_counter()
    n = write_demo_dataset(root, CLASSES, math.ceil(images / CLASSES), min_side=size,
                           max_side=int(2.5 * size), seed=0)
    return n, time.perf_counter() - start


def machine(device: torch.device) -> str:
    cpus = f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    return f"{cpus}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def bare_encoder(cfg: Config, device: torch.device, repeats: int) -> float:
    vae = vae_lib.load_vae(cfg.vae, device)
    rate = measure_encoder(vae, cfg.encode.batch_size, cfg.data.image_size, device,
                           cfg.encode.precision, repeats)
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the stage the same memory it would have alone
    return rate


class _Clock:
    """Progress callback noting when each batch finished, to separate start-up from steady speed."""

    def __init__(self):
        self.start, self.marks = time.perf_counter(), []

    def __call__(self, done: int, todo: int, *_) -> None:
        self.marks.append((time.perf_counter(), done))

    def steady_rate(self) -> float:
        """Images/s from the end of the first batch to the end of the last one."""
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def describe(cfg: Config, device: torch.device) -> None:
    size, e = cfg.data.image_size, cfg.encode
    shape = cfg.vae.random.block_out_channels if vae_lib.is_random(cfg.vae) else cfg.vae.source
    print(f"machine: {machine(device)}, device {device}")
    print(f"config:  preset {cfg.preset}, vae {shape}, {size}x{size}, batch {e.batch_size}, "
          f"workers {e.workers}, precision {e.precision}, store {e.dtype}, flip {e.flip}")
    if e.shard_size % e.batch_size:
        print(f"note:    shard_size {e.shard_size} is not a multiple of the batch size: "
              "batches are cut at shard ends, so some are smaller")


def prepare_data(args: argparse.Namespace, root: Path, size: int) -> None:
    if args.data is None:
        n, secs = make_dataset(root, args.images, size)
        print(f"data:    {n} generated JPEGs, sides {size}..{int(2.5 * size)} px, "
              f"made in {secs:.1f} s (not timed)")
    else:
        print(f"data:    {len(list_images(root))} files of {root}")


def report(before: float, after: float, summary: dict, wall: float, clock: _Clock) -> None:
    encoder = (before + after) / 2
    stage = summary["files"] / wall  # a fresh store: every file went through the stage
    rows = [("bare VAE encoder, before the stage", before),
            ("bare VAE encoder, after the stage", after),
            ("bare VAE encoder, mean", encoder),
            ("encode stage, whole call (wall)", stage),
            ("encode stage, batch loop only", summary["images_per_s"]),
            ("encode stage, after its first batch", clock.steady_rate())]
    print(f"\n{'':38}{'images/s':>10}{'ratio':>8}")
    for name, rate in rows:
        print(f"{name:38}{rate:10.1f}{rate / encoder:8.2f}")
    print(f"\nstage: {summary['files']} images in {wall:.2f} s; first batch done "
          f"{clock.marks[0][0] - clock.start:.2f} s after the call began (VAE, store, ETA "
          f"estimate, worker start-up); {summary['rejected']} rejected")
    print(f"stage/encoder ratio: {stage / encoder:.2f}")


def run(args: argparse.Namespace, root: Path, work: Path) -> None:
    cfg = build_config(args, root)
    device = dist.device(cfg.encode.device)
    describe(cfg, device)
    before = bare_encoder(cfg, device, args.repeats)  # first, so a VAE that cannot load fails fast
    prepare_data(args, root, cfg.data.image_size)
    clock = _Clock()
    summary = encode_dataset(cfg, work / "latents", progress=clock)
    wall = time.perf_counter() - clock.start
    after = bare_encoder(cfg, device, args.repeats)
    report(before, after, summary, wall, clock)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sra2-bench-") as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "images"
        run(args, root.resolve(), Path(tmp))


if __name__ == "__main__":
    main()
