"""The SD-VAE: load it (hub id, local directory, or seeded random weights), encode, decode."""

from __future__ import annotations

import torch

from sra2.config import VAE


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
            raise RuntimeError(
                f"cannot load the VAE from vae.source={cfg.source!r}: {e}\nWithout internet, "
                "download it elsewhere and set vae.source to the local directory.") from None
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
