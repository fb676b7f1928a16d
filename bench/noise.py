"""What FID's arithmetic and its bootstrap cost at ADM's sizes, side by side in one run.

Features shaped like the evaluator's at 50K samples: 2048 pool values and 2023 spatial values an
image (Gaussian, with eigenvalues over eight decades as Inception's have), and a reference side of
the same shape. It times, on this machine's CPU (or ``--device cuda``):

- one Frechet distance's trace of a square root, two ways: ADM's ``scipy.linalg.sqrtm`` of the
  product, and the two symmetric eigendecompositions of ``sra2.evaluate.metrics.trace_sqrt``;
- one bootstrap resample of FID, sFID and IS (``sra2.evaluate.noise.bootstrap`` with one draw):
  the weighted covariances of the 50K rows and one eigenvalue problem each;

and prints the times, their ratios, and what ``evaluate.bootstrap`` resamples (default 100) add to
an evaluation.

    python bench/noise.py                   # 50,000 samples, 2048 dimensions (minutes on a CPU)
    python bench/noise.py --smoke           # 500 samples, 64 dimensions (a second; tested)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from sra2.evaluate import noise
from sra2.evaluate.metrics import adm_trace_sqrt, statistics, trace_sqrt


def features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Gaussian rows with eigenvalues from 10 down to 1e-7 in a random basis."""
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * np.sqrt(np.logspace(1, -7, d))) @ basis.T


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--draws", type=int, default=100, help="evaluate.bootstrap to cost")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="500 samples of 64 dimensions")
    args = parser.parse_args(argv)
    n, d = (500, 64) if args.smoke else (args.samples, args.dims)
    rng = np.random.default_rng(0)
    fake = {"pool": features(rng, n, d), "spatial": features(rng, n, d),
            "logits": rng.normal(size=(n, 1008))}
    ref = statistics(features(rng, n, d))
    reference = {"fid": ref, "sfid": ref}
    sigma = statistics(fake["pool"])[1]

    adm_s, adm = timed(lambda: adm_trace_sqrt(sigma, ref[1]))
    eig_s, eig = timed(lambda: trace_sqrt(sigma, ref[1]))
    draw_s, _ = timed(lambda: noise.bootstrap(fake, reference, 1, 0, torch.device(args.device)))
    found = {"samples": n, "dims": d, "adm_sqrtm_s": adm_s, "eigen_route_s": eig_s,
             "traces_relative_difference": abs(adm - eig) / abs(adm),
             "resample_s": draw_s, "bootstrap_s": draw_s * args.draws}
    print(f"{n:,} samples, {d} dimensions, on {args.device}")
    print(f"trace of the square root: ADM's sqrtm {adm_s:.2f} s, two symmetric eigenproblems "
          f"{eig_s:.2f} s: {adm_s / eig_s:.1f}x faster; traces differ by "
          f"{found['traces_relative_difference']:.1e} relative")
    print(f"one evaluation's FID and sFID, each checked two ways: {4 * eig_s:.1f} s (was "
          f"{2 * adm_s:.1f} s with sqrtm alone: {2 * adm_s / (4 * eig_s):.2f}x)")
    total = draw_s * args.draws
    print(f"one bootstrap resample (FID, sFID, IS): {draw_s:.2f} s; evaluate.bootstrap = "
          f"{args.draws}: {total / 60:.1f} min, {total / (4 * eig_s):.0f}x the checked FID and "
          f"sFID")
    return found


if __name__ == "__main__":
    main()
