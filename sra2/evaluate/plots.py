"""Charts drawn with PIL, no plotting library: the loss-curve and FID-curve PNGs of a run
(``dvc plots show`` draws interactive versions from the CSVs) and line charts with axes (the
convergence picture)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sra2.runtime import atomic

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


def write_fid_plot(rows: list[dict], path: str | Path, title: str,
                   size: tuple[int, int] = (640, 400)) -> None:
    """FID against training step (the rows of a run's ``fid.csv``) as a PNG file, written
    atomically; without rows, the chart says that none was measured."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((10, 8), title, fill="black", font=font(14))
    steps, fids = [float(r["step"]) for r in rows], [float(r["fid"]) for r in rows]
    series, y_range = [], (0.0, 1.0)
    if rows:
        series = [Series("FID", PALETTE[0], steps, fids, f"{fids[-1]:.2f}")]
        pad = (max(fids) - min(fids)) * 0.05 or 1.0
        y_range = (min(fids) - pad, max(fids) + pad)
    note = "" if rows else ("no FID measured during training\n"
                            "(train.eval_every is 0 or above the steps)")
    line_panel(img, (0, 26, size[0], size[1]), series, "training step", "FID", y_range, note)
    atomic.write_with(path, lambda f: img.save(f, format="PNG"))


# --- line charts with axes (sra2.evaluate.convergence)

@dataclass
class Series:
    """One line of a chart: its points, and the text put beside its last point."""

    label: str
    colour: tuple[int, int, int]
    xs: list[float]
    ys: list[float]
    end_text: str = ""


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)  # Pillow's own TrueType face: no font files needed


def ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round values 1, 2 or 5 times a power of ten apart from ``lo`` to ``hi``, at most ``most``."""
    span = (hi - lo) or abs(hi) or 1.0
    power = 10 ** math.floor(math.log10(span / most))
    step = next(m * power for m in (1, 2, 5, 10) if span / (m * power) <= most)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_labels(values: list[float]) -> list[str]:
    """Labels with the decimals the ticks' spacing needs (20.4781, 20.4782), or 400k and 1.5M."""
    step = values[1] - values[0] if len(values) > 1 else 1.0
    if step >= 1000:
        return [short_number(v) for v in values]
    return [f"{v:.{max(0, math.ceil(-math.log10(step) - 1e-9))}f}" for v in values]


def short_number(value: float) -> str:
    """400000 -> 400k, 1500000 -> 1.5M, 0.25 -> 0.25."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def line_panel(img: Image.Image, box: tuple[int, int, int, int], series: list[Series],
               x_label: str, y_label: str, y_range: tuple[float, float], note: str = "") -> None:
    """A chart inside ``box`` (left, top, right, bottom) of ``img``: axes from x = 0 and over
    ``y_range``, ticks, a dot per point, and each series' ``end_text`` beside its last point
    (pushed apart so labels do not overlap). ``note`` is written where there is nothing to draw."""
    d, small = ImageDraw.Draw(img), font(11)
    left, top, right, bottom = box[0] + 58, box[1] + 20, box[2] - 12, box[3] - 40
    x_hi = max([x for s in series for x in s.xs] or [1.0]) or 1.0
    y_lo, y_hi = y_range
    px = lambda x: left + x / x_hi * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y_lo) / ((y_hi - y_lo) or 1.0) * (bottom - top)  # noqa: E731
    d.rectangle([left, top, right, bottom], outline="black")
    xs = ticks(0.0, x_hi)
    for x, text in zip(xs, tick_labels(xs)):
        d.line([(px(x), bottom), (px(x), bottom + 4)], fill="black")
        d.text((px(x), bottom + 6), text, fill="black", font=small, anchor="mt")
    ys = ticks(y_lo, y_hi)
    for y, text in zip(ys, tick_labels(ys)):
        d.line([(left, py(y)), (right, py(y))], fill=(230, 230, 230))
        d.text((left - 6, py(y)), text, fill="black", font=small, anchor="rm")
    d.text(((left + right) / 2, box[3] - 6), x_label, fill="black", font=font(13), anchor="md")
    d.text((box[0] + 4, box[1] + 2), y_label, fill="black", font=small)
    if note:
        d.text(((left + right) / 2, (top + bottom) / 2), note, fill="gray", font=font(13),
               anchor="mm", align="center")
    for s in series:
        points = [(px(x), py(y)) for x, y in zip(s.xs, s.ys)]
        if len(points) > 1:
            d.line(points, fill=s.colour, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=s.colour)
    ends = sorted(((py(s.ys[-1]), s) for s in series if s.xs), key=lambda e: e[0])
    last = -math.inf
    for y, s in ends:
        y = max(y, last + 13)
        last = y
        at = (px(s.xs[-1]) - 7, y)
        d.rectangle(d.textbbox(at, s.end_text, font=small, anchor="rm"), fill="white")
        d.text(at, s.end_text, fill=s.colour, font=small, anchor="rm")
