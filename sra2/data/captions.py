"""Captioned images in MS-COCO's layout: a folder of images and a captions file
(``annotations/captions_<split>2014.json``: ``images`` with ``id`` and ``file_name``,
``annotations`` with ``image_id`` and ``caption``), and the text-to-image demo drawn in it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sra2.config.params import Config
from sra2.data.demo import draw
from sra2.data.images import DataError, ImageList, list_images
from sra2.runtime import atomic


@dataclass(frozen=True)
class Captioned:
    """The images of a split, sorted by file name (one label, 0: nothing is class-conditional),
    and the first ``per_image`` captions of each, in the file's order; no captions for an
    ImageFolder."""

    images: ImageList
    captions: list[list[str]] | None


def listing(cfg: Config, split: str = "train") -> Captioned:
    """The images (and captions) of the configured dataset's ``split``: train (data.root) or, for
    captioned data, val (data.val_root)."""
    data = cfg.data
    if data.kind == "imagefolder":
        return Captioned(list_images(data.root), None)
    root, captions = (data.root, data.captions) if split == "train" else (data.val_root,
                                                                         data.val_captions)
    return read_coco(root, captions, cfg.text.captions_per_image)


def read_coco(root: str | Path, captions_file: str | Path, per_image: int) -> Captioned:
    """The split whose images are in ``root`` and captions in ``captions_file``. Every image must
    have ``per_image`` captions (COCO's have 5 to 7: the first 5 are kept, as each image then
    weighs the same in training)."""
    root, captions_file = Path(root), Path(captions_file)
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} (the COCO images) is not a directory")
    try:
        record = json.loads(captions_file.read_text())
        names = {im["id"]: im["file_name"] for im in record["images"]}
        notes = [(a["image_id"], a["caption"]) for a in record["annotations"]]
    except FileNotFoundError:
        raise DataError(f"captions file {str(captions_file)!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{captions_file}: not a COCO captions file (images with id and "
                        f"file_name, annotations with image_id and caption): {e!r}") from None
    by_image: dict[str, list[str]] = {name: [] for name in names.values()}
    for image_id, caption in notes:
        if image_id not in names:
            raise DataError(f"{captions_file}: a caption names image id {image_id}, which "
                            "its images list does not hold")
        by_image[names[image_id]].append(" ".join(caption.split()))
    files = sorted(by_image)
    short = [f for f in files if len(by_image[f]) < per_image]
    if short:
        raise DataError(f"{captions_file}: {len(short)} images have fewer than "
                        f"text.captions_per_image ({per_image}) captions, e.g. {short[0]}")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images of {captions_file} are not in {root}, e.g. "
                        f"{missing[0]}")
    return Captioned(ImageList(root, ["coco"], files, [0] * len(files)),
                     [by_image[f][:per_image] for f in files])


# --- the text-to-image demo: shapes of a named colour on a field of another, with five captions

COLOURS = {"red": (215, 35, 35), "green": (35, 160, 60), "blue": (40, 70, 215),
           "yellow": (240, 215, 40), "white": (240, 240, 240), "black": (20, 20, 20)}
# the demo's shapes (sra2.data.demo draws them), each as a noun phrase and with another word
SHAPES = {"disc": ("a {c} disc", "a {c} circle"), "square": ("a {c} square", "a {c} box"),
          "triangle": ("a {c} triangle", "a {c} wedge"), "ring": ("a {c} ring", "a {c} hoop"),
          "cross": ("a {c} cross", "a {c} plus sign"),
          "hstripes": ("{c} stripes", "{c} horizontal lines")}


def demo_captions(shape: str, fg: str, bg: str) -> list[str]:
    """Five ways to say what a demo image shows."""
    phrase, other = (p.format(c=fg) for p in SHAPES[shape])
    return [f"{phrase} on a {bg} field", f"{phrase}, {bg} background",
            f"a {bg} picture with {phrase}", f"{other} on {bg}", f"a {bg} field behind {phrase}"]


def demo_vocabulary() -> list[str]:
    """Every word of every demo caption (what the demo's tokenizer holds as whole words)."""
    words = {w for shape in SHAPES for fg in COLOURS for bg in COLOURS
             for c in demo_captions(shape, fg, bg) for w in c.replace(",", " ,").split()}
    return sorted(words)


def write_demo_split(root: str | Path, captions_file: str | Path, shapes: int, per_shape: int,
                     min_side: int, max_side: int, seed: int, split: str) -> int:
    """Draw ``per_shape`` JPEGs of each of the first ``shapes`` demo shapes, colours drawn from
    (seed, split, shape, i) with the shape's colour unlike the field's, into ``root``, and their
    captions into ``captions_file`` in COCO's layout; the same bytes for the same arguments."""
    root, split_seed = Path(root), sum(split.encode())
    root.mkdir(parents=True, exist_ok=True)
    images, notes = [], []
    # the shapes take turns: the first images (a sample grid's) show every shape
    for i in range(per_shape):
        for s, shape in enumerate(list(SHAPES)[:shapes]):
            rng = np.random.default_rng([seed, split_seed, s, i])
            fg, bg = (list(COLOURS)[k] for k in rng.choice(len(COLOURS), 2, replace=False))
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            image_id = len(images) + 1
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            draw(shape, w, h, rng, COLOURS[bg], COLOURS[fg]).save(root / name, quality=90)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            notes += [{"id": len(notes) + 1, "image_id": image_id, "caption": c}
                      for c in demo_captions(shape, fg, bg)]
    atomic.write_json(Path(captions_file), {"images": images, "annotations": notes})
    return len(images)
