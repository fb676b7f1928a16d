"""Samplers (SiT's SDE and ODE) and classifier-free guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sra2.model.sit import build
from sra2.sample.samplers import guided_velocity, randn, sample, sde_drift, sde_euler_maruyama

from conftest import randomize

M, S = 1.5, 0.5  # data distribution N(M, S^2) per dimension
N = 20_000       # scalar samples


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact velocity E[x1 - x0 | x_t = x] for x1 ~ N(M, S^2), x0 ~ N(0, 1):
    x_t ~ N(t M, t^2 S^2 + (1 - t)^2) and Cov(x1 - x0, x_t) = t S^2 - (1 - t)."""
    gain = (t * S * S - (1 - t)) / (t * t * S * S + (1 - t) ** 2)
    return M + gain * (x - t * M)


def noise(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# Tolerances: 4 standard errors of the estimates (mean: S/sqrt(N) = 0.0035, std: S/sqrt(2N) =
# 0.0025) plus the bias of the discretised scheme itself. For this linear-Gaussian problem the
# scheme's output law can be propagated exactly (x -> a x + b + sigma eps per step): the 250-step
# Euler-Maruyama with the noise-free last step of 0.04 ends at mean 1.5000, std 0.4943 (1.1% low,
# mostly because the last step applies the SDE drift without its noise); 50 Heun steps end at
# mean 1.5000, std 0.50009; 250 plain Euler steps end at std 0.4971. Hence the allowances below.
MEAN_TOL = 4 * S / math.sqrt(N) + 0.002
STD_TOL_SDE = 4 * S / math.sqrt(2 * N) + 0.008
STD_TOL_ODE = 4 * S / math.sqrt(2 * N) + 0.001


def test_sde_recovers_the_gaussian_data_distribution():
    out = sde_euler_maruyama(gaussian_velocity, noise(0), torch.Generator().manual_seed(1),
                             steps=250, last_step=0.04)
    assert abs(out.mean().item() - M) < MEAN_TOL
    assert abs(out.std().item() - S) < STD_TOL_SDE


@pytest.mark.parametrize("kind, steps, std_tol", [("ode-heun", 50, STD_TOL_ODE),
                                                  ("ode-euler", 250, STD_TOL_SDE)])
def test_ode_recovers_the_gaussian_data_distribution(kind, steps, std_tol):
    x0 = noise(2)
    out = sample(kind, gaussian_velocity, x0, torch.Generator(), steps)
    assert abs(out.mean().item() - M) < MEAN_TOL
    assert abs(out.std().item() - S) < std_tol
    # the ODE is a deterministic, monotone transport: sample i maps to M + S * z_i up to the
    # discretisation (Heun is second order, so 50 steps are already very accurate)
    err = (out - (M + S * x0)).abs().max().item()
    assert err < (1e-3 if kind == "ode-heun" else 2e-2)


def test_an_untrained_model_is_no_better_than_noise():
    # sanity check of the tolerances above: the zero velocity leaves N(0, 1) in place
    out = sde_euler_maruyama(lambda x, t: torch.zeros_like(x), noise(0),
                             torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - M) > 10 * MEAN_TOL


def test_sde_drift_formula():
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(5, generator=g), torch.randn(5, generator=g)
    for t in (0.0, 0.3, 0.96):
        torch.testing.assert_close(sde_drift(v, x, t), (1 + t) * v - x)


class Recorder:
    """A velocity function that remembers every (x, t) it was called with."""

    def __init__(self):
        self.xs: list[torch.Tensor] = []
        self.ts: list[float] = []

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.xs.append(x.clone())
        self.ts.append(t)
        return gaussian_velocity(x, t)


def test_sde_time_grid_noise_draws_and_last_step():
    steps, last = 250, 0.04
    shape = (64,)
    rec = Recorder()
    g = torch.Generator().manual_seed(7)
    x_init = noise(3, 64)
    out = sde_euler_maruyama(rec, x_init, g, steps=steps, last_step=last)

    # exactly `steps` evaluations, at linspace(0, 0.96, 250); the last one at 0.96
    assert len(rec.ts) == steps
    np.testing.assert_allclose(rec.ts, np.linspace(0.0, 1.0 - last, steps), rtol=0, atol=1e-12)
    assert rec.ts[-1] == pytest.approx(0.96, abs=1e-12)

    # every stochastic step by hand: x' = x + f dt + sqrt(2 (1 - t) dt) eps, eps from the same
    # stream
    replay = torch.Generator().manual_seed(7)
    for k in range(steps - 1):
        t, dt = rec.ts[k], rec.ts[k + 1] - rec.ts[k]
        x = rec.xs[k]
        eps = torch.randn(shape, generator=replay).double()
        expected = (x + ((1 + t) * gaussian_velocity(x, t) - x) * dt
                    + math.sqrt(2 * (1 - t) * dt) * eps)
        torch.testing.assert_close(rec.xs[k + 1], expected, rtol=1e-10, atol=1e-10)

    # the final step from 0.96 to 1 is the deterministic drift step, no noise ...
    x = rec.xs[-1]
    torch.testing.assert_close(out, x + ((1 + 0.96) * gaussian_velocity(x, 0.96) - x) * last,
                               rtol=1e-12, atol=1e-12)
    # ... and exactly steps - 1 noise draws were taken from the generator
    assert torch.equal(g.get_state(), replay.get_state())
    assert (out - x_init).abs().max() > 0.5 and rec.xs[0].equal(x_init)


def test_same_seed_same_samples():
    model = randomized_micro()
    y = torch.tensor([3, 7])
    velocity = guided_velocity(model, y)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        x = randn((2, 4, 16, 16), g)
        runs.append(sde_euler_maruyama(velocity, x, g, steps=8))
    assert torch.equal(runs[0], runs[1])
    g = torch.Generator().manual_seed(12)
    assert not torch.equal(runs[0],
                           sde_euler_maruyama(velocity, randn((2, 4, 16, 16), g), g, steps=8))


def test_per_row_generators_make_each_sample_depend_on_its_own_seed_only():
    model = randomized_micro()

    def run(seeds, labels):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = randn((len(seeds), 4, 16, 16), gens)
        return sde_euler_maruyama(guided_velocity(model, torch.tensor(labels)), x, gens, steps=8)

    together = run([100, 200], [3, 7])
    alone_a, alone_b = run([100], [3]), run([200], [7])
    torch.testing.assert_close(together[0], alone_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together[1], alone_b[0], rtol=0, atol=1e-5)
    other = run([100, 999], [3, 7])  # changing row b's seed leaves row a alone
    torch.testing.assert_close(other[0], together[0], rtol=0, atol=1e-5)
    assert (other[1] - together[1]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------- CFG

def randomized_micro(num_classes: int = 10) -> nn.Module:
    model = build("SiT-Micro/2", input_size=16, num_classes=num_classes, learn_sigma=False)
    return randomize(model)


class BatchCounter(nn.Module):
    """Runs the real model and records the batch size of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def cfg_inputs(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, 16, 16, generator=g), torch.tensor([1, 4, 9][:n])


def test_cfg_scale_one_is_the_conditional_model():
    model = BatchCounter(randomized_micro())
    x, y = cfg_inputs()
    with torch.no_grad():
        v = guided_velocity(model, y, scale=1.0, channels=3)(x, 0.5)
        expected = model.model(x, torch.full((3,), 0.5), y)
    assert torch.equal(v, expected)
    assert model.batches == [3]  # one batch, no unconditional pass


@pytest.mark.parametrize("channels", [3, None])
def test_cfg_formula(channels):
    model = BatchCounter(randomized_micro())
    x, y = cfg_inputs()
    scale, t = 4.0, 0.5
    with torch.no_grad():
        v = guided_velocity(model, y, scale=scale, channels=channels)(x, t)
        # the reference runs the same batch of 2N: a batch of N may round differently (another
        # GEMM blocking, e.g. with AVX-512), and the formula amplifies that by 2 * scale + 1
        tt = torch.full((6,), t)
        v_c, v_u = model.model(torch.cat([x, x]), tt,
                               torch.cat([y, torch.full_like(y, 10)])).chunk(2)
    c = 4 if channels is None else channels
    assert torch.equal(v[:, :c], v_u[:, :c] + scale * (v_c[:, :c] - v_u[:, :c]))
    assert torch.equal(v[:, c:], v_c[:, c:])
    assert (v_c - v_u).abs().max() > 1e-2  # the label matters, so the check is not vacuous
    assert model.batches[0] == 6  # conditional and unconditional in one batch of 2N


def test_cfg_interval_runs_one_batch_outside():
    model = BatchCounter(randomized_micro())
    x, y = cfg_inputs()
    velocity = guided_velocity(model, y, scale=1.8, channels=None, interval=(0.3, 1.0))
    with torch.no_grad():
        outside = velocity(x, 0.1)
        expected = model.model(x, torch.full((3,), 0.1), y)
    assert torch.equal(outside, expected)
    assert model.batches == [3]
    model.batches.clear()
    with torch.no_grad():
        velocity(x, 0.7)
    assert model.batches == [6]

    # a whole SDE run: linspace(0, 0.96, 10) has 3 points below 0.3 (0, 0.107, 0.213)
    model.batches.clear()
    g = torch.Generator().manual_seed(0)
    sde_euler_maruyama(velocity, x, g, steps=10)
    assert model.batches == [3] * 3 + [6] * 7
