"""How much of a number is noise.

Two measures of one set's noise:

- finite samples: a bootstrap over the generated images' Inception features (rows drawn with
  replacement, ``evaluate.bootstrap`` times; the reference statistics fixed) gives each of FID,
  sFID and IS a spread and a 95% interval (the 2.5th and 97.5th percentiles);
- sampling seeds: ``sample.seeds`` sets drawn with independent seeds give each number once per
  set; their spread is measured directly (unknown with one set).

Both measure the same thing, how a number moves with a new finite sample of the model's images
(a new seed is a new sample), so they are not added, which would count that noise twice: a set's
noise is the larger of the two standard deviations, and the mean over k sets, the number
reported, has that divided by sqrt(k). It is printed as +- 1.96 of it. Two rows differ beyond the
noise when their difference exceeds 1.96 x sqrt(sd_a^2 + sd_b^2) (a two-sided 5% test of
independent, roughly normal estimates). Precision and recall are not bootstrapped: a resample
repeats images, and a repeated image is its own nearest neighbour, which breaks their k-NN radii.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sra2.evaluate.metrics import inception_score

Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
BOOTSTRAPPED = ("fid", "sfid", "inception_score")


class FixedReference:
    """tr (sigma sigma_ref)^(1/2) against one reference covariance, whose square root is taken
    once: each resample then costs one symmetric eigenvalue problem (the route of
    :func:`sra2.evaluate.metrics.trace_sqrt`, rooted on the reference side)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, device: torch.device):
        self.mu = torch.as_tensor(mu, dtype=torch.float64, device=device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
        w, u = torch.linalg.eigh(sigma)
        self.root = (u * w.clamp(min=0).sqrt()) @ u.T
        self.trace = float(torch.trace(sigma))

    def distance(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        inner = torch.linalg.eigvalsh(self.root @ sigma @ self.root).clamp(min=0).sqrt().sum()
        diff = mu - self.mu
        return float(diff @ diff + torch.trace(sigma) + self.trace - 2 * inner)


def weighted_statistics(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Mean and covariance (N - 1 normalised) of the rows of ``x`` taken ``counts`` times each:
    the statistics of a resample without building it."""
    n = counts.sum()
    mu = counts @ x / n
    centred = x - mu
    return mu, (centred * counts[:, None]).T @ centred / (n - 1)


def bootstrap(fake: dict[str, np.ndarray], reference: dict, draws: int, seed: int,
              device: torch.device, numbers: tuple[str, ...] = BOOTSTRAPPED) -> dict[str, dict]:
    """Per number of ``numbers`` (of :data:`BOOTSTRAPPED`): its values over ``draws`` resamples of
    the generated images (rows drawn with replacement from a generator seeded ``seed``),
    summarised as ``sd`` and the 95% ``interval``."""
    rng = np.random.default_rng(seed)
    n = len(fake["pool"])
    sides = {name: (torch.as_tensor(fake[key], dtype=torch.float64, device=device),
                    FixedReference(*reference[name], device))
             for name, key in (("fid", "pool"), ("sfid", "spatial")) if name in numbers}
    values: dict[str, list[float]] = {name: [] for name in numbers}
    for _ in range(draws):
        rows = rng.integers(0, n, n)
        counts = torch.as_tensor(np.bincount(rows, minlength=n), dtype=torch.float64,
                                 device=device)
        for name, (x, ref) in sides.items():
            values[name].append(ref.distance(*weighted_statistics(x, counts)))
        if "inception_score" in numbers:
            values["inception_score"].append(inception_score(fake["logits"][rows]))
    return {name: summary(v) for name, v in values.items()}


def summary(values: list[float]) -> dict:
    """The spread of a number's values: sample standard deviation and the 2.5th and 97.5th
    percentiles."""
    v = np.asarray(values, dtype=np.float64)
    low, high = np.percentile(v, [2.5, 97.5])
    return {"sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "interval": [float(low), float(high)]}


def noise_of_mean(bootstrap_sd: float, seeds_sd: float | None, sets: int) -> float:
    """The standard deviation of the mean of ``sets`` sets' numbers (module docstring)."""
    return max(bootstrap_sd, seeds_sd or 0.0) / math.sqrt(sets)


def beyond_noise(a: float, sd_a: float, b: float, sd_b: float) -> bool:
    """Whether two numbers differ by more than their combined noise allows (5%, two-sided)."""
    return abs(a - b) > Z95 * math.hypot(sd_a, sd_b)
