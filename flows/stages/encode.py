"""encode stage: ImageFolder -> ADM centre crop -> SD-VAE posterior mean/std -> zarr store.

One store per encode settings, <stores>/<digest>/: other settings get a store of their own and
going back reuses the old one; --pointer names the store these settings use (train and evaluate
read it). --out instead writes one store at exactly that path. Runs on every GPU of the node
(params.yaml `launch`). Resumable: finished shards are kept; a rerun encodes the rest.
"""

from __future__ import annotations

from flows.harness.common import entry, parse, run_workers, table
from flows.harness.monitor import current
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config
from sra2.runtime import atomic


@stage_flow("encode")
def encode_flow(cfg: Config, out: str, summary: str, pointer: str | None = None) -> dict:
    """With ``pointer``, ``out`` is a folder of stores, one per settings, and ``pointer`` names the
    one these settings use; without it, ``out`` is the store."""
    from sra2.data.encode import encode_dataset, first_files
    from sra2.data.store import write_pointer

    ec = cfg.encode
    current().say(f"encode: preset {cfg.preset}, {cfg.data.root} at {cfg.data.image_size} px, "
                  f"VAE {cfg.vae.source}, batch {ec.batch_size}, shards of {ec.shard_size}, "
                  f"{ec.dtype}{', flipped too' if ec.flip else ''} -> {out}")
    result = run_workers("encode", encode_dataset, cfg, {"out": out, "per_settings": bool(pointer)},
                         f"encoding {cfg.data.root}", outputs=[out])
    if result is not None:
        if pointer:
            write_pointer(pointer, result["store"])
        atomic.write_json(summary, result)
        table("encode-summary", result, f"encode of {cfg.data.root} into {out}")
        current().say(f"encode: {result['store']}: {result['encoded']} images; rejected "
                      f"{result['rejected']}{first_files(result['rejects'])}; odd (accepted) "
                      f"{result['odd']}{first_files(result['odd_images'])}; encoded now "
                      f"{result['encoded_now']}, {result['images_per_s']} images/s"
                      + (f" (reasons in {summary})" if result["rejects"] or result["odd_images"]
                         else ""))
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("encode", __doc__, {
        "stores": ("data/latents", "folder of zarr latent stores, <stores>/<digest of the encode "
                                   "settings>/, each resumed if it exists"),
        "pointer": ("data/latents.json",
                    "names the store of these settings, for train and evaluate"),
        "out": ("", "one store at exactly this path instead, no pointer (resumed if it exists)"),
        "summary": ("data/encode.json", "counts, rejects and speed, for dvc metrics")}, argv)
    if args["out"]:
        run_stage(encode_flow, cfg.preset, cfg=cfg, out=args["out"], summary=args["summary"])
    else:
        run_stage(encode_flow, cfg.preset, cfg=cfg, out=args["stores"], summary=args["summary"],
                  pointer=args["pointer"])


if __name__ == "__main__":
    entry(main)
