"""Sampling a SiT with a class token (REG): the latent and the token as one state.

REG's sampler denoises the class token with the latent: the same steps at the same times, noise of
its own, guidance on both. Laid side by side in one vector per sample, [latent; token], the two
run through every sampler here and through classifier-free guidance unchanged: their updates act
on each value alone, so the layout of the state does not matter to them. The token is dropped at
the end (the images come from the latent alone).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Joint(nn.Module):
    """A velocity network on flat states [latent; class token] of ``width`` values."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes, self.in_channels = net.num_classes, net.in_channels
        self.latent = (net.in_channels, net.input_size, net.input_size)
        self.width = math.prod(self.latent) + net.cls_dim

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, cls = self.split(z)
        v, cls_v = self.net(x, t, y, cls=cls)
        return torch.cat([v.flatten(1), cls_v.to(v.dtype)], dim=1)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (N, C, H, W), class tokens (N, cls_dim)) of flat states."""
        n = math.prod(self.latent)
        return z[:, :n].reshape(-1, *self.latent), z[:, n:]
