"""sample stage: EMA weights -> SDE Euler-Maruyama (or ODE) -> VAE decode -> ADM .npz + PNG grid.

Resumable: images are written in shards; a rerun samples only the missing ones.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import Progress, is_main, parse
from sra2 import vae
from sra2.config import Config
from sra2.generate import generate, write_grid, write_npz
from sra2.store import ShardedStore


@flow(name="sra2-sample", log_prints=True, retries=1)  # a retry resumes from the finished shards
def sample_flow(cfg: Config, ema: str, out: str) -> None:
    out_dir = Path(out)
    progress = Progress("sample-progress", f"sampling {cfg.sample.num_samples} images")
    store = ShardedStore(generate(cfg, ema, out_dir / "shards", progress))
    if not is_main():
        return
    write_npz(store, out_dir / "samples.npz")
    caption = "DEMO: random-weight VAE, decoded images mean nothing" if vae.is_random(cfg.vae) else ""
    write_grid(store.array("images")[: cfg.sample.grid], out_dir / "grid.png", caption)
    print(f"wrote {out_dir / 'samples.npz'} and {out_dir / 'grid.png'}")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("sample", __doc__, {
        "ema": ("data/train/ema.pt", "weights: our export, or an official SiT / REPA checkpoint"),
        "out": ("data/samples", "shards/, samples.npz (ADM format) and grid.png")}, argv)
    sample_flow(cfg, args["ema"], args["out"])


if __name__ == "__main__":
    main()
