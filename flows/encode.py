"""encode stage: ImageFolder -> ADM centre crop -> SD-VAE posterior mean/std -> zarr store.

Runs on every GPU of the node (params.yaml `launch`). Resumable: finished shards are kept; a
rerun encodes the rest.
"""

from __future__ import annotations

from prefect import flow

from flows.common import parse, run_workers, table
from sra2 import atomic
from sra2.config import Config
from sra2.encode import encode_dataset


@flow(name="sra2-encode", log_prints=True)
def encode_flow(cfg: Config, out: str, summary: str) -> dict:
    result = run_workers("encode", encode_dataset, cfg, {"out": out}, f"encoding {cfg.data.root}", outputs=[out])
    if result is not None:
        atomic.write_json(summary, result)
        table("encode-summary", result, f"encode of {cfg.data.root} into {out}")
        print(f"encoded {result['encoded']} images, rejected {result['rejected']}, "
              f"{result['images_per_s']} images/s")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("encode", __doc__, {
        "out": ("data/latents", "the zarr latent store (resumed if it exists)"),
        "summary": ("data/encode.json", "counts, rejects and speed, for dvc metrics")}, argv)
    encode_flow(cfg, args["out"], args["summary"])


if __name__ == "__main__":
    main()
