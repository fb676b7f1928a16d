"""The linear interpolant with velocity prediction, in SiT's time convention.

The one convention used everywhere in sra2: t = 0 is pure noise and t = 1 is data,
    x_t = t * x1 + (1 - t) * x0,   x1 = data latent, x0 ~ N(0, I),   target u = x1 - x0.
REPA writes the same path in reversed time s = 1 - t (x_s = (1 - s) x1 + s eps, target eps - x1),
so a REPA velocity is minus ours at s = 1 - t; :func:`from_repa_time` converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sra2.align import sra2_loss
from sra2.config import Align


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u) for noise x0, data x1 and per-sample times t."""
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    return tt * x1 + (1 - tt) * x0, x1 - x0


def from_repa_time(s: torch.Tensor, repa_velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REPA's (time, velocity) to ours."""
    return 1 - s, -repa_velocity


@dataclass
class Losses:
    total: torch.Tensor
    velocity: torch.Tensor
    align: torch.Tensor


def training_loss(model: nn.Module, projector: nn.Module | None, align: Align, x1: torch.Tensor,
                  y: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                  align_target: torch.Tensor | None = None) -> Losses:
    """L = mean over C,H,W and batch of (v - u)^2 + lambda * L_align.

    ``align_target`` defaults to ``x1``, the latent used as the diffusion target in this step.
    """
    xt, u = interpolate(x0, x1, t)
    if projector is None:
        v, hidden = model(xt, t, y), None
    else:
        v, hidden = model(xt, t, y, return_hidden=align.layer)
    velocity = (v.float() - u.float()).square().flatten(1).mean(1).mean()
    if projector is None:
        return Losses(velocity, velocity, velocity.new_zeros(()))
    target = x1 if align_target is None else align_target
    patch = getattr(model, "module", model).patch_size
    aligned = sra2_loss(projector, hidden, target, t, align, patch)
    return Losses(velocity + align.weight * aligned, velocity, aligned)
