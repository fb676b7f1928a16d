"""evaluate stage: FID (samples vs the encoded dataset's real images, same crop) and IS.

Writes a metrics JSON for `dvc metrics show`. With evaluate.inception=random (the offline demo)
the Inception network has seeded random weights, and the JSON says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from flows.common import parse, table
from sra2 import atomic, dist
from sra2.config import Config
from sra2.metrics import ArrayImages, CroppedFiles, fid_and_is, inception_weights, real_files
from sra2.generate import read_npz_images


@flow(name="sra2-evaluate", log_prints=True)
def evaluate_flow(cfg: Config, samples: str, latents: str, out: str) -> dict:
    ec = cfg.evaluate
    fake = ArrayImages(read_npz_images(samples))
    real = CroppedFiles(real_files(latents, cfg.data.root, ec.num_real, ec.seed), cfg.data.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        weights = inception_weights(ec.inception, ec.inception_seed, Path(tmp))
        scores = fid_and_is(fake, real, weights, ec.batch_size, dist.device(ec.device))
    note = (f"RANDOM Inception weights (seed {ec.inception_seed}): not comparable to any paper"
            if ec.inception == "random" else "torch-fidelity InceptionV3 (TF-ported) weights")
    result = {**scores, "num_fake": len(fake), "num_real": len(real), "inception_weights": note,
              "preset": cfg.preset}
    atomic.write_json(out, result)
    table("metrics", result, note)
    print(f"FID {scores['fid']:.3f}  IS {scores['inception_score']:.3f}  ({note})")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("evaluate", __doc__, {"samples": ("data/samples/samples.npz", "samples in the ADM format (arr_0, uint8 NHWC)"),
                                "latents": ("data/latents", "the encoded dataset: its files are the real images"),
                                "out": ("data/metrics.json", "fid and inception_score, for dvc metrics")}, argv)
    evaluate_flow(cfg, args["samples"], args["latents"], args["out"])


if __name__ == "__main__":
    main()
