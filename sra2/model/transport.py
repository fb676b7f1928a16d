"""The linear interpolant with velocity prediction, in SiT's time convention.

The one convention used everywhere in sra2: t = 0 is pure noise and t = 1 is data,
    x_t = t * x1 + (1 - t) * x0,   x1 = data latent, x0 ~ N(0, I),   target u = x1 - x0.
REPA writes the same path in reversed time s = 1 - t (x_s = (1 - s) x1 + s eps, target eps - x1),
so a REPA velocity is minus ours at s = 1 - t; :func:`from_repa_time` converts.
"""

from __future__ import annotations

import torch


def interpolate(x0: torch.Tensor, x1: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u) for noise x0, data x1 and per-sample times t."""
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    return tt * x1 + (1 - tt) * x0, x1 - x0


def from_repa_time(s: torch.Tensor,
                   repa_velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REPA's (time, velocity) to ours."""
    return 1 - s, -repa_velocity
