"""JPEG decode + ADM crop per core, three ways, against what one H100's SD-VAE encoder eats.

It writes, in a temporary folder, JPEG files shaped like ImageNet's train split (~380x340 px and
~100 KB on average, quality 90-95: pieces of scikit-image's photographs with luminance noise,
since the entropy decoding's cost follows the bytes), ~3% large ones (1024x768 to 3000x2000), odd
ones (grayscale, CMYK, 20x15 px, a 1200x90 strip) and the photographs themselves; 427x374 px and
133 KB on average in all. Then it crops each to 256 px on one core (``torch.set_num_threads(1)``),
the ways taking turns file by file, timed in CPU seconds of this process (a busy machine's waits
left out), by:

- (a) today's path: ``sra2.data.images.load_rgb`` + ``center_crop_arr`` (PIL);
- (b) ``torchvision.io.decode_jpeg`` on the CPU from the file's bytes, then the same crop, in PIL:
  the ADM crop is PIL's BOX and BICUBIC filters, and torch's bicubic is another kernel;
- (c) PIL's ``Image.draft`` (libjpeg's DCT scaling by 1/2, 1/4 or 1/8 while decoding) for JPEGs
  whose short side is >= 2x the crop, to the scale the ADM halvings would reach, then the crop;
- (c') the same, one scale less, so that the crop's last halving is PIL's BOX filter.

It prints images per CPU second of each (the median over rounds) and the ratio to (a), how far
each crop is from (a)'s bytes, the SD-VAE encoder's FLOPs at 256 px (counted on the meta device),
what one H100 eats at 40% MFU in the precision the paper presets encode in, and the cores
decoding then needs per GPU and per 8-GPU node.

    python bench/decode.py                         # 600 files, ~90 s here
    python bench/decode.py --smoke                 # 12 files, a few seconds (tested)
    python bench/decode.py --gpu-rate 1500         # a measured encoder rate (bench/gpu.py)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from bench.encode import SD_VAE_SHAPE
from sra2.config.params import VAE, resolve
from sra2.data.images import center_crop_arr, load_rgb
from sra2.model import flops
from sra2.model import vae as vae_lib

SIZE = 256
# an H100's dense peaks, TFLOP/s: bf16 (sra2.model.flops) and TF32, which is half of it
PEAK = {"TF32": flops.PEAK_TFLOPS["H100"] / 2, "bf16": flops.PEAK_TFLOPS["H100"]}
MFU = 0.4
GPUS = 8
LARGE = [(2000, 1500), (1500, 2000), (1600, 1200), (3000, 2000), (1024, 768)]
PATHS = {"a": "(a) PIL load_rgb + ADM crop (today)",
         "b": "(b) torchvision decode_jpeg + ADM crop",
         "c": "(c) PIL draft to the crop's scale + crop",
         "c2": "(c') PIL draft, last halving by BOX + crop"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600,
                   help="files to write, photographs and odd ones included (default: 600)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, the ways taking turns file by file (default: 3)")
    p.add_argument("--gpu-rate", type=float, default=None,
                   help="one GPU's measured SD-VAE encoder images/s (bench/gpu.py's encode row) "
                        "to size the cores by, beside the FLOP estimate")
    p.add_argument("--smoke", action="store_true", help="a handful of files, one round")
    args = p.parse_args(argv)
    if args.images < 1 or args.rounds < 1:
        p.error("--images and --rounds must be at least 1")
    return args


def _photographs() -> dict[str, np.ndarray]:
    import skimage.data as d

    return {"astronaut": d.astronaut(), "coffee": d.coffee(), "chelsea": d.chelsea(),
            "rocket": d.rocket(), "motorcycle": d.stereo_motorcycle()[0],
            "hubble": d.hubble_deep_field(), "retina": d.retina(),
            "ihc": d.immunohistochemistry()}


def _piece(photo: np.ndarray, w: int, h: int, rng: np.random.Generator,
           noise: tuple[float, float] = (30, 55)) -> Image.Image:
    """A random piece of ``photo`` at ``w`` x ``h`` with luminance noise of a std drawn from
    ``noise``: ImageNet's ~110 KB at ~400x350 px needs texture that smooth photographs scaled up
    lack (chroma noise would be mostly dropped by 4:2:0 subsampling)."""
    height, width = photo.shape[:2]
    ch = int(rng.integers(height // 3, height))
    cw = min(width, max(1, round(ch * w / h)))
    y, x = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
    im = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(im, np.float32) + rng.normal(0, rng.uniform(*noise), (h, w, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_files(folder: Path, count: int, photographs: int = 8, seed: int = 0) -> list[Path]:
    """``count`` files: the first ``photographs`` photographs, four odd ones, ~3% large ones and
    ImageNet-like ones."""
    rng = np.random.default_rng(seed)
    photos = _photographs()
    pieces = list(photos.values())
    files: list[tuple[str, Image.Image, int]] = [(f"photo-{n}", Image.fromarray(a), 95)
                                                 for n, a in list(photos.items())[:photographs]]
    odd = _piece(pieces[0], 500, 375, rng)
    files += [("gray", odd.convert("L"), 92), ("cmyk", odd.convert("CMYK"), 92),
              ("small", _piece(pieces[1], 20, 15, rng), 92),
              ("strip", _piece(pieces[2], 1200, 90, rng), 92)]
    large = max(1, round(0.03 * count))
    for i in range(large):
        w, h = LARGE[i % len(LARGE)]
        # a camera's full resolution: less texture a pixel than a downscaled ImageNet photo
        files.append((f"large-{i}", _piece(pieces[i % len(pieces)], w, h, rng, (5, 15)), 92))
    for i in range(max(0, count - len(files))):
        long = int(rng.integers(300, 501))
        short = round(long / rng.choice([4 / 3, 3 / 2, 5 / 4, 1.0]))
        w, h = (long, short) if rng.random() < 0.75 else (short, long)  # a quarter portrait
        files.append((f"typical-{i}", _piece(pieces[i % len(pieces)], w, h, rng),
                      int(rng.integers(90, 96))))
    paths = []
    for name, im, quality in files[:count]:
        paths.append(folder / f"{name}.JPEG")
        im.save(paths[-1], "JPEG", quality=quality)
    return paths


def crop_pil(path: Path) -> np.ndarray:
    return center_crop_arr(load_rgb(path), SIZE)


def crop_torchvision(path: Path) -> np.ndarray:
    chw = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return center_crop_arr(Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy()), SIZE)


def crop_draft(path: Path, spare: int = 1) -> np.ndarray:
    """Decode at 1/2, 1/4 or 1/8 scale where the short side is >= 2x the crop: to the size the ADM
    halvings reach (``spare`` 1), or twice it, leaving the last halving to PIL (``spare`` 2)."""
    with Image.open(path) as im:
        if min(im.size) >= 2 * SIZE:
            im.draft("RGB", (spare * SIZE, spare * SIZE))
        im.load()
        return center_crop_arr(im.convert("RGB"), SIZE)


CROPS = {"a": crop_pil, "b": crop_torchvision, "c": crop_draft,
         "c2": lambda path: crop_draft(path, spare=2)}


def time_rounds(paths: list[Path], rounds: int) -> dict[str, list[list[float]]]:
    """CPU seconds of this process for each crop of each file, per round: the ways take turns
    file by file, so a drift of the machine's speed touches them alike, and CPU time leaves out
    the waits where another process holds the core."""
    for crop in CROPS.values():  # warm up: imports, libjpeg's tables
        crop(paths[0])
    seconds = {k: [[0.0] * len(paths) for _ in range(rounds)] for k in CROPS}
    keys = list(CROPS)
    for r in range(rounds):
        for i, path in enumerate(paths):
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:  # each goes first in turn
                start = time.process_time()
                CROPS[key](path)
                seconds[key][r][i] = time.process_time() - start
    return seconds


def differences(paths: list[Path], key: str) -> dict[str, float]:
    """Max and mean absolute difference to (a) in grey levels, and the share of identical pixels
    (all three values equal), over ``paths``."""
    worst, total, same, pixels = 0, 0, 0, 0
    for path in paths:
        a, b = crop_pil(path).astype(np.int16), CROPS[key](path).astype(np.int16)
        d = np.abs(a - b)
        worst, total = max(worst, int(d.max())), total + int(d.sum())
        same += int((d.max(axis=2) == 0).sum())
        pixels += d.shape[0] * d.shape[1]
    return {"max": worst, "mean": total / (3 * pixels) if pixels else 0.0,
            "same": same / pixels if pixels else 1.0}


def encoder_flops() -> int:
    """FLOPs of the SD-VAE encoder (to the posterior) for one 256 px image, on the meta device."""
    cfg = VAE.model_validate({"source": "random", "random": SD_VAE_SHAPE})
    with torch.device("meta"):
        vae = vae_lib.build_random_vae(cfg).eval()
        x = torch.zeros(1, 3, SIZE, SIZE)
    return flops.count_flops(lambda im: vae.encode(im).latent_dist.mean, x)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def report(paths: list[Path], seconds: dict[str, list[list[float]]], args) -> None:
    large = [i for i, p in enumerate(paths) if min(_size(p)) >= 2 * SIZE]
    groups = {"all": range(len(paths)), "large": large,
              "rest": sorted(set(range(len(paths))) - set(large))}

    def rate(key: str, group: str) -> float:
        rows = groups[group]
        if not rows:
            return float("nan")
        return len(rows) / statistics.median(sum(r[i] for i in rows) for r in seconds[key])

    big = [paths[i] for i in large]
    diffs = {"b": differences(paths, "b"),
             **{k: differences(big, k) for k in ("c", "c2")}}
    print(f"\nimages per CPU second (median of {args.rounds} rounds); differences to (a)'s crops "
          f"in grey levels: (b) over all files, (c) over the {len(large)} large ones (short side "
          f">= {2 * SIZE}; the others are (a)'s bytes)")
    print(f"{'':44}{'all':>7}{'/ (a)':>7}{'<512':>7}{'large':>7}{'max':>5}{'mean':>7}"
          f"{'same px':>9}")
    for key, name in PATHS.items():
        d = diffs.get(key, {"max": 0, "mean": 0.0, "same": 1.0})
        print(f"{name:44}{rate(key, 'all'):7.0f}{rate(key, 'all') / rate('a', 'all'):7.2f}"
              f"{rate(key, 'rest'):7.0f}{rate(key, 'large'):7.1f}"
              f"{d['max']:5d}{d['mean']:7.3f}{d['same']:9.2%}")
    need(rate("a", "all"), args.gpu_rate)


def need(per_core: float, measured: float | None) -> None:
    """What one H100 eats and the cores today's path then needs, per GPU and per node."""
    precision = resolve({"preset": "sit-b2"}).encode.precision
    # fp32 convolutions run in TF32 on tensor cores: PyTorch's default cudnn.allow_tf32
    used = "TF32" if precision == "fp32" else "bf16"
    count = encoder_flops()
    print(f"\nSD-VAE encoder at {SIZE} px: {count / 1e9:.1f} GFLOPs an image (meta-device count; "
          f"a multiply-add is 2); the paper presets encode in {precision} (encode.precision), "
          f"which an H100 runs in {used}")
    rates = {f"{MFU:.0%} MFU, {k} {PEAK[k]:.0f} TFLOP/s dense"
             f"{' (the presets)' if k == used else ''}": MFU * PEAK[k] * 1e12 / count
             for k in PEAK}
    if measured:
        rates["measured (--gpu-rate)"] = measured
    for name, gpu in rates.items():
        cores = gpu / per_core
        print(f"one H100 at {name}: {gpu:.0f} images/s; at (a)'s {per_core:.0f} images/s a core, "
              f"decoding needs {cores:.1f} cores per GPU; a node of {GPUS} GPUs "
              f"{GPUS * (math.ceil(cores) + 1)} (a core more for each rank's own process)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    count, photographs = (12, 3) if args.smoke else (args.images, 8)
    args.rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory(prefix="sra2-decode-") as tmp:
        paths = write_files(Path(tmp), count, photographs)
        sizes = [_size(p) for p in paths]
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
        print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, load "
              f"average {os.getloadavg()[0]:.1f}; 1 core timed (torch threads "
              f"{torch.get_num_threads()}), Pillow {Image.__version__}, torch {torch.__version__}")
        print(f"files: {len(paths)} JPEGs, mean {np.mean([s[0] for s in sizes]):.0f}x"
              f"{np.mean([s[1] for s in sizes]):.0f} px, mean {kb:.0f} KB, crop {SIZE} px")
        report(paths, time_rounds(paths, args.rounds), args)


if __name__ == "__main__":
    main()
