"""FLOP counts of networks, and the GPUs' peaks they are held against.

FLOPs are measured, not derived: one forward pass per image (batch 1) under
``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix products (linear layers,
the patch convolution and attention) and counts a multiply-add as 2 FLOPs. The papers' "GFLOPs"
for DiT/SiT are multiply-adds (GMACs), i.e. half of these numbers. Element-wise work (norms,
activations, softmax) is not counted, as in the papers. Networks are built on the meta device
where that works, so even SiT-XL/2 costs no memory and no time to count. What a training image
costs, all methods included, is :mod:`sra2.train.cost`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sra2.config.params import Config

# dense bf16 tensor-core peak per GPU, TFLOP/s (the vendors' figures without sparsity)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn(*args)
    return int(counter.get_total_flops())


def token_flops(model: nn.Module, tokens: int) -> int:
    """FLOPs of one velocity evaluation of ``tokens`` tokens of one image (``SiT.tokens``: any
    set of tokens, as the RALU sampler gives it), on the model's device (meta counts too)."""
    param = next(model.parameters())
    like = {"dtype": param.dtype, "device": param.device}
    patches = torch.zeros(1, tokens, model.patch_size ** 2, model.in_channels, **like)
    pos = torch.zeros(1, tokens, model.hidden_size, **like)
    y = torch.zeros(1, dtype=torch.long, device=param.device)
    return count_flops(model.tokens, patches, torch.zeros(1, **like), y, pos)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), if known."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def vae_flops(cfg: Config) -> tuple[int, int]:
    """FLOPs of the VAE's encoder on one image of ``data.image_size`` and of its decoder on one
    latent: the shape of ``vae.random`` where set, else SD-VAE's (which no config spells out)."""
    from sra2.config.params import VAE
    from sra2.model.vae import SD_VAE_SHAPE, build_random_vae

    shape = cfg.vae.random or SD_VAE_SHAPE
    vae_cfg = VAE(source="random", random=shape, scale=cfg.vae.scale)
    side = cfg.data.image_size
    with torch.device("meta"):
        vae = build_random_vae(vae_cfg)
        x = torch.zeros(1, 3, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return int(counter.get_total_flops()), count_flops(lambda v: vae.decode(v).sample, z)
