"""Images in: ImageFolder listing, the ADM centre crop, robust decoding."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """The data root or its layout is unusable."""


class BadImage(ValueError):
    """One file that cannot be decoded as an image; the message says why."""


@dataclass(frozen=True)
class ImageList:
    root: Path
    classes: list[str]  # sorted folder names; the index is the label
    files: list[str]  # relative to root, sorted by class then name
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


def list_images(root: str | Path) -> ImageList:
    """List ``root/<class>/<file>`` with labels in sorted-class order (the ImageNet convention)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist or is not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data root {str(root)!r} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise DataError(f"class folder {str(root / name)!r} holds no image files "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        files += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    return ImageList(root, classes, files, labels)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: halve with BOX while the short side is >= 2*size, BICUBIC to size, crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


# An image is "odd" when its ADM crop shows little of it: below 32 px on the shorter side the crop
# upsamples by 8x or more at 256 px (a 1x1 image becomes a flat colour field); above 4:1 the centre
# crop keeps under a quarter of the picture, often not its subject (a 4:3 photograph keeps 3/4).
MIN_SIDE = 32
MAX_ASPECT = 4.0


def oddity(size: tuple[int, int]) -> str:
    """Why an image of ``size`` (width, height) gives a poor centre crop, or "" if it does not."""
    short, long = min(size), max(size)
    why = []
    if short < MIN_SIDE:
        why.append(f"shorter side {short} px, under {MIN_SIDE} px")
    if long > MAX_ASPECT * short:
        why.append(f"aspect ratio {long / short:.1f}:1, over {MAX_ASPECT:g}:1")
    return "; ".join(why)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any image PIL reads (CMYK, grayscale, palette, PNG named .JPEG) as RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        reason = "empty file" if os.path.getsize(path) == 0 else f"{type(e).__name__}: {e}"
        raise BadImage(reason) from None


def load_cropped(path: str | Path, size: int) -> np.ndarray:
    """The uint8 HWC RGB array the VAE and the evaluator see for one file."""
    return center_crop_arr(load_rgb(path), size)


def load_crops(root: str | Path | ImageList, size: int, count: int | None = None) -> np.ndarray:
    """uint8 NHWC crops of every file of ``root`` (an ImageFolder or a listing), or of ``count``
    files spread evenly over the sorted listing (so that every class shows)."""
    listed = root if isinstance(root, ImageList) else list_images(root)
    n = len(listed) if count is None else min(count, len(listed))
    picked = np.linspace(0, len(listed) - 1, n).round().astype(int)
    return np.stack([load_cropped(listed.root / listed.files[i], size) for i in picked])


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


# --- the demo dataset: real JPEG files of drawn shapes and textures --------------------------
