"""Random batch reads from the latent store for several chunk sizes (the encode stage's
``chunk_size``): what one reader process delivers to the training loop.

For each chunk size it writes a synthetic store (``sra2.latents.write_synthetic_store``, the
preset's latent shape, float32) and reads the batches of ``--steps`` training steps
(``StepBatches[step]``: the random rows ``batch_indices`` picks) in one process, from a cold page
cache where the OS allows it, else warm. It prints batches/s, latents/s and the bytes on disk.

    python bench/read.py                                    # sit-b2 shape, 20,000 latents
    python bench/read.py --items 200000 --chunks 1 8 32     # closer to ImageNet's random reads
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sra2.config import resolve
from sra2.latents import StepBatches, write_synthetic_store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sit-b2", help="latent shape and global batch of this preset")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--steps", type=int, default=20, help="batches read per chunk size")
    return p.parse_args(argv)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = resolve({"preset": args.preset})
    side, batch = cfg.data.image_size // 8, cfg.train.global_batch
    shape = (4, side, side)
    print(f"{args.items} latents {shape} float32, batches of {batch} random rows, {args.steps} batches each")
    print(f"{'chunk':>6}{'batches/s':>11}{'latents/s':>11}{'MB on disk':>12}")
    for chunk in args.chunks:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "latents"
            shard = max(1024, chunk) // chunk * chunk
            write_synthetic_store(store, args.items, shape, 1000, chunk, shard)
            batches = StepBatches(store, batch, seed=0)
            batches[0]  # open the arrays
            start = time.perf_counter()
            for step in range(1, args.steps + 1):
                batches[step]
            seconds = time.perf_counter() - start
            print(f"{chunk:6d}{args.steps / seconds:11.2f}{args.steps * batch / seconds:11.0f}"
                  f"{disk_bytes(store) / 1e6:12.1f}")


if __name__ == "__main__":
    main()
