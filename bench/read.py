"""The training read path against a bare memory-mapped gather, with one GPU's need beside them.

It writes a synthetic latent store laid out as encode lays it out (``--chunk-size`` latents a
chunk, float32, the preset's latent shape), builds its node-local copy (``sra2.data.latent_copy``,
timed, and verified once more on demand, timed), then, in one process with a warm page cache,
reads the batches of ``--steps`` training steps (the random rows ``batch_indices`` picks for the
preset's global batch) in rounds that alternate between:

- the read path: ``StepBatches[step]`` on the copy, what one reader process does per step;
- the bare gather: ``np.load(..., mmap_mode="r")[sorted rows]`` of the same files and rows, the
  physical reference;
- the zarr store itself (``train.read_from: store``), for comparison;
- one reader process through the DataLoader (``sra2.data.latents.stream``, what the loop consumes:
  inter-process transfer included).

It prints latents/s of each (the median over rounds), the read path's ratio to the bare gather,
the reading process's memory (RSS, PSS, private and anonymous, from /proc/self/smaps_rollup), and
the latents/s one GPU trains at 40% and 50% MFU (``sra2.train.cost``: 3 forward passes per image,
with the projector). Its last line reads ``read path / bare gather: <ratio> (<n> latents/s per
reader; one GPU needs <m> at 50% MFU)``.

With ``--pixels`` the store holds seeded random uint8 images of the preset's size as well (as
``encode.pixels`` stores them; random bytes do not compress, which slows the zarr store's rows but
not the copy's), the copy holds them, and every way reads them with the latents (REPA's batches).

    python bench/read.py                                    # sit-b2 shape, 20,000 latents
    python bench/read.py --items 100000 --preset sit-xl2    # a larger file, another model's need
    python bench/read.py --items 4000 --pixels              # with the 256 px images REPA reads
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

import numpy as np
import torch

from sra2.config.params import resolve
from sra2.data import latent_copy
from sra2.data.latents import StepBatches, batch_indices, stream, write_synthetic_store
from sra2.model import flops
from sra2.runtime import procs
from sra2.train import cost

READ_PATH, BARE = "read path (StepBatches on the copy)", "bare memmap gather"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sit-b2",
                   help="latent shape, global batch and model of this preset")
    p.add_argument("--items", type=int, default=20000, help="latents in the synthetic store")
    p.add_argument("--chunk-size", type=int, default=1, help="latents per chunk of the store")
    p.add_argument("--steps", type=int, default=40, help="batches read per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are printed)")
    p.add_argument("--gpu-tflops", type=float, default=flops.PEAK_TFLOPS["H100"],
                   help="the GPU's dense bf16 peak, TFLOP/s (default: H100/H200)")
    p.add_argument("--dir",
                   help="where to write the store and its copy (default: a temporary folder)")
    p.add_argument("--pixels", action="store_true",
                   help="the store and the copy hold the images too, and every way reads them")
    return p.parse_args(argv)


def memory() -> dict[str, float]:
    """This process's memory in MB: RSS, PSS, private and anonymous (sra2.runtime.procs.memory)."""
    found = procs.memory()
    return {"RSS": found["rss"] / 2**20, "PSS": found["pss"] / 2**20,
            "private": found["private"] / 2**20, "anonymous": found["anonymous"] / 2**20}


def timed(read, steps: range, batch: int) -> float:
    start = time.perf_counter()
    for step in steps:
        read(step)
    return len(steps) * batch / (time.perf_counter() - start)


def read_rates(store: Path, copy: latent_copy.LatentCopy, batch: int, steps: int,
               rounds: int) -> tuple[dict[str, float], dict, dict]:
    """Median latents/s of each way of reading the same batches (warm page cache, alternating
    rounds), and this process's memory before and after the timed rounds."""
    images = latent_copy.IMAGES in copy.names
    path = StepBatches(store, batch, seed=0, copy=copy, images=images)
    from_store = StepBatches(store, batch, seed=0, images=images)
    maps = {name: copy.open(name) for name in copy.names}

    def bare(step: int):
        rows = np.sort(batch_indices(step, batch, len(path), 0))
        return [m[rows] for m in maps.values()]

    readers = {READ_PATH: path.__getitem__, BARE: bare,
               "zarr store (train.read_from: store)": from_store.__getitem__}
    window = range(1, steps + 1)
    for read in readers.values():  # warm the page cache and the epoch permutation
        timed(read, window, batch)
    before = memory()
    rates = {name: [] for name in readers}
    for _ in range(rounds):
        for name, read in readers.items():
            rates[name].append(timed(read, window, batch))
    after = memory()
    # one reader process feeding this one, as the training loop is fed (transfer included)
    loader = stream(path, 1, 1 + rounds * steps, 1, torch.device("cpu"))
    start = time.perf_counter()
    for count, _ in enumerate(loader, 1):
        if count == steps:  # the reader process has started: time from here
            start = time.perf_counter()
    rates["1 reader process through the loader"] = [
        (rounds - 1) * steps * batch / (time.perf_counter() - start)]
    return {name: statistics.median(r) for name, r in rates.items()}, before, after


def build_copy(root: Path, items: int, shape: tuple, chunk: int, classes: int = 1000,
               image_size: int | None = None) -> tuple[Path, latent_copy.LatentCopy, dict]:
    """A synthetic store under ``root`` (with images of ``image_size`` px where given) and its
    copy; the copy's build and full-check rates."""
    store = write_synthetic_store(root / "latents", items, shape, classes, chunk,
                                  max(1024 // chunk, 1) * chunk, image_size=image_size)
    images = image_size is not None
    start = time.perf_counter()
    copy = latent_copy.ensure(store.path, str(root / "copies"), log=lambda _: None, images=images)
    built = time.perf_counter() - start
    start = time.perf_counter()
    latent_copy.verify(store.path, str(root / "copies"), log=lambda _: None, images=images)
    checked = time.perf_counter() - start
    gb = latent_copy.nbytes(copy.arrays) / 1e9
    return store.path, copy, {"GB": gb, "build GB/s": gb / built, "verify GB/s": gb / checked}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = resolve({"preset": args.preset})
    side, batch = cfg.data.image_size // 8, cfg.train.global_batch
    shape = (4, side, side)
    image_size = cfg.data.image_size if args.pixels else None
    print(f"{args.items} latents {shape} float32"
          f"{f' with uint8 {image_size} px images' if image_size else ''} (chunks of "
          f"{args.chunk_size}), batches of {batch} random rows ({args.preset}), {args.steps} "
          f"batches a round, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store, copy, built = build_copy(Path(tmp), args.items, shape, args.chunk_size,
                                        image_size=image_size)
        imagenet = built["GB"] / args.items * 1_281_167
        print(f"copy: {built['GB']:.2f} GB, built from the store at "
              f"{built['build GB/s']:.2f} GB/s, "
              f"verified at {built['verify GB/s']:.2f} GB/s: a full check of ImageNet's "
              f"~{imagenet:.0f} GB copy takes "
              f"~{imagenet / built['verify GB/s']:.0f} s at that rate")
        median, before, after = read_rates(store, copy, batch, args.steps, args.rounds)
    reference = median[BARE]
    print(f"\n{'':40}{'latents/s':>12}{'/ bare':>8}")
    for name, rate in median.items():
        print(f"{name:40}{rate:12.0f}{rate / reference:8.3f}")
    print(f"\nmemory of this process, MB, before / after {args.rounds} rounds of reading: "
          + ", ".join(f"{k} {before[k]:.0f} / {after[k]:.0f}" for k in before))
    need = {mfu: cost.gpu_need(cfg, args.gpu_tflops, mfu) for mfu in (0.4, 0.5)}
    print(f"one GPU of {args.gpu_tflops:.0f} TFLOP/s training {cfg.model.name}"
          f"{' + SRA 2' if cfg.align.enabled else ''} ({cost.train_flops(cfg) / 1e9:.1f} GFLOP "
          f"an image) needs {need[0.4]:.0f} latents/s at 40% MFU, {need[0.5]:.0f} at 50%")
    ours = median[READ_PATH]
    print(f"read path / bare gather: {ours / reference:.2f} ({ours:.0f} latents/s per reader; "
          f"one GPU needs {need[0.5]:.0f} at 50% MFU)")


if __name__ == "__main__":
    main()
