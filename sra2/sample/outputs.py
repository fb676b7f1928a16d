"""Image files: the ADM ``.npz`` of the sample stage (written shard by shard, read back as a
memory map by the evaluator) and PNG grids of samples."""

from __future__ import annotations

import math
import struct
import textwrap
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sra2.data.store import ShardedStore
from sra2.runtime import atomic


def write_npz(store: ShardedStore, path: str | Path) -> None:
    """``arr_0`` uint8 [N, H, W, 3], streamed shard by shard (50K images do not fit in memory
    twice), and where the samples have captions, ``captions`` (N strings)."""
    images = store.array("images")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(images.shape)}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for shard in range(store.num_shards):
                    member.write(np.ascontiguousarray(images[slice(*store.shard_range(shard))]).tobytes())
            if "captions" in store.group:  # fixed-width unicode: read without pickle
                said = np.array(store.array("captions")[:].tolist())
                with zf.open("captions.npy", "w", force_zip64=True) as member:
                    np.save(member, said, allow_pickle=False)

    atomic.write_with(path, write)


def npz_damage(path: str | Path) -> str | None:
    """What is wrong with the ``.npz`` at ``path`` (its zip structure, or a member's bytes against
    its CRC32, every byte read), or None."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        return f"not a readable zip ({type(e).__name__}: {e})"
    return f"{bad}'s bytes fail its CRC32" if bad else None


def read_npz_captions(path: str | Path) -> list[str] | None:
    """The captions of the samples in the ``.npz`` at ``path``; None for class-conditional ones."""
    with np.load(path, allow_pickle=False) as found:
        return found["captions"].tolist() if "captions" in found.files else None


class DamagedFile(ValueError):
    """A file that cannot be read as what it should be; the message names it and what to do."""


SAMPLES_REMEDY = ("rerun the sample stage alone (dvc repro -s -f sample): it finds the damage and "
                  "draws the samples again")


def read_npz_images(path: str | Path, remedy: str = SAMPLES_REMEDY) -> np.ndarray:
    """``arr_0`` of an uncompressed ``.npz`` as a read-only memory map (no 10 GB load for 50K). A
    file that is not such an ``.npz``, or is cut short, is a :class:`DamagedFile` that says
    ``remedy``."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("arr_0.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return np.load(path)["arr_0"]
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)  # local file header: name and extra field lengths
            name_len, extra_len = struct.unpack("<2H", f.read(4))  # ints: no uint16 arithmetic
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, fortran, dtype = read_header(f)
            # fewer bytes than the header says would map the zip's directory as pixels
            stored = info.file_size - (f.tell() - start)
            if stored != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"arr_0 holds {stored} bytes, its header says {shape} {dtype}")
            return np.memmap(f, dtype=dtype, mode="r", shape=shape, offset=f.tell(),
                             order="F" if fortran else "C")
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as e:
        raise DamagedFile(f"{path} is damaged or incomplete ({type(e).__name__}: {e}); "
                          f"{remedy}") from e


CELL = 128  # px: the least width of a captioned grid's cells (its text needs the room)


def write_grid(images: np.ndarray, path: str | Path, caption: str = "",
               said: list[str] | None = None) -> None:
    """A square PNG grid of uint8 NHWC images, with an optional caption strip on top; with
    ``said``, each image's own caption under it (the images enlarged, without smoothing, to at
    least :data:`CELL` px wide)."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    zoom = max(1, math.ceil(CELL / w)) if said is not None else 1
    lines = [textwrap.wrap(s, width=w * zoom // 6) or [""] for s in said or []]
    text_h = 11 * max(map(len, lines), default=0) + (4 if said is not None else 0)
    cell_w, cell_h = w * zoom, h * zoom + text_h
    heading = textwrap.wrap(caption, width=max(20, cols * cell_w // 6))
    top = 12 * len(heading) + 2 * bool(heading)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        x, y = (i % cols) * cell_w, top + (i // cols) * cell_h
        canvas.paste(Image.fromarray(img).resize((cell_w, h * zoom), Image.NEAREST), (x, y))
        for k, line in enumerate(lines[i] if said is not None else []):
            draw.text((x + 2, y + h * zoom + 2 + 11 * k), line, fill="black")
    for k, line in enumerate(heading):
        draw.text((2, 1 + 12 * k), line, fill="red")
    atomic.write_with(path, lambda f: canvas.save(f, format="PNG"))
