"""sample stage: EMA weights -> SDE Euler-Maruyama (or ODE) -> VAE decode -> ADM .npz + PNG grid.

Runs on every GPU of the node (params.yaml `launch`). Resumable: images are written in shards; a
rerun samples only the missing ones.
"""

from __future__ import annotations

from prefect import flow

from flows.common import parse, run_workers
from sra2.config import Config
from sra2.generate import sample_stage


@flow(name="sra2-sample", log_prints=True)
def sample_flow(cfg: Config, ema: str, out: str) -> dict:
    result = run_workers("sample", sample_stage, cfg, {"ema_path": ema, "out": out},
                         f"sampling {cfg.sample.num_samples} images", outputs=[out])
    if result is not None:
        print(f"wrote {result['npz']} and {result['grid']}")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("sample", __doc__, {
        "ema": ("data/train/ema.pt", "weights: our export, or an official SiT / REPA checkpoint"),
        "out": ("data/samples", "shards/, samples.npz (ADM format) and grid.png")}, argv)
    sample_flow(cfg, args["ema"], args["out"])


if __name__ == "__main__":
    main()
