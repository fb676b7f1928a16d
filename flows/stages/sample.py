"""sample stage: EMA weights -> sampler (SDE, ODE, RALU) -> VAE decode -> ADM .npz, PNG grid.

Runs on every GPU of the node (params.yaml `launch`). Resumable: images are written in shards; a
rerun samples only the missing ones.
"""

from __future__ import annotations

from pathlib import Path

from flows.harness.common import entry, parse, run_workers
from flows.harness.monitor import current
from flows.harness.pictures import show_pictures
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config


@stage_flow("sample")
def sample_flow(cfg: Config, ema: str, out: str) -> dict:
    from sra2.sample.generate import sample_stage

    sc, mon = cfg.sample, current()
    steps = f"{sc.ralu.steps} steps" if sc.sampler == "ralu" else f"{sc.steps} steps"
    conditions = (f"captions of {cfg.data.val_captions}" if cfg.data.kind == "coco"
                  else f"labels {sc.labels}")
    mon.say(f"sample: preset {cfg.preset}, {sc.total} images ({sc.seeds} set(s)) from {ema}, "
            f"{sc.sampler} {steps}, CFG {sc.cfg_scale} on {sc.cfg_interval}, {conditions}, "
            f"batch {sc.batch_size}, shards of {sc.shard_size} -> {out}")
    result = run_workers("sample", sample_stage, cfg, {"ema_path": ema, "out": out},
                         f"sampling {cfg.sample.total} images", outputs=[out])
    if result is not None:
        # a VAE trained by the demo-data stage left real images beside what it gives back for
        # them: how good a sample can look through this VAE
        pictures = [(f"the first {sc.grid} samples", result["grid"]),
                    ("real images (odd rows) through the same VAE (even rows)",
                     Path(cfg.vae.source) / "reconstructions.png")]
        show_pictures(mon, "sample-grid", pictures, f"samples of {ema}")
        mon.say(f"sample: wrote {result['npz']} ({result['samples']} images) and {result['grid']}")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("sample", __doc__, {
        "ema": ("data/train/ema.pt", "weights: our export, or an official SiT / REPA checkpoint"),
        "out": ("data/samples", "shards/, samples.npz (ADM format) and grid.png")}, argv)
    run_stage(sample_flow, cfg.preset, cfg=cfg, ema=args["ema"], out=args["out"])


if __name__ == "__main__":
    entry(main)
