"""What storing the VAE posterior (mean, std) in 16 bits instead of float32 changes.

Real photographs from scikit-image are ADM-cropped and encoded once in float32; the posterior is
rounded through float16 (numpy, what ``encode.dtype: float16`` stores) and bfloat16 (torch, for
comparison). A last row runs the encoder under bfloat16 autocast (what ``encode.precision: bf16``
does on a GPU) and stores float32, to set storage against compute precision. For each row the
script reports the latent error, decodes both a training sample ``(mean + std * eps) * scale``
(one fixed eps) and the mean alone, and compares the uint8 images with the float32 path: max and
mean absolute error in grey levels, PSNR in dB.

The VAE weights are RANDOM (seeded) unless ``--vae`` points at a real local diffusers directory
(e.g. a downloaded ``stabilityai/sd-vae-ft-ema``): a random VAE has the right architecture and
number formats, but not the trained latents and decoder, so its figures only give the order of
magnitude. By default the demo preset's small VAE runs at 64x64, quick on a CPU; ``--vae
random-sd`` is the SD-VAE architecture at 256x256 (slow on a CPU: use a GPU or ``--images 2``).

    python bench/latent_precision.py
    python bench/latent_precision.py --vae random-sd --images 2
    python bench/latent_precision.py --vae /path/to/sd-vae-ft-ema
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench.encode import vae_section
from sra2.config.params import resolve
from sra2.data.images import center_crop_arr, to_model_range
from sra2.model import vae as vae_lib
from sra2.runtime import dist

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle")
STORAGES = ("float32", "float16", "bfloat16")
BF16_ENCODER = "f32, bf16 enc"  # float32 storage of an encoder run under bf16 autocast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo",
                   help="preset whose VAE and image size are used (default: demo)")
    p.add_argument("--vae", default=None,
                   help="'random-sd' for the SD-VAE architecture with seeded random weights, or a "
                        "local diffusers VAE directory; default: the preset's VAE")
    p.add_argument("--size", type=int, default=None,
                   help="crop size; default: 256 with --vae, else the preset's data.image_size")
    p.add_argument("--images", type=int, default=len(PHOTOS),
                   help=f"photographs to use, at most {len(PHOTOS)} (default: {len(PHOTOS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed eps (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the VAE runs (default: auto)")
    args = p.parse_args(argv)
    if not 1 <= args.images <= len(PHOTOS):
        p.error(f"--images must be between 1 and {len(PHOTOS)}")
    return args


def photographs(count: int, size: int) -> np.ndarray:
    """uint8 NHWC crops of scikit-image's bundled colour photographs."""
    from skimage import data

    crops = []
    for name in PHOTOS[:count]:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pair: the left view
        crops.append(center_crop_arr(Image.fromarray(image), size))
    return np.stack(crops)


def round_trip(x: torch.Tensor, storage: str) -> torch.Tensor:
    """``x`` as it reads back after being stored in ``storage``."""
    if storage == "float16":
        return torch.from_numpy(x.cpu().numpy().astype(np.float16).astype(np.float32)).to(x.device)
    return x.to(getattr(torch, storage)).float()


def latent_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


def image_error(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, float, float]:
    """Max and mean abs error in grey levels, PSNR (dB) and the share of differing values."""
    d = (a.int() - b.int()).abs()
    mse = d.double().pow(2).mean().item()
    psnr = 10 * math.log10(255**2 / mse) if mse else math.inf
    return d.max().item(), d.float().mean().item(), psnr, (d > 0).float().mean().item()


def bf16_encoded(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior when the encoder itself runs under bf16 autocast (encode.precision: bf16)."""
    with torch.autocast(x.device.type, torch.bfloat16):
        return vae_lib.encode(vae, x)


def decoded(vae, mean, std, eps, scale) -> dict[str, torch.Tensor]:
    return {"sample": vae_lib.decode(vae, (mean + std * eps) * scale, scale),
            "mean": vae_lib.decode(vae, mean * scale, scale)}


def print_latents(mean, std, stored) -> None:
    print(f"\nlatents (unscaled): |mean| max {mean.abs().max():.3f}, avg {mean.abs().mean():.3f}; "
          f"std from {std.min():.2e} to {std.max():.2e}")
    print(f"{'stored as':14}{'mean: max err':>15}{'mean err':>10}{'std: max err':>14}"
          f"{'mean err':>10}{'std: max rel':>14}")
    for storage, (m, s) in stored.items():
        rel = ((s - std).abs() / std).max().item()  # std > 0, and tiny in a trained VAE
        errors = (*latent_error(m, mean), *latent_error(s, std))
        print(f"{storage:14}{errors[0]:15.2e}{errors[1]:10.2e}{errors[2]:14.2e}{errors[3]:10.2e}"
              f"{rel:14.2e}")


def print_images(results: dict[str, dict[str, tuple]]) -> None:
    print("\ndecoded uint8 images against the float32 path (grey levels 0-255)")
    print(f"{'stored as':14}{'decoded':8}{'max err':>9}{'mean err':>10}{'PSNR dB':>9}"
          f"{'changed':>9}")
    for storage, by_kind in results.items():
        for kind, (mx, avg, psnr, changed) in by_kind.items():
            print(f"{storage:14}{kind:8}{mx:9d}{avg:10.4f}{psnr:9.1f}{changed:9.1%}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = resolve({"preset": args.preset, "vae": vae_section(args.vae)})
    size = args.size or (256 if args.vae else cfg.data.image_size)
    device = dist.device(args.device)
    vae = vae_lib.load_vae(cfg.vae, device)
    scale = cfg.vae.scale
    crops = photographs(args.images, size)
    kind = "random weights" if vae_lib.is_random(cfg.vae) else "weights from " + cfg.vae.source
    print(f"VAE {vae.config.block_out_channels} ({kind}), {len(crops)} photographs at "
          f"{size}x{size}, device {device}, scale {scale}")

    start = time.perf_counter()
    x = torch.from_numpy(to_model_range(crops)).to(device)
    mean, std = vae_lib.encode(vae, x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    stored = {s: (round_trip(mean, s), round_trip(std, s)) for s in STORAGES}
    stored[BF16_ENCODER] = bf16_encoded(vae, x)  # for scale: what bf16 compute alone changes
    reference = decoded(vae, mean, std, eps, scale)
    results = {}
    for storage, (m, s) in stored.items():
        images = decoded(vae, m, s, eps, scale)
        results[storage] = {k: image_error(images[k], reference[k]) for k in images}

    recon = image_error(reference["mean"].cpu(), torch.from_numpy(crops))
    print(f"for scale: the float32 decode of the mean against the input crop: max err {recon[0]}, "
          f"mean err {recon[1]:.2f}, PSNR {recon[2]:.1f} dB (the VAE's own reconstruction)")
    print_latents(mean, std, stored)
    print_images(results)
    print(f"\n({time.perf_counter() - start:.1f} s of encoding and decoding)")


if __name__ == "__main__":
    main()
