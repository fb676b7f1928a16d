"""Pictures as Prefect Markdown artifacts: PNGs embedded as data: URIs, so the UI shows them with
no file server and offline."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from PIL import Image

import flows.harness.prefect_defaults  # noqa: F401  (before prefect reads its settings)

PICTURE_WIDTH = (384, 1024)  # pictures are shown at least / at most this wide (pixels)

Picture = tuple[str, "Image.Image | Path | str"]  # caption, image or PNG file


def _load(picture: Image.Image | Path | str) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture
    with Image.open(picture) as img:
        return img.convert("RGB")


def img_tag(picture: Image.Image | Path | str, caption: str) -> str:
    """An <img> holding the PNG as a data: URI (the UI renders it offline; nothing to serve),
    shrunk to the widest PICTURE_WIDTH, shown at least the narrowest wide (small grids)."""
    img = _load(picture)
    low, high = PICTURE_WIDTH
    if img.width > high:
        img = img.resize((high, max(1, round(img.height * high / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    shown = img.width * max(1, math.ceil(low / img.width))
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{shown}" alt="{caption}"/>'


def pictures_markdown(pictures: list[Picture]) -> str:
    return "\n\n".join(f"**{caption}**\n\n{img_tag(picture, caption)}"
                       for caption, picture in pictures)


def show_pictures(mon, key: str, pictures: list[Picture], description: str) -> None:
    """A Markdown artifact of the pictures (a new version of ``key``), made through the stage's
    flows.harness.monitor.Monitor ``mon``; unreadable files are left out."""
    from prefect.artifacts import create_markdown_artifact

    readable = [(c, p) for c, p in pictures if isinstance(p, Image.Image) or Path(p).is_file()]
    if readable and mon.online:
        mon.call(create_markdown_artifact, pictures_markdown(readable), key=key,
                 description=description)
