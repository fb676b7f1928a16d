"""train stage: SiT and the alignment terms on (SRA 2, SRA, REPA) on the cached latents, with EMA
and checkpoints.

Runs on every GPU of the node (params.yaml `launch`). Resumable: restarts from the latest
checkpoint under --out and takes the same steps an unbroken run would; the EMA weights for
sampling land in <out>/ema.pt, the loss log in <out>/metrics.csv.
"""

from __future__ import annotations

import sys

from flows.harness.common import entry, parse, run_workers, table
from flows.harness.monitor import current
from flows.harness.pictures import Picture
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config
from sra2.evaluate.plots import loss_plot
from sra2.runtime import atomic


def loss_pictures(cfg: Config):
    """The loss curve of the rows received so far (``pictures`` of
    flows.harness.common.run_workers)."""
    from sra2.train.loop import loss_title

    def draw(rows: list[dict]) -> list[Picture]:
        rows = [r for r in rows if "loss" in r]
        return [("training loss", loss_plot(rows, loss_title(cfg)))] if rows else []

    return draw


@stage_flow("train")
def train_flow(cfg: Config, latents: str, out: str, summary: str) -> dict:
    from sra2.methods.registry import describe
    from sra2.train.loop import train

    tc = cfg.train
    current().say(
        f"train: preset {cfg.preset}, {cfg.model.name} + {describe(cfg)}, "
        f"{tc.steps} steps of {tc.global_batch} images, lr {tc.lr}, EMA {tc.ema_decay}, "
        f"{tc.precision}, checkpoint every {tc.ckpt_every}, log every {tc.log_every}; "
        f"latents {latents} -> {out}")
    result = run_workers("train", train, cfg, {"latents": latents, "out": out},
                         f"training {cfg.model.name}", outputs=[out], unit="step",
                         pictures=loss_pictures(cfg))
    if result is not None:
        atomic.write_json(summary, result)
        table("train-summary", result, f"{cfg.model.name} after {cfg.train.steps} steps")
        losses = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k.startswith("loss"))
        current().say(f"train: {result['steps']} steps on {result['processes']} process(es), "
                      f"final {losses or 'losses: none (nothing left to do)'}; wrote {out}/ema.pt")
    return result


def method_problems(cfg: Config) -> list[str]:
    from sra2.methods import registry  # torch is loaded by then (the launch plan counts GPUs)

    return registry.problems(cfg)


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("train", __doc__, {
        "latents": ("data/latents.json", "the latent store written by encode, or the pointer "
                                         "file naming it"),
        "out": ("data/train", "checkpoints, ema.pt, metrics.csv, loss.png"),
        "summary": ("data/train.json",
                    "final losses and the process count, for dvc metrics")}, argv,
        method_problems)
    try:
        atomic.make_folder(args["out"])
    except atomic.NotAFolder as e:  # says all there is to say, as a bad parameter file does
        sys.exit(f"error: {e}")
    from sra2.data.store import pointed_store

    run_stage(train_flow, cfg.preset, cfg=cfg, latents=str(pointed_store(args["latents"])),
              out=args["out"], summary=args["summary"])


if __name__ == "__main__":
    entry(main)
