"""RALU, region-adaptive latent upsampling (arXiv 2507.08422), as a SiT sampler.

Euler ODE steps in SiT time (0 = noise, 1 = data), in three stages:
1. the half-size latent (full-size noise subsampled, so still i.i.d.): a quarter of the tokens;
2. the tokens with the most edges in the decoded estimate at full size, the others at half size;
3. the whole latent at full size.
A half-size token taken to full size is copied into its 4 children, whose noise is then identical;
"noise-timestep matching" re-noises it so that it is an x_t of an earlier t with independent
noise, and the next stage restarts at that t. The network sees a set of tokens of two sizes, each
with the sin-cos position embedding of where it sits (:meth:`sra2.model.sit.SiT.tokens`); its
weights do not change.

The state of a batch is the latent at half and at full size and ``up`` (N, g, g), which half-size
tokens are at full size: a token is read from the full-size latent where it is up, else from the
half-size one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sra2.config.params import Ralu
from sra2.model.sit import patchify, sincos_2d, sincos_at, unpatchify
from sra2.sample.samplers import Generators, randn

# velocity(patches (N, L, p*p, C), t, pos (N, L, D)) -> (N, L, p*p, C): sra2.sample.samplers's
# guided_velocity(..., tokens=True)
TokenVelocity = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]  # half-size latents -> uint8 images (N, h, w, 3)


@dataclass(frozen=True)
class Matching:
    """At a stage's end time e: x <- a Up(x) + b z, and the next stage starts at ``restart``."""
    restart: float
    a: float
    b: float


def matching(end: float, c: float) -> Matching:
    """With delta = (1 - e) / sqrt(c): s' = e / (delta + e), a = 1 / (delta + e), b = delta a, so
    that a e = s' (the signal) and a^2 (1 - e)^2 S + b^2 (I - c S) = (1 - s')^2 I (the noise)."""
    delta = (1.0 - end) / math.sqrt(c)
    return Matching(end / (delta + end), 1.0 / (delta + end), delta / (delta + end))


def stage_times(start: float, end: float, steps: int, shift: float) -> list[float]:
    """``steps + 1`` times from start to end, uniform in g(sigma) = sigma / (h - (h - 1) sigma)
    with sigma = 1 - t (h = 1: uniform in t)."""
    def g(sigma: float) -> float:
        return sigma / (shift - (shift - 1.0) * sigma)

    u = np.linspace(g(1.0 - start), g(1.0 - end), steps + 1, dtype=np.float64)
    t = 1.0 - shift * u / (1.0 + (shift - 1.0) * u)
    t[0], t[-1] = start, end
    return t.tolist()


def positions(hidden: int, grid: int, kind: str) -> torch.Tensor:
    """Position embeddings (grid * grid, hidden), raster order: ``full`` the trained table of a
    ``grid`` grid; for half-size tokens on a ``grid`` grid, ``centres`` the centres of their 2x2
    blocks in the full grid's units (2i + 0.5), ``half`` the table of a ``grid`` grid."""
    if kind in ("full", "half"):
        table = sincos_2d(hidden, grid)
    elif kind == "centres":
        centres = 2.0 * np.arange(grid, dtype=np.float64) + 0.5
        cols, rows = np.meshgrid(centres, centres)
        table = sincos_at(hidden, rows, cols)
    else:
        raise ValueError(f"positions must be full, half or centres, got {kind!r}")
    return torch.from_numpy(table).float()


def children(up: torch.Tensor, size: int = 2) -> torch.Tensor:
    """Each entry of (N, g, g) copied into a size x size block: (N, g*size, g*size)."""
    return up.repeat_interleave(size, 1).repeat_interleave(size, 2)


def nearest(x: torch.Tensor) -> torch.Tensor:
    """Latent (N, C, h, w) -> (N, C, 2h, 2w), each pixel copied into its 4 children."""
    return x.repeat_interleave(2, 2).repeat_interleave(2, 3)


def correlated(w: torch.Tensor, c: float) -> torch.Tensor:
    """z ~ N(0, I - c S) in each 2x2 group of children from w ~ N(0, I): z = w + beta S w with
    2 beta + 4 beta^2 = -c (S^2 = 4 S)."""
    beta = (math.sqrt(1.0 - 4.0 * c) - 1.0) / 4.0
    sums = torch.nn.functional.avg_pool2d(w, 2) * 4.0
    return w + beta * nearest(sums)


def _gather(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of (N, L, ...) where mask (N, L) holds, the same number in each sample."""
    return tokens[mask].reshape(tokens.shape[0], -1, *tokens.shape[2:])


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = values.new_zeros(*mask.shape, *values.shape[2:])
    out[mask] = values.flatten(0, 1)
    return out


def velocities(velocity: TokenVelocity, half: torch.Tensor, full: torch.Tensor, up: torch.Tensor,
               t: float, pos_half: torch.Tensor, pos_full: torch.Tensor,
               patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One network evaluation on the batch's tokens -> the velocity of the half-size and of the
    full-size latent (zero where a token is not in play)."""
    n, channels = half.shape[:2]
    on_half, on_full = (~up).flatten(1), children(up).flatten(1)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return patchify(x, patch).unflatten(-1, (patch * patch, channels))

    patches = torch.cat([_gather(tokens(half), on_half), _gather(tokens(full), on_full)], 1)
    pos = torch.cat([_gather(pos_half.expand(n, -1, -1), on_half),
                     _gather(pos_full.expand(n, -1, -1), on_full)], 1)
    v = velocity(patches, t, pos.to(patches.dtype))
    k = int(on_half[0].sum())
    v_half = unpatchify(_scatter(v[:, :k], on_half).flatten(2), patch, channels)
    v_full = unpatchify(_scatter(v[:, k:], on_full).flatten(2), patch, channels)
    return v_half, v_full


def upsample(half: torch.Tensor, full: torch.Tensor, up: torch.Tensor, new_up: torch.Tensor,
             m: Matching, c: float, generator: Generators,
             patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-timestep matching at a stage's end: the tokens that go up are copied to full size
    and re-noised with noise correlated in each group of 4 children (``correlated``); every
    other token is re-noised with i.i.d. noise of variance b^2 (1 - c), which keeps its x_t on
    the same path (the published code adds b^2: a little too much)."""
    w_full = randn(full.shape, generator, full.device).to(full.dtype)
    w_half = randn(half.shape, generator, half.device).to(half.dtype)
    copied = children(new_up & ~up, 2 * patch)[:, None]  # (N, 1, H, W) latent pixels
    kept = m.b * math.sqrt(1.0 - c)
    full = torch.where(copied, m.a * nearest(half) + m.b * correlated(w_full, c),
                       m.a * full + kept * w_full)
    return m.a * half + kept * w_half, full


def upsampled(top_k: float, grid: int) -> int:
    """How many of a grid x grid token grid stage 2 takes to full size (at least one)."""
    return max(1, round(top_k * grid * grid))


def edge_tokens(images: np.ndarray, grid: int, top_k: float,
                thresholds: tuple[int, int] = (100, 200)) -> torch.Tensor:
    """The ``top_k`` share of a grid x grid token grid with the most Canny edge pixels in each
    uint8 image (N, h, w, 3) -> up (N, grid, grid); ties go to the earlier token in raster
    order."""
    import cv2

    n, h, w, _ = images.shape
    k = upsampled(top_k, grid)
    up = np.zeros((n, grid * grid), dtype=bool)
    for i, image in enumerate(images):
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(grey, *thresholds) > 0
        counts = edges.reshape(grid, h // grid, grid, w // grid).sum((1, 3)).ravel()
        up[i, np.argsort(-counts, kind="stable")[:k]] = True
    return torch.from_numpy(up.reshape(n, grid, grid))


@torch.no_grad()
def sample(velocity: TokenVelocity, noise: torch.Tensor, generator: Generators, cfg: Ralu,
           patch: int, hidden: int, decode: Decode | None = None) -> torch.Tensor:
    """RALU from full-size ``noise`` (N, C, H, W) to a full-size latent at t = 1. ``decode`` turns
    stage 1's half-size estimate into images for the edge mask (needed when stage 2 runs with
    top_k < 1); ``generator`` draws the matching noise, as in sra2.sample.samplers."""
    n, _, size, _ = noise.shape
    grid = size // patch // 2  # half-size tokens per side
    pos_half = positions(hidden, grid, cfg.positions).to(noise.device)[None]
    pos_full = positions(hidden, 2 * grid, "full").to(noise.device)[None]
    nothing = torch.zeros(n, grid, grid, dtype=torch.bool, device=noise.device)
    everything = ~nothing
    (n1, n2, n3), (e1, e2), (h1, h2, h3) = cfg.steps, cfg.ends, cfg.shifts
    if n1:  # the half-size noise of the full-size draw
        half, full, up = noise[..., ::2, ::2], torch.zeros_like(noise), nothing
    else:
        half, full, up = torch.zeros_like(noise[..., ::2, ::2]), noise, everything

    t = 0.0
    v_half = None
    for steps, end, shift, stage in ((n1, e1, h1, 1), (n2, e2, h2, 2), (n3, 1.0, h3, 3)):
        if not steps:
            continue
        wanted = up if stage == 1 else everything
        if stage == 2 and cfg.top_k < 1:
            estimate = half + (1.0 - t) * v_half  # x1_hat at stage 1's end, from its last velocity
            wanted = edge_tokens(decode(estimate).cpu().numpy(), grid, cfg.top_k,
                                 tuple(cfg.canny)).to(noise.device)
        if not torch.equal(wanted, up):
            m = matching(t, cfg.c)
            half, full = upsample(half, full, up, wanted, m, cfg.c, generator, patch)
            up, t = wanted, m.restart
        times = stage_times(t, end, steps, shift)
        for t0, t1 in zip(times[:-1], times[1:]):
            v_half, v_full = velocities(velocity, half, full, up, t0, pos_half, pos_full, patch)
            half, full = half + v_half * (t1 - t0), full + v_full * (t1 - t0)
        t = end
    return full


# --- cost ---------------------------------------------------------------------------------------

def stage_tokens(cfg: Ralu, grid: int) -> list[int]:
    """Tokens per network evaluation in stages 1, 2, 3 (``grid`` half-size tokens per side)."""
    k = upsampled(cfg.top_k, grid)
    return [grid * grid, grid * grid - k + 4 * k, 4 * grid * grid]

