"""The paper's feature picture: a few training images, their SD-VAE latents' tokens and SiT's
hidden states after some blocks, each projected on its own first three principal components and
shown as RGB at the token grid; one column group per checkpoint, side by side. Beside the colours,
a number per block: R^2 of a least-squares linear map from the VAE tokens to the hidden state,
scored on held-out tokens, so alignment can be read without judging colours.

What is computed, exactly:
- Images: ``count`` accepted rows of the latent store, drawn by ``seed``. Their latent is the
  posterior mean times ``vae.scale`` (the diffusion target's scale, deterministic); the decoded
  image is that latent through the VAE.
- Noising (SiT time, :mod:`sra2.model.transport`: t = 0 noise, t = 1 data): x_t = t x1 + (1 - t) x0
  with x0 drawn from (seed, row), so an image's noise does not depend on which others are drawn
  and every checkpoint sees the same x_t. The label is the image's own class. REPA-time weights
  get s = 1 - t, as the sample stage runs them.
- VAE tokens: the latent patchified to the SiT token grid (each token holds its p x p patch of
  latent channels, :func:`sra2.model.sit.patchify`); hidden states: the raw residual stream after
  block k (1-based), the stream SRA 2's projector reads.
- PCA per panel type (the VAE tokens; each checkpoint's block), fitted over all images' tokens
  together, in float64 on centred tokens by SVD. Each component's sign makes its largest-magnitude
  loading positive, so the picture does not depend on the SVD's arbitrary signs. Colours: each
  component is mapped linearly from its 1st to its 99th percentile over all tokens of the panel
  type onto 0..255 and clipped (percentiles, not min/max, so a few outlier tokens do not turn the
  rest grey; one scale for all images, so colours compare across rows).
- R^2 (:func:`alignment_r2`): the images split by a seeded permutation into a fitting half and a
  held-out half; in each half, each token position's mean over its images is removed from the
  VAE tokens and the hidden states (the position embedding is the same for every image and holds
  most of an early block's variance: ~98% for a SiT-Demo/2 trained 300 steps on the tiny
  preset's images, at t = 1, where the raw R^2 read 0.09 and the centred one 0.98); least squares
  (with an intercept) fitted on the first half, R^2 = 1 - SSE / SST on the second, summed over the
  hidden state's dimensions. Unrelated features give about -(d + 1) / n_fit, slightly below 0.
  Reported only where the fit has at least ``ROWS_PER_COEFFICIENT`` (10) independent rows per
  coefficient, else "n/a" with the counts: with fewer a least-squares map fits noise and its
  held-out R^2 means little (the tiny preset's 12 images, 20 rows for 17 coefficients, read -5.4).
  The picture's PCA is of the raw features, as the paper's figure is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sra2.config.params import Config
from sra2.data.store import ShardedStore, pointed_store
from sra2.model import vae as vae_lib
from sra2.model.networks import family, load_checkpoint
from sra2.model.sit import ReversedTime, patchify, read_checkpoint
from sra2.model.transport import interpolate
from sra2.runtime import atomic, dist
from sra2.sample.samplers import derived_seed, randn

COMPONENTS = 3  # shown as R, G, B
ROWS_PER_COEFFICIENT = 10  # an R^2 needs at least this many fitted rows per coefficient
PERCENTILES = (1.0, 99.0)  # the colour range of each component
DEFAULT_BLOCKS = (2, 4, 8)  # and the last block; those above the depth are left out
BARELY_TRAINED = 10_000  # steps: the paper's runs train 400K-7M; below this a picture says so
# the grid's geometry in pixels
MIN_PANEL = 96  # panels are scaled up by a whole factor to at least this side
PAD = 2  # between panels of a group
GAP = 12  # between checkpoint groups
LEFT = 64  # the row labels
LINE = 12  # one line of text


@dataclass
class Checkpoint:
    """One network to picture: ``label`` on the picture, the file it came from."""

    label: str
    path: Path
    model: torch.nn.Module | None = None
    name: str = ""
    step: int | None = None
    blocks: tuple[int, ...] = ()


# --- the numbers ----------------------------------------------------------------------------------

def principal_scores(tokens: torch.Tensor, k: int = COMPONENTS) -> torch.Tensor:
    """Scores (n, k) of ``tokens`` (n, d) on their first ``k`` principal components, in float64,
    each component's sign fixed so that its largest-magnitude loading is positive; components
    beyond the tokens' rank (or d < k) score 0."""
    x = tokens.to(torch.float64)
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:k]
    pivot = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
    comps = comps * torch.where(pivot < 0, -1.0, 1.0).to(comps)
    scores = centred @ comps.T
    return torch.nn.functional.pad(scores, (0, k - scores.shape[1]))


def scores_to_rgb(scores: torch.Tensor,
                  percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Scores (n, 3) -> floats in [0, 1]: each component mapped from its low to its high
    percentile (over all n tokens), clipped; a component without spread is mid-grey."""
    q = torch.tensor([p / 100 for p in percentiles], dtype=scores.dtype)
    lo, hi = torch.quantile(scores, q, dim=0)
    span = hi - lo
    flat = span <= 0
    out = (scores - lo) / torch.where(flat, 1.0, span).to(scores)
    out[:, flat] = 0.5
    return out.clamp(0.0, 1.0).numpy()


def pca_rgb(tokens: torch.Tensor) -> np.ndarray:
    """Tokens (images, L, d) -> RGB floats (images, L, 3): one PCA over every image's tokens."""
    n, length, d = tokens.shape
    return scores_to_rgb(principal_scores(tokens.reshape(n * length, d))).reshape(n, length, 3)


def held_out_r2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor,
                y_test: torch.Tensor) -> float | None:
    """R^2 on (``x_test``, ``y_test``) of the least-squares map (with intercept) from ``x``
    (n, d) to ``y`` (n, D) fitted on (``x_fit``, ``y_fit``), in float64, summed over the D
    outputs; None where the held-out ``y`` does not vary."""
    def design(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)

    coef = torch.linalg.lstsq(design(x_fit), y_fit.to(torch.float64)).solution
    target = y_test.to(torch.float64)
    residual = target - design(x_test) @ coef
    total = (target - target.mean(dim=0)).square().sum()
    if total <= 0:
        return None
    return float(1.0 - residual.square().sum() / total)


def fit_counts(vae_tokens: torch.Tensor) -> tuple[int, int]:
    """(independent rows, coefficients) of :func:`alignment_r2`'s fit: L x (images in the fitting
    half - 1) rows once each position is centred, d + 1 coefficients per output."""
    images, length, d = vae_tokens.shape
    return length * max(images // 2 - 1, 0), d + 1


def alignment_r2(vae_tokens: torch.Tensor, hidden: torch.Tensor, seed: int) -> float | None:
    """R^2 of a linear map from ``vae_tokens`` (images, L, d) to ``hidden`` (images, L, D), fitted
    on a seeded half of the images and scored on the other half. Within each half, every token
    position's mean over the half's images is removed from both first: the position embedding
    (the same for every image, most of an early block's variance) is not what the VAE tokens are
    asked to explain, and the halves share nothing. None where the fit has fewer than
    ``ROWS_PER_COEFFICIENT`` rows per coefficient (:func:`fit_counts`)."""
    images = len(vae_tokens)
    rows, coefficients = fit_counts(vae_tokens)
    if rows < ROWS_PER_COEFFICIENT * coefficients:
        return None
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed))
    fit, test = order[:images // 2], order[images // 2:]

    def rows(tokens: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        picked = tokens[part].to(torch.float64)
        return (picked - picked.mean(dim=0)).reshape(-1, tokens.shape[-1])

    return held_out_r2(rows(vae_tokens, fit), rows(hidden, fit), rows(vae_tokens, test),
                       rows(hidden, test))


# --- the inputs -----------------------------------------------------------------------------------

def parse_blocks(text: str) -> list[int | str]:
    """``auto`` or a comma list of block numbers (1-based) and ``last``."""
    if text.strip() == "auto":
        return ["auto"]
    items = []
    for part in (p.strip() for p in text.split(",")):
        if part == "last":
            items.append(part)
        elif part.isdigit() and int(part) >= 1:
            items.append(int(part))
        else:
            raise ValueError(f"blocks: {part!r} in {text!r} is neither a block number (1, 2, ...) "
                             "nor 'last'; give e.g. '2,4,8,last' or 'auto'")
    return items


def resolve_blocks(spec: list[int | str], depth: int, source: str) -> tuple[int, ...]:
    """Block numbers of a network ``depth`` blocks deep: ``auto`` is 2, 4, 8 below the depth and
    the last; a number above the depth is an error naming the checkpoint."""
    if spec == ["auto"]:
        spec = [b for b in DEFAULT_BLOCKS if b < depth] + ["last"]
    blocks = [depth if b == "last" else b for b in spec]
    if too_deep := [b for b in blocks if b > depth]:
        raise ValueError(f"blocks: {too_deep} above the depth of {source} ({depth} blocks); "
                         f"use 1..{depth} or 'last'")
    return tuple(dict.fromkeys(blocks))  # in order, each once


def parse_checkpoints(text: str) -> list[Checkpoint]:
    """``[LABEL=]PATH,[LABEL=]PATH,...``; every file must exist (checked before anything loads).
    Without a label, the path is the label."""
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        label, _, path = item.rpartition("=")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ema: checkpoint {path} does not exist (from {item!r}); "
                                    "train one (dvc repro train) or give the path of an EMA export")
        out.append(Checkpoint(label or str(path), path))
    if not out:
        raise ValueError(f"ema: no checkpoint in {text!r}")
    return out


def pick_rows(store: ShardedStore, count: int, seed: int) -> np.ndarray:
    """``count`` accepted rows of ``store`` drawn by ``seed``, sorted."""
    from sra2.data.encode import rejects

    rejected = {r["index"] for r in rejects(store)}
    accepted = np.array([i for i in range(store.num_items) if i not in rejected], np.int64)
    if not 1 <= count <= len(accepted):
        raise ValueError(f"images: {count} asked for, the latent store {store.path} has "
                         f"{len(accepted)} accepted images")
    return np.sort(np.random.default_rng(seed).choice(accepted, count, replace=False))


def load_network(cfg: Config, ckpt: Checkpoint, spec: list[int | str]) -> None:
    """Fill in ``ckpt``'s network (in SiT time), architecture name, step and blocks."""
    state = read_checkpoint(ckpt.path)
    ckpt.name = state.get("name", cfg.model.name)
    if family(ckpt.name) != "sit":  # its pictures' rows are classes: no captions here yet
        raise ValueError(f"{ckpt.path}: {ckpt.name} is conditioned on captions; the feature "
                         "pictures draw class-conditional SiTs only")
    ckpt.step = state.get("step", state.get("steps"))
    ckpt.model = load_checkpoint(ckpt.name, state, convention=cfg.sample.convention,
                                 source=str(ckpt.path)).eval()
    sit = ckpt.model.net if isinstance(ckpt.model, ReversedTime) else ckpt.model
    ckpt.blocks = resolve_blocks(spec, sit.depth, str(ckpt.path))


def check_shapes(ckpts: list[Checkpoint], latent_shape: tuple[int, ...], classes: int,
                 store: Path) -> None:
    """Every network reads the store's latents on one token grid, and knows its classes."""
    for c in ckpts:
        m = c.model
        want = (m.in_channels, m.input_size, m.input_size)
        if want != latent_shape or m.patch_size != ckpts[0].model.patch_size:
            raise ValueError(f"{c.path} reads latents {want} in patches of {m.patch_size}; the "
                             f"store {store} holds {latent_shape} and {ckpts[0].path} uses patches "
                             f"of {ckpts[0].model.patch_size}: picture checkpoints of one grid")
        if classes > m.num_classes:
            raise ValueError(f"{c.path} knows {m.num_classes} classes, the store {store} has "
                             f"label {classes - 1}")


@torch.no_grad()
def hidden_states(model: torch.nn.Module, xt: torch.Tensor, t: float, y: torch.Tensor,
                  blocks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The residual stream (N, L, D) after each of ``blocks`` at SiT time ``t``."""
    sit, time = (model.net, 1.0 - t) if isinstance(model, ReversedTime) else (model, t)
    times = torch.full((len(xt),), time, device=xt.device)
    return sit(xt, times, y, return_hidden=blocks)[1]


# --- the picture ----------------------------------------------------------------------------------

def token_panel(rgb: np.ndarray, side: int) -> Image.Image:
    """RGB floats (L, 3) of a square token grid -> a ``side`` px picture (nearest: one block of
    pixels per token)."""
    grid = int(round(math.sqrt(len(rgb))))
    pixels = np.round(rgb.reshape(grid, grid, 3) * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((side, side), Image.NEAREST)


def draw_grid(title: list[tuple[str, str]], row_labels: list[list[str]],
              groups: list[tuple[list[str], list[tuple[str, str]], list[list[Image.Image]]]],
              panel: int) -> Image.Image:
    """``title``: (text, colour) lines on top. Each group: header lines, (text, colour); column
    headers, two lines each; panels[row][column]. Rows are labelled on the left."""
    rows = len(row_labels)
    widths = [len(columns) * panel + (len(columns) - 1) * PAD for _, columns, _ in groups]
    top = LINE * (len(title) + 4)  # the title, two lines of group header, two of column header
    size = (LEFT + sum(widths) + GAP * (len(groups) - 1), top + rows * panel + (rows - 1) * PAD)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for i, (text, colour) in enumerate(title):
        draw.text((2, LINE * i), text, fill=colour)
    for r, lines in enumerate(row_labels):
        for i, text in enumerate(lines):
            draw.text((2, top + r * (panel + PAD) + LINE * i), text, fill="black")
    x0 = LEFT
    for (header, columns, panels), width in zip(groups, widths):
        for i, (text, colour) in enumerate(header):
            draw.text((x0, LINE * (len(title) + i)), text, fill=colour)
        for c, lines in enumerate(columns):
            for i, text in enumerate(lines.split("\n")):
                draw.text((x0 + c * (panel + PAD), LINE * (len(title) + 2 + i)), text, fill="black")
        for r, row in enumerate(panels):
            for c, image in enumerate(row):
                canvas.paste(image, (x0 + c * (panel + PAD), top + r * (panel + PAD)))
        x0 += width + GAP
    return canvas


def _ckpt_header(c: Checkpoint) -> list[tuple[str, str]]:
    if c.step is None:
        return [(c.label, "black"), (f"{c.name}, step unknown", "black")]
    if c.step < BARELY_TRAINED:
        state = "untrained" if c.step == 0 else "barely trained"
        return [(c.label, "black"), (f"{c.name}, step {c.step}: {state}", "red")]
    return [(c.label, "black"), (f"{c.name}, step {c.step}", "black")]


def _title(cfg: Config, t: float, seed: int, store: Path) -> list[tuple[str, str]]:
    low, high = PERCENTILES
    lines = [(f"t = {t} (0 noise, 1 data), seed {seed}, images of {store}", "black"),
             ("colours: first 3 principal components per panel type, "
              f"percentiles {low:g}-{high:g}; "
              "R2: linear map from VAE tokens, held-out images, position means removed "
              f"(n/a below {ROWS_PER_COEFFICIENT} fitted rows per coefficient)", "black")]
    if vae_lib.is_random(cfg.vae):
        lines.append((f"{vae_lib.describe(cfg.vae)}: not SD-VAE, its latents are a random local "
                       "map of the pixels", "red"))
    elif cfg.data.demo is not None:
        lines.append((f"DEMO: {vae_lib.describe(cfg.vae)}", "red"))  # which says not SD-VAE
    return lines


def _r2_text(r2: float | None, counts: tuple[int, int] | None = None) -> str:
    """R^2 as shown; where it is not reported, with the rows it lacks if ``counts`` are given (the
    log: a panel's header has room for "R2 n/a" only)."""
    if r2 is not None:
        return f"R2 {r2:.3f}"
    needed = f" ({counts[0]} of {ROWS_PER_COEFFICIENT * counts[1]} rows)" if counts else ""
    return f"R2 n/a{needed}"


# --- the command ----------------------------------------------------------------------------------

def feature_pca(cfg: Config, ema: str, latents: str | Path, out: str | Path, images: int = 4,
                t: float = 0.5, seed: int = 0, blocks: str = "auto", log=print) -> dict:
    """Draw ``out`` (PNG) for the checkpoints ``ema`` (``[LABEL=]PATH,...``) on ``images`` images
    of the store ``latents`` (a store or its pointer file), noised to ``t``; write the numbers to
    ``out`` with ``.json`` and return them."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t: {t} is outside [0, 1] (SiT time: 0 noise, 1 data)")
    spec = parse_blocks(blocks)
    ckpts = parse_checkpoints(ema)
    store_path = pointed_store(latents)
    store = ShardedStore(store_path)
    rows = pick_rows(store, images, seed)
    for c in ckpts:
        load_network(cfg, c, spec)
    labels = store.array("labels")[:]
    latent_shape = tuple(store.array("mean").shape[1:])
    check_shapes(ckpts, latent_shape, int(labels.max()) + 1, store_path)
    device = dist.device(cfg.sample.device)
    log(f"feature-pca: rows {rows.tolist()} of {store_path}, t {t}, "
        + "; ".join(f"{c.label}: blocks {list(c.blocks)}" for c in ckpts))

    x1 = torch.from_numpy(store.array("mean")[rows].astype(np.float32)) * cfg.vae.scale
    x0 = randn(x1.shape, [torch.Generator().manual_seed(derived_seed(seed, int(r))) for r in rows])
    xt, _ = interpolate(x0, x1, torch.full((len(rows),), t))
    y = torch.from_numpy(labels[rows]).to(device)
    vae = vae_lib.load_vae(cfg.vae, device)
    pictures = vae_lib.decode(vae, x1.to(device), cfg.vae.scale).cpu().numpy()
    patch = ckpts[0].model.patch_size
    vae_tokens = patchify(x1, patch)
    vae_rgb = pca_rgb(vae_tokens)

    side = pictures.shape[1]
    zoom = max(1, math.ceil(MIN_PANEL / side))
    panel = side * zoom
    fixed = [[Image.fromarray(p).resize((panel, panel), Image.NEAREST), token_panel(v, panel)]
             for p, v in zip(pictures, vae_rgb)]
    groups, numbers = [], []
    for c in ckpts:
        hidden = hidden_states(c.model.to(device), xt.to(device), t, y, c.blocks)
        c.model.cpu()
        r2 = {b: alignment_r2(vae_tokens, h.cpu(), seed) for b, h in hidden.items()}
        counts = fit_counts(vae_tokens)
        rgb = {b: pca_rgb(h.cpu()) for b, h in hidden.items()}
        panels = [fixed[i] + [token_panel(rgb[b][i], panel) for b in c.blocks]
                  for i in range(len(rows))]
        columns = ["image", "VAE latent"] + [f"block {b}\n{_r2_text(r2[b])}" for b in c.blocks]
        groups.append((_ckpt_header(c), columns, panels))
        numbers.append({"label": c.label, "path": str(c.path), "name": c.name, "step": c.step,
                        "blocks": [{"block": b, "r2": r2[b], "r2_rows": counts[0],
                                    "r2_coefficients": counts[1]} for b in c.blocks]})
        log(f"feature-pca: {c.label} ({c.name}, step {c.step}): "
            + ", ".join(f"block {b} {_r2_text(r2[b], counts)}" for b in c.blocks))

    row_labels = [[f"row {r}", f"class {labels[r]}"] for r in rows]
    grid = draw_grid(_title(cfg, t, seed, store_path), row_labels, groups, panel)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_with(out, lambda f: grid.save(f, format="PNG"))
    result = {"png": str(out), "json": str(out.with_suffix(".json")), "store": str(store_path),
              "rows": rows.tolist(), "labels": labels[rows].tolist(), "t": t, "seed": seed,
              "vae": vae_lib.describe(cfg.vae), "vae_token_dims": vae_tokens.shape[-1],
              "tokens_per_image": vae_tokens.shape[1], "fit_images": len(rows) // 2,
              "held_out_images": len(rows) - len(rows) // 2,
              "percentiles": list(PERCENTILES), "checkpoints": numbers}
    atomic.write_json(out.with_suffix(".json"), result)
    return result
