"""feature-pca: the paper's PCA picture of SD-VAE tokens and SiT hidden states, for one or more
EMA checkpoints side by side, and per block the R^2 of a linear map from the VAE tokens to the
hidden state (on held-out tokens). See sra2/evaluate/feature_pca.py for what is computed.

A command, not a DVC stage: it compares checkpoints of different experiments (vanilla and SRA 2),
which no stage of one experiment sees. Give each checkpoint as LABEL=PATH, comma-separated:
  python -m flows.stages.feature_pca --ema vanilla=runs/vanilla/ema.pt,sra2=data/train/ema.pt
Writes the PNG, the numbers beside it (.json), and the picture as a Prefect artifact.
"""

from __future__ import annotations

import sys

from flows.harness.common import entry, parse, table
from flows.harness.monitor import current
from flows.harness.pictures import show_pictures
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config


@stage_flow("feature-pca")
def feature_pca_flow(cfg: Config, ema: str, latents: str, out: str, images: int, t: float,
                     seed: int, blocks: str) -> dict:
    from sra2.evaluate.feature_pca import feature_pca

    mon = current()
    mon.say(f"feature-pca: {images} images of {latents} at t {t} (seed {seed}), blocks {blocks}, "
            f"checkpoints {ema} -> {out}")
    result = feature_pca(cfg, ema, latents, out, images, t, seed, blocks, log=mon.say)
    r2 = {f"{c['label']} block {b['block']}": b["r2"] for c in result["checkpoints"]
          for b in c["blocks"]}
    table("feature-pca-r2", r2, "R^2 of a linear map from the VAE tokens to each hidden state, "
          f"on {result['held_out_images']} held-out images (position means removed)")
    show_pictures(mon, "feature-pca", [(f"PCA of VAE tokens and hidden states at t = {t}", out)],
                  f"feature PCA of {ema}")
    mon.say(f"feature-pca: wrote {out} and {result['json']}")
    return result


def _number(args: dict, key: str, kind: type):
    try:
        return kind(args[key])
    except ValueError:
        sys.exit(f"error: --{key}: {args[key]!r} is not a {kind.__name__}")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("feature-pca", __doc__, {
        "ema": ("data/train/ema.pt", "checkpoints, [LABEL=]PATH comma-separated: our EMA exports, "
                                     "or official SiT / REPA files (sample.convention)"),
        "latents": ("data/latents.json", "the latent store (or the pointer file naming it)"),
        "out": ("data/feature_pca/features.png", "the picture; the numbers go beside it (.json)"),
        "images": ("4", "how many images of the store, drawn by --seed"),
        "t": ("0.5", "noise level in SiT time: 0 noise, 1 data"),
        "seed": ("0", "picks the images, their noise and the R^2 split"),
        "blocks": ("auto", "comma list of 1-based blocks and 'last'; auto: 2, 4, 8 below the "
                           "depth, and the last")}, argv)
    from sra2.evaluate import feature_pca as fp

    numbers = {"images": _number(args, "images", int), "t": _number(args, "t", float),
               "seed": _number(args, "seed", int)}
    try:  # before Prefect starts: a wrong path or block list fails at once, named
        fp.parse_checkpoints(args["ema"])
        fp.parse_blocks(args["blocks"])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    run_stage(feature_pca_flow, cfg.preset, cfg=cfg, ema=args["ema"], latents=args["latents"],
              out=args["out"], blocks=args["blocks"], **numbers)


if __name__ == "__main__":
    entry(main)
