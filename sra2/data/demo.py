"""The demo: a class-labelled ImageFolder of drawn shapes (JPEG files, the same bytes for the
same arguments), and the small VAE trained on it so that its decoded samples show shapes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from sra2.config.params import VAE, DemoVAE
from sra2.data.images import DataError, to_model_range
from sra2.model.vae import TRAINING_INFO, build_random_vae, decode, downsampling, encode
from sra2.runtime import atomic

_SHAPES = ("disc", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross",
           "gradient", "dots")


def draw(kind: str, w: int, h: int, rng: np.random.Generator, bg: tuple | None = None,
         fg: tuple | None = None) -> Image.Image:
    """One picture of ``kind`` on a ``bg`` field in ``fg`` (colours drawn where not given)."""
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    img = Image.new("RGB", (w, h), bg or colour())
    d = ImageDraw.Draw(img)
    s = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    r = s * rng.uniform(0.2, 0.4)
    fg = fg or colour()
    period = max(2, int(s * rng.uniform(0.05, 0.15)))
    if kind == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "hstripes":
        for y in range(0, h, 2 * period):
            d.rectangle([0, y, w, y + period - 1], fill=fg)
    elif kind == "vstripes":
        for x in range(0, w, 2 * period):
            d.rectangle([x, 0, x + period - 1, h], fill=fg)
    elif kind == "checker":
        for y in range(0, h, period):
            for x in range((y // period) % 2 * period, w, 2 * period):
                d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif kind == "cross":
        t = max(2, int(r / 3))
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif kind == "gradient":
        ramp = np.linspace(0.0, 1.0, w)[None, :, None]
        a, b = np.array(colour(), float), np.array(fg, float)
        img = Image.fromarray((a + (b - a) * ramp).repeat(h, 0).astype(np.uint8))
    elif kind == "dots":
        for _ in range(int(rng.integers(5, 15))):
            x, y, q = rng.uniform(0, w), rng.uniform(0, h), s * rng.uniform(0.04, 0.1)
            d.ellipse([x - q, y - q, x + q, y + q], fill=fg)
    return img


def write_demo_dataset(root: str | Path, classes: int, per_class: int, min_side: int,
                       max_side: int, seed: int) -> int:
    """Write a class-labelled ImageFolder of JPEGs, the same bytes for the same arguments."""
    if not 1 <= classes <= len(_SHAPES):
        raise DataError(f"data.demo.classes must be between 1 and {len(_SHAPES)}, got {classes}")
    root = Path(root)
    width = int(math.log10(per_class)) + 1
    for c in range(classes):
        folder = root / f"c{c:02d}_{_SHAPES[c]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, c, i])
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            draw(_SHAPES[c], w, h, rng).save(folder / f"img{i:0{width}d}.JPEG", quality=90)
    return classes * per_class


# --- the demo's VAE: the AutoencoderKL of vae.random trained on the demo images ------------------


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
    vae.register_to_config(scaling_factor=scale)
    with atomic.temporary_folder(folder) as tmp:
        vae.save_pretrained(tmp)
        atomic.write_json(tmp / TRAINING_INFO, info)
