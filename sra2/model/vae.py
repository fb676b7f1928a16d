"""The SD-VAE: load it (hub id, local directory, or seeded random weights), encode, decode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sra2.config.params import VAE

TRAINING_INFO = "training.json"  # beside the weights: how a trained VAE was made (sra2.data.demo)

# SD-VAE's architecture (stabilityai/sd-vae-ft-ema) as a vae.random shape: FLOP counts and
# benchmarks build it with seeded weights
SD_VAE_SHAPE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                "norm_num_groups": 32, "seed": 0}


def build_random_vae(cfg: VAE) -> torch.nn.Module:
    """An AutoencoderKL of the configured shape with weights drawn from ``cfg.random.seed``."""
    from diffusers import AutoencoderKL

    shape = cfg.random
    n = len(shape.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(shape.block_out_channels),
            layers_per_block=shape.layers_per_block, norm_num_groups=shape.norm_num_groups,
            scaling_factor=cfg.scale,
        )


def load_vae(cfg: VAE, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The VAE in eval mode; ``cfg.source`` is a hub id, a local directory or ``"random"``."""
    if cfg.source == "random":
        vae = build_random_vae(cfg)
    else:
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(cfg.source)
        except (OSError, ValueError) as e:
            hint = ("Without internet, download it elsewhere and set vae.source to the local "
                    "directory. The demo's VAE is written there by the demo-data stage "
                    "(data.demo.vae).")
            raise RuntimeError(f"cannot load the VAE from vae.source={cfg.source!r}: {e}\n"
                               f"{hint}") from None
    return vae.to(device).eval().requires_grad_(False)


def is_random(cfg: VAE) -> bool:
    return cfg.source == "random"


def downsampling(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (NCHW) -> posterior mean and std (unscaled), in fp32."""
    posterior = vae.encode(images).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> uint8 NHWC images, rounding as the ADM evaluator expects."""
    x = vae.decode(latents / scale).sample.float()
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def weights_digest(cfg: VAE) -> str | None:
    """sha256 of the weight files of a local ``vae.source`` directory (None for random weights
    and hub ids, which their config names): tells a retrained demo VAE from the one before it,
    though its path is the same."""
    folder = Path(cfg.source)
    if is_random(cfg) or not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def describe(cfg: VAE) -> str:
    """What the weights of ``cfg`` are, in words for captions."""
    if is_random(cfg):
        return f"random-weight VAE (seed {cfg.random.seed})"
    info = Path(cfg.source) / TRAINING_INFO
    if info.is_file():
        return json.loads(info.read_text())["description"]
    return f"VAE {cfg.source}"
