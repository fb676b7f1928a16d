"""A loss-curve PNG drawn with PIL (``dvc plots show`` draws the interactive version)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from sra2 import atomic

# one colour per loss column, in the order of the columns
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def write_loss_plot(rows: list[dict], path: str | Path, title: str,
                    size: tuple[int, int] = (640, 400)) -> None:
    """:func:`loss_plot` as a PNG file, written atomically."""
    img = loss_plot(rows, title, size)
    atomic.write_with(path, lambda f: img.save(f, format="PNG"))


def loss_plot(rows: list[dict], title: str, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Lines of every loss column (``loss``, ``loss_*``) against ``step``, with min/max labels and
    a legend."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    colours = dict(zip([k for k in rows[0] if k.startswith("loss")], PALETTE))
    steps = [float(r["step"]) for r in rows]
    values = [float(r[k]) for r in rows for k in colours]
    lo, hi = min(values), max(values)
    span_y, span_x = (hi - lo) or 1.0, (steps[-1] - steps[0]) or 1.0
    px = lambda s: left + (s - steps[0]) / span_x * (w - left - right)  # noqa: E731
    py = lambda v: h - bottom - (v - lo) / span_y * (h - top - bottom)  # noqa: E731
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, 8), title, fill="black")
    d.text((4, top), f"{hi:.3g}", fill="black")
    d.text((4, h - bottom - 10), f"{lo:.3g}", fill="black")
    d.text((left, h - bottom + 6), f"step {steps[0]:.0f}", fill="black")
    d.text((w - right - 80, h - bottom + 6), f"step {steps[-1]:.0f}", fill="black")
    for i, (key, colour) in enumerate(colours.items()):
        points = [(px(s), py(float(r[key]))) for s, r in zip(steps, rows)]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        d.text((w - right - 110, top + 6 + 12 * i), key, fill=colour)
    return img
