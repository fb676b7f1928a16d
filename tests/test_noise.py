"""The noise of a number: the bootstrap's interval covers what it claims to, the resample's
statistics are those of the rows it repeats, and two rows are told apart only beyond their noise."""

import numpy as np
import pytest
import torch

from sra2.evaluate.metrics import frechet_distance, statistics
from sra2.evaluate.noise import (
    FixedReference,
    beyond_noise,
    bootstrap,
    noise_of_mean,
    weighted_statistics,
)

CPU = torch.device("cpu")


def test_a_resamples_statistics_are_those_of_its_repeated_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    counts = np.array([0, 3, 1, 0, 2, 1, 0])
    mu, sigma = weighted_statistics(torch.as_tensor(x),
                                    torch.as_tensor(counts, dtype=torch.float64))
    expected = statistics(np.repeat(x, counts, axis=0))
    np.testing.assert_allclose(mu.numpy(), expected[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigma.numpy(), expected[1], rtol=1e-12, atol=1e-15)
    # the reference side rooted once gives the distance of the checked routes
    ref = statistics(rng.normal(size=(50, 3)) + 0.5)
    fixed = FixedReference(*ref, CPU)
    assert fixed.distance(mu, sigma) == pytest.approx(frechet_distance(*expected, *ref), rel=1e-9)


def test_the_bootstrap_interval_covers_the_fid_of_a_new_sample_95_percent_of_the_time():
    """Gaussian features (4 dimensions) against a fixed reference N(0, I): the FID of n = 400
    images moves from sample to sample; simulated 2,000 times once, its median is the number a new
    sample's FID scatters around. The bootstrap's 95% interval of one sample should contain it in
    about 95% of 200 samples (binomial sd 1.5%: 88% to 100% is a 4.5 sd band)."""
    rng = np.random.default_rng(1)
    d, n = 4, 400
    scale = np.diag([1.5, 1.0, 0.8, 0.6])
    shift = np.array([0.3, 0.0, -0.2, 0.1])
    reference = {"fid": (np.zeros(d), np.eye(d)), "sfid": (np.zeros(d), np.eye(d))}

    def draw():
        return rng.normal(size=(n, d)) @ scale + shift

    many = [frechet_distance(*statistics(draw()), np.zeros(d), np.eye(d)) for _ in range(2000)]
    centre = float(np.median(many))
    inside = 0
    for i in range(200):
        x = draw()
        fake = {"pool": x, "spatial": x, "logits": np.zeros((n, 3))}
        low, high = bootstrap(fake, reference, 200, seed=i, device=CPU)["fid"]["interval"]
        inside += low <= centre <= high
    assert 176 <= inside <= 200, inside


def test_the_fid_alone_is_the_fid_of_the_full_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4))
    fake = {"pool": x, "spatial": x, "logits": rng.normal(size=(50, 3))}
    reference = {"fid": (np.zeros(4), np.eye(4)), "sfid": (np.zeros(4), np.eye(4))}
    alone = bootstrap(fake, reference, 5, seed=0, device=CPU, numbers=("fid",))
    assert alone.keys() == {"fid"}
    assert alone["fid"] == bootstrap(fake, reference, 5, seed=0, device=CPU)["fid"]


def test_noise_of_a_mean_and_the_verdict():
    # the larger measure of one set's noise, over the square root of the sets
    assert noise_of_mean(0.3, 0.4, 4) == pytest.approx(0.2)
    assert noise_of_mean(0.3, None, 1) == 0.3
    assert beyond_noise(30.0, 0.2, 29.0, 0.2)  # 1.0 > 1.96 x 0.28
    assert not beyond_noise(30.0, 0.4, 29.4, 0.4)  # 0.6 < 1.96 x 0.57


def test_the_noise_benchmark_smoke_run_prints_both_routes_and_a_resample():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "bench/noise.py", "--smoke"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ADM's sqrtm" in run.stdout and "one bootstrap resample" in run.stdout, run.stdout
