"""What checking every stored byte costs: a store's deep check against a bare read of its files.

It writes a synthetic latent store laid out as encode lays it out (one latent a chunk, float32,
the preset's latent shape, every chunk with its CRC32C), then, alternating in rounds with the
page cache warm:

- the deep check (``ShardedStore.check(deep=True)``): every done shard's files against the sizes
  and CRC32Cs of their done marks, what a writer stage does when it reopens its store and what
  ``python -m sra2.tools.verify`` does;
- the bare read: the same files read in 16 MiB blocks and thrown away, the physical reference;
- a decode of every chunk through zarr (what a training read does, CRC32C of each chunk checked),
  for comparison.

It prints GB/s of each (the median over rounds), the deep check's ratio to the bare read, and
what a deep check of ImageNet's latents (1,281,167 images, mean and std, the preset's shape) takes
at the deep check's measured rate. On a cold cache the disk's own rate bounds all three.

    python bench/verify.py                  # sit-b2 shape, 20,000 latents
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

from sra2.config.params import resolve
from sra2.data.latents import write_synthetic_store
from sra2.data.store import ShardedStore

IMAGENET = 1_281_167


def bare_read(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def decode_all(store: ShardedStore) -> None:
    for name in store.sharded:
        for shard in range(store.num_shards):
            store.read(name, slice(*store.shard_range(shard)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sit-b2", help="the latent shape of this preset")
    p.add_argument("--items", type=int, default=20000, help="latents in the synthetic store")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are printed)")
    args = p.parse_args(argv)
    cfg = resolve({"preset": args.preset})
    side = cfg.data.image_size // 8
    shape = (4, side, side)
    with tempfile.TemporaryDirectory(prefix="sra2-bench-verify-") as tmp:
        store = write_synthetic_store(Path(tmp) / "store", args.items, shape, 1000, chunk_size=1,
                                      shard_size=cfg.encode.shard_size)
        files = [f for s in range(store.num_shards) for f in store.shard_files(s).values()]
        size = sum(f.stat().st_size for f in files)
        ways = {"deep check": lambda: store.check(deep=True),
                "bare read": lambda: bare_read(files),
                "zarr decode": lambda: decode_all(store)}
        seconds = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                seconds[name].append(time.perf_counter() - start)
        rates = {name: size / statistics.median(s) / 1e9 for name, s in seconds.items()}
    print(f"{args.items} latents {shape} float32, mean and std: {size / 1e9:.2f} GB in "
          f"{len(files)} shard files")
    for name, rate in rates.items():
        print(f"  {name:12s} {rate:7.2f} GB/s")
    imagenet = size / args.items * IMAGENET
    print(f"ImageNet's latents ({imagenet / 1e9:.0f} GB stored): a deep check takes "
          f"{imagenet / rates['deep check'] / 1e9:.0f} s at this rate")
    print(f"deep check / bare read: {rates['deep check'] / rates['bare read']:.2f}")


if __name__ == "__main__":
    main()
