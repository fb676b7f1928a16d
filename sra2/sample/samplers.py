"""Samplers in SiT time (0 = noise, 1 = data) driven by a velocity field ``v(x, t)``.

The SDE Euler-Maruyama sampler is the paper's evaluation sampler: with diffusion w(t) = 1 - t and
score s = (t v - x) / (1 - t), the drift is f = v + w s; ``steps`` network evaluations cover
linspace(0, 1 - last_step, steps) with steps - 1 stochastic steps and one final deterministic
step of size ``last_step`` to t = 1. Noise comes only from the generator(s) passed in: one
``torch.Generator`` for the batch, or one per row so that a sample depends on its own seed only
(:func:`derived_seed`, which also seeds each training step).
Networks trained in REPA's reversed time reach these functions already turned into SiT-time
velocity networks (``sra2.model.sit.ReversedTime``), so nothing here knows about REPA time.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator]


def derived_seed(seed: int, index: int) -> int:
    """The seed of unit ``index`` (a sample, a training step) of a run seeded ``seed``: it depends
    on the two alone, not on batch size, process count or restarts."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def randn(shape: Sequence[int], generator: Generators,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise; with a sequence of generators, row i comes from generator i."""
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(device)


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """f = v + w(t) * score with w(t) = 1 - t and score = (t v - x) / (1 - t)."""
    w = 1.0 - t
    score = (t * v - x) / (1.0 - t)
    return v + w * score


@torch.no_grad()
def sde_euler_maruyama(velocity: Velocity, x: torch.Tensor, generator: Generators,
                       steps: int = 250, last_step: float = 0.04) -> torch.Tensor:
    ts = torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        mean = x + sde_drift(velocity(x, t), x, t) * dt
        x = mean + (2.0 * (1.0 - t) * dt) ** 0.5 * randn(x.shape, generator, x.device).to(x.dtype)
    t = ts[-1]
    return x + sde_drift(velocity(x, t), x, t) * last_step


@torch.no_grad()
def ode_euler(velocity: Velocity, x: torch.Tensor, steps: int = 50) -> torch.Tensor:
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + velocity(x, t) * (t_next - t)
    return x


@torch.no_grad()
def ode_heun(velocity: Velocity, x: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Heun's second-order method: 2 evaluations per step."""
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        v = velocity(x, t)
        v_next = velocity(x + v * dt, t_next)
        x = x + 0.5 * (v + v_next) * dt
    return x


def sample(kind: str, velocity: Velocity, x: torch.Tensor, generator: Generators, steps: int,
           last_step: float = 0.04) -> torch.Tensor:
    if kind == "sde":
        return sde_euler_maruyama(velocity, x, generator, steps, last_step)
    if kind == "ode-euler":
        return ode_euler(velocity, x, steps)
    if kind == "ode-heun":
        return ode_heun(velocity, x, steps)
    raise ValueError(f"sample.sampler must be sde, ode-euler or ode-heun, got {kind!r}")


def guided_velocity(model: torch.nn.Module, y: torch.Tensor, scale: float = 1.0,
                    channels: int | None = None, interval: Sequence[float] = (0.0, 1.0),
                    tokens: bool = False, null: torch.Tensor | None = None) -> Velocity:
    """Classifier-free guidance: v = v_u + scale (v_c - v_u) on the first ``channels`` channels
    (None: all), for t inside ``interval``; elsewhere, or with scale 1, one conditional batch.
    The unconditional half takes ``null``: the null class where None (labels ``y``), the empty
    caption's contexts for caption contexts ``y``. With ``tokens`` the velocity of a token set,
    ``velocity(patches, t, pos)`` (``model.tokens``: channels last), both halves on the same
    tokens."""
    null = torch.full_like(y, model.num_classes) if null is None else null
    low, high = interval
    call, axis = (model.tokens, -1) if tokens else (model, 1)

    def velocity(x: torch.Tensor, t: float, *extra: torch.Tensor) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if scale == 1.0 or not low <= t <= high:
            return call(x, tt, y, *extra)
        v_c, v_u = call(*(torch.cat([a, a]) for a in (x, tt)), torch.cat([y, null]),
                        *(torch.cat([a, a]) for a in extra)).chunk(2)
        c = v_c.shape[axis] if channels is None else channels
        guided = v_u.narrow(axis, 0, c) + scale * (v_c.narrow(axis, 0, c) - v_u.narrow(axis, 0, c))
        return torch.cat([guided, v_c.narrow(axis, c, v_c.shape[axis] - c)], dim=axis)

    return velocity
