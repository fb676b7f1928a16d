"""The SD-VAE: load it (hub id, local directory, or seeded random weights), encode, decode; and
the demo's small VAE, trained on the demo images so that its decoded samples show shapes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sra2.runtime import atomic
from sra2.config.params import VAE, DemoVAE
from sra2.data.images import to_model_range


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


@torch.no_grad()
def round_trip(vae: torch.nn.Module, images: np.ndarray,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``images`` (uint8 NHWC) through ``vae`` in batches: the posterior means and stds (unscaled,
    on the CPU) and the decoded means (uint8 NHWC)."""
    device = next(vae.parameters()).device
    means, stds, back = [], [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(to_model_range(images[start:start + batch_size])).to(device)
        mean, std = encode(vae, x)
        means.append(mean.cpu())
        stds.append(std.cpu())
        back.append(decode(vae, mean, 1.0).cpu().numpy())
    return torch.cat(means), torch.cat(stds), np.concatenate(back)


def reconstruction_grid(vae: torch.nn.Module, images: np.ndarray, columns: int = 8,
                        batch_size: int = 16) -> np.ndarray:
    """Real images (uint8 NHWC) in one row and what ``vae`` gives back for them (the decoded
    posterior mean) in the row below, ``columns`` per row: one uint8 HWC picture that shows
    how much of a decoded sample's look is the VAE's own."""
    back = round_trip(vae, images, batch_size)[2]
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    canvas = np.full((2 * rows * h, columns * w, c), 255, np.uint8)  # white where a row is short
    for i in range(n):
        top, left = 2 * (i // columns) * h, (i % columns) * w
        canvas[top:top + h, left:left + w] = images[i]
        canvas[top + h:top + 2 * h, left:left + w] = back[i]
    return canvas


# --- the demo's VAE: the AutoencoderKL of vae.random trained on the demo images ------------------

TRAINING_INFO = "training.json"  # beside the weights: how the demo's VAE was made


def _random_crops(x: torch.Tensor, side: int, step: int, g: torch.Generator) -> torch.Tensor:
    """One ``side`` square per image at a random offset on the ``step`` grid, so that the crops
    meet the downsampling in the same phase as the whole image does."""
    n, _, h, w = x.shape
    rows = torch.randint(0, (h - side) // step + 1, (n,), generator=g) * step
    cols = torch.randint(0, (w - side) // step + 1, (n,), generator=g) * step
    return torch.stack([img[:, r:r + side, c:c + side]
                        for img, r, c in zip(x, rows.tolist(), cols.tolist())])


def _training_batch(x: torch.Tensor, step: int, knobs: DemoVAE, down: int,
                    g: torch.Generator) -> torch.Tensor:
    """Random crops, or in the last ``knobs.whole_steps`` steps whole images, as many pixels."""
    if step < knobs.steps - knobs.whole_steps:
        picked = torch.randint(len(x), (knobs.batch_size,), generator=g)
        return _random_crops(x[picked], knobs.crop, down, g)
    whole = max(1, knobs.batch_size * knobs.crop ** 2 // (x.shape[2] * x.shape[3]))
    return x[torch.randint(len(x), (whole,), generator=g)]


def _vae_loss(vae: torch.nn.Module, x: torch.Tensor, kl_weight: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of the decoded posterior sample (per pixel value) + kl_weight x KL to N(0, 1)
    (per latent value); returns the loss and the squared error."""
    posterior = vae.encode(x).latent_dist
    error = (vae.decode(posterior.sample(generator=g)).sample - x).square().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # kl() sums over each latent
    return error + kl_weight * kl, error


def _cosine_with_warmup(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: a short linear warm-up (Adam's first steps are large), then a cosine
    to zero, which ends a short run sharper than a constant rate."""
    warmup = max(1, steps // 20)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))


def train_demo_vae(images: np.ndarray, cfg: VAE, knobs: DemoVAE,
                   progress: Callable[[int, int, float], None] | None = None) -> torch.nn.Module:
    """The AutoencoderKL of ``cfg.random``, from its seeded weights, trained on ``images`` (uint8
    NHWC) with ``knobs``; on the CPU, the same bytes for the same arguments on one machine.
    ``progress(step, steps, squared_error)`` is called after every step."""
    vae = build_random_vae(cfg).train().requires_grad_(True)
    down = downsampling(vae)
    if knobs.crop % down or knobs.crop > min(images.shape[1:3]):
        raise ValueError(f"data.demo.vae.crop ({knobs.crop}) must be a multiple of the VAE's "
                         f"downsampling ({down}) and at most the image side {images.shape[1]}")
    x = torch.from_numpy(to_model_range(images))
    # batches, crops and posterior noise; a stream apart from the one the weights came from
    g = torch.Generator().manual_seed(cfg.random.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=knobs.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(knobs.steps))
    for step in range(knobs.steps):
        batch = _training_batch(x, step, knobs, down, g)
        loss, error = _vae_loss(vae, batch, knobs.kl_weight, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"demo VAE training: loss {loss.item()} at step {step}; "
                                     "lower data.demo.vae.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, knobs.steps, error.item())
    return vae.eval().requires_grad_(False)


def latent_statistics(vae: torch.nn.Module, images: np.ndarray,
                      batch_size: int = 50) -> dict[str, float]:
    """How ``vae`` does on ``images`` (uint8 NHWC): error of the decoded posterior mean in grey
    levels (mean absolute, PSNR), and the unscaled latents' spread: ``latent_std`` of the
    posterior samples (what the SiT learns, times vae.scale: 1 / latent_std makes it unit),
    ``mean_std`` of the means and ``posterior_std``, the mean std of one posterior."""
    mean, std, back = round_trip(vae, images, batch_size)
    mean, std = mean.double(), std.double()
    diff = back.astype(np.float64) - images
    # samples mean + std * eps: their variance is that of the means plus the mean variance of eps
    latent_std = math.sqrt(mean.var().item() + std.square().mean().item())
    return {"l1_grey_levels": float(np.abs(diff).mean()),
            "psnr_db": float(10 * np.log10(255.0 ** 2 / np.square(diff).mean())),
            "latent_std": latent_std, "mean_std": mean.std().item(),
            "posterior_std": std.mean().item(), "suggested_scale": 1.0 / latent_std}


def save_trained_vae(vae: torch.nn.Module, folder: str | Path, scale: float, info: dict) -> None:
    """``vae`` in diffusers' layout (what load_vae reads), ``scale`` recorded as its
    scaling_factor (as SD-VAE's config records 0.18215; the pipeline reads vae.scale), ``info``
    as training.json beside it; written under a temporary name and renamed, so ``folder`` is
    complete or absent."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(tmp)
    atomic.write_json(tmp / TRAINING_INFO, info)
    for f in tmp.iterdir():  # on disk before the rename; safetensors writes 0600, open() would not
        os.chmod(f, atomic.FILE_MODE)
        with open(f, "rb") as opened:
            os.fsync(opened.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
