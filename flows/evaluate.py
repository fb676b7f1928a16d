"""evaluate stage: FID and IS of the samples; FID against ADM-format reference statistics
(evaluate.reference) or against the encoded dataset's real images with the same crop.

Writes a metrics JSON for `dvc metrics show`. With evaluate.inception=random (the offline demo)
the Inception network has seeded random weights, and the JSON says so.
"""

from __future__ import annotations

from prefect import flow

from flows.common import parse, table
from sra2 import atomic
from sra2.config import Config
from sra2.metrics import evaluate


@flow(name="sra2-evaluate", log_prints=True)
def evaluate_flow(cfg: Config, samples: str, latents: str, out: str) -> dict:
    result = evaluate(cfg, samples, latents)
    atomic.write_json(out, result)
    table("metrics", result, result["inception_weights"])
    print(f"FID {result['fid']:.3f}  IS {result['inception_score']:.3f}  "
          f"({result['inception_weights']}; FID against {result['fid_reference']})")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("evaluate", __doc__, {
        "samples": ("data/samples/samples.npz", "samples in the ADM format (arr_0, uint8 NHWC)"),
        "latents": ("data/latents", "the encoded dataset: its files are the real images"),
        "out": ("data/metrics.json", "fid and inception_score, for dvc metrics")}, argv)
    evaluate_flow(cfg, args["samples"], args["latents"], args["out"])


if __name__ == "__main__":
    main()
