"""train stage: SiT + SRA 2 alignment loss on the cached latents, with EMA and checkpoints.

Runs on every GPU of the node (params.yaml `launch`). Resumable: restarts from the latest
checkpoint under --out and takes the same steps an unbroken run would; the EMA weights for
sampling land in <out>/ema.pt, the loss log in <out>/metrics.csv.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.common import parse, run_workers, table
from sra2 import atomic
from sra2.config import Config
from sra2.train import train


@flow(name="sra2-train", log_prints=True)
def train_flow(cfg: Config, latents: str, out: str, summary: str) -> dict:
    result = run_workers("train", train, cfg, {"latents": latents, "out": out},
                         f"training {cfg.model.name}", outputs=[out])
    if result is not None:
        atomic.write_json(summary, result)
        table("train-summary", result, f"{cfg.model.name} after {cfg.train.steps} steps")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("train", __doc__, {
        "latents": ("data/latents", "the latent store written by encode"),
        "out": ("data/train", "checkpoints, ema.pt, metrics.csv, loss.png"),
        "summary": ("data/train.json", "final losses and the process count, for dvc metrics")}, argv)
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    train_flow(cfg, args["latents"], args["out"], args["summary"])


if __name__ == "__main__":
    main()
