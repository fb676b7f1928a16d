"""SiT (Scalable Interpolant Transformer) with the official parameter names, so that released SiT
and REPA checkpoints load unchanged. The forward pass can also return the hidden state after a
given block, which the SRA 2 projector reads during training."""

from __future__ import annotations

import argparse
import math
import pickle
import re
from functools import partial
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_at(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """2D sin-cos vectors (tokens, dim) of tokens at (row, col), in grid units (any real
    values): the first half of each vector encodes the column, the second half the row (the
    MAE/DiT/SiT layout)."""
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """The fixed table of a grid_size x grid_size grid, tokens in row-major order."""
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32))
    return sincos_at(dim, rows, cols)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoid of the raw t in [0, 1] ([cos, sin], 256 frequencies), then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                               device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Row ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (shift_a, scale_a, gate_a,
         shift_m, scale_m, gate_m) = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """The patch tokens' output; with ``cls_dim``, also the class token's (first) through its own
    Linear(D, cls_dim), both after the same adaLN modulation (REG's final layer)."""

    def __init__(self, dim: int, patch: int, out_channels: int, cls_dim: int | None = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        if cls_dim is not None:
            self.linear_cls = nn.Linear(dim, cls_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                extra: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch outputs, class token output or None) of ``extra`` (0 or 1) leading tokens."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x[:, extra:]), self.linear_cls(x[:, 0]) if extra else None


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, p*p*C), the token layout of the final layer's output."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), -1)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    n, t, _ = tokens.shape
    side = int(round(t ** 0.5))
    x = tokens.reshape(n, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * patch, side * patch)


class Output(NamedTuple):
    """One pass of the SiT: the velocity, the residual stream after the blocks asked for (every
    token, the class token first where there is one) and the class token's velocity (or None)."""

    v: torch.Tensor
    hidden: dict[int, torch.Tensor]
    cls_v: torch.Tensor | None


class SiT(nn.Module):
    """With ``cls_dim`` (REG), the SiT also takes a noised class token of that width: embedded by
    Linear(cls_dim, D) and a LayerNorm (``cls_projectors2``, ``wg_norm``: REG's names), entered
    before the patch tokens with a position embedding of zeros, and its velocity given by the final
    layer's ``linear_cls``. Without a class token such a SiT runs on the patches alone."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = True,
                 cls_dim: int | None = None):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.input_size = input_size
        self.hidden_size, self.depth, self.learn_sigma = hidden_size, depth, learn_sigma
        self.cls_dim, self.extra_tokens = cls_dim, int(cls_dim is not None)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        tokens = (input_size // patch_size) ** 2 + self.extra_tokens
        # a parameter (not a buffer) so that it sits in state_dict under the official name
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size), requires_grad=False)
        if cls_dim is not None:
            self.cls_projectors2 = nn.Linear(cls_dim, hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cls_dim)
        self.initialize_weights(input_size // patch_size)

    def initialize_weights(self, grid_size: int) -> None:
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        table = torch.from_numpy(sincos_2d(self.hidden_size, grid_size)).float()
        self.pos_embed.data[0, self.extra_tokens:] = table  # the class token's slot stays zero
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        final = self.final_layer
        for layer in (final.adaLN_modulation[-1], final.linear, getattr(final, "linear_cls", None)):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_hidden: int | tuple[int, ...] | None = None,
                cls: torch.Tensor | None = None):
        """Velocity for latents ``x`` at times ``t`` (N,) and labels ``y`` (``num_classes`` = null);
        with a class token ``cls`` (N, cls_dim), the pair (velocity, the class token's velocity).

        With ``return_hidden=k`` also returns the residual stream after block k (1-based); with a
        tuple of blocks, a dict of block -> stream.
        """
        blocks = (return_hidden,) if isinstance(return_hidden, int) else return_hidden or ()
        v, hidden, cls_v = self.run(x, t, y, blocks, cls)
        out = v if cls is None else (v, cls_v)
        if return_hidden is None:
            return out
        return out, hidden[return_hidden] if isinstance(return_hidden, int) else hidden

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, blocks: tuple[int, ...] = (),
            cls: torch.Tensor | None = None) -> Output:
        """The velocity, the streams after ``blocks`` and the class token's velocity."""
        out, hidden, cls_v = self._trunk(self._embed(x, cls), t, y, blocks, int(cls is not None))
        out = unpatchify(out, self.patch_size, self.out_channels)
        if self.learn_sigma:  # the variance half is not used by the interpolant
            out = out[:, : self.in_channels]
        return Output(out, hidden, cls_v)

    def _embed(self, x: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """The tokens the first block sees: the class token (where given) then the patches."""
        h = self.x_embedder(x)
        if cls is None:
            return h + self.pos_embed[:, self.extra_tokens:]
        if self.cls_dim is None:
            raise ValueError("this SiT takes no class token (it was built without cls_dim)")
        token = self.wg_norm(self.cls_projectors2(cls.to(h.dtype)))
        return torch.cat([token.unsqueeze(1), h], dim=1) + self.pos_embed

    def hidden_after(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     block: int) -> torch.Tensor:
        """The residual stream after ``block`` (1-based), the later blocks not run."""
        h, c = self._embed(x, None), self.t_embedder(t) + self.y_embedder(y)
        for layer in self.blocks[:block]:
            h = layer(h, c)
        return h

    def tokens(self, patches: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        """Velocity of any set of tokens: ``patches`` (N, L, p*p, C) in :func:`patchify`'s layout,
        ``pos`` their position embeddings (N, L, D) -> (N, L, p*p, C). For the raster tokens of a
        latent and ``pos_embed`` this is :meth:`forward`; RALU gives tokens of two sizes."""
        w = self.x_embedder.proj.weight  # (D, C, p, p): a linear map of (p, q, c)-ordered patches
        h = patches.flatten(2) @ w.permute(0, 2, 3, 1).flatten(1).T + self.x_embedder.proj.bias
        out, _, _ = self._trunk(h + pos, t, y)
        return out.unflatten(-1, (-1, self.out_channels))[..., : self.in_channels]

    def _trunk(self, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               blocks: tuple[int, ...] = (), extra: int = 0):
        """Embedded tokens, ``extra`` (0 or 1) class tokens first -> (final-layer patch tokens
        (N, L, p*p*out), the stream after each of ``blocks``, the class token's output or None)."""
        c = self.t_embedder(t) + self.y_embedder(y)
        hidden = {}
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i in blocks:
                hidden[i] = h
        out, cls_v = self.final_layer(h, c, extra)
        return out, hidden, cls_v


def _sit(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    return partial(SiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                   patch_size=patch_size)


_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
          # small sizes for the CPU demo and the tests
          "Demo": (4, 96, 4), "Micro": (3, 32, 2)}
SiT_models = {f"SiT-{name}/{p}": _sit(*dims, p) for name, dims in _SIZES.items() for p in (2, 4, 8)}


def build(name: str, **kwargs) -> SiT:
    if name not in SiT_models:
        raise ValueError(f"model.name {name!r} is not a known SiT; "
                         f"choose one of {sorted(SiT_models)}")
    return SiT_models[name](**kwargs)


# ----------------------------------------------------------------------------- checkpoints
#
# Layouts we meet, and what they say about time (facts from the public reference code):
# - ours: export {name, model_config, step, ema}; training checkpoint {step, model, ema, opt,
#   heads, meter}. SiT time.
# - official SiT release (willisma/SiT download.py): a bare state_dict, learn_sigma=True (8 output
#   channels). SiT train.py: {model, ema, opt, args}. SiT time.
# - REPA (sihyun-yu/REPA train.py): {model, ema, opt, args, steps}; its SiT always holds
#   `projectors.*` (the REPA MLPs) and outputs 4 channels; the released REPA weights are a bare
#   state_dict with `projectors.*`; `--legacy` files name later blocks `decoder_blocks.*`.
#   SRA (vvvvvjdy/SRA, built on REPA): {model, ema, opt, args, epoch, steps}, an `ap_head.*`
#   head. REG (Martinser/REG, built on REPA): REPA's layout, and the class token's modules
#   `cls_projectors2.*`, `wg_norm.*`, `final_layer.linear_cls.*`, a position embedding one slot
#   longer. All three train in reversed time (1 = noise) and predict eps - x.

Convention = Literal["sit", "repa"]
# modules only REPA-family networks have
REPA_ONLY_PREFIXES = ("projectors.", "ap_head.", "decoder_blocks.")
# top-level keys only our own files have
OWN_KEYS = frozenset({"name", "model_config", "step", "heads"})
# training-only weights, dropped at inference (ours: `projector.*`)
TRAINING_ONLY_PREFIXES = ("projectors.", "ap_head.", "projector.")
# REPA, SRA and SiT training scripts store their command line (an argparse.Namespace of plain
# values) under "args"; every other object in these files is a type weights_only accepts
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or whose layout does not tell its convention."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint whose unpickling would call code that is not on the allowed list: not damage,
    a file someone made so."""


def _unsafe_globals(path, error: Exception) -> list[str]:
    """What weights_only refused: every unsafe global of a zip-format file, else the first one
    the message names (legacy format); none for bytes that are no pickle at all."""
    try:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if n not in allowed]
    except Exception:  # legacy (non-zip) format
        return re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))


def read_checkpoint(path) -> dict:
    """A checkpoint's dict, unpickled with weights_only: an untrusted file cannot run code.
    :class:`UnsafeCheckpoint` for a file that would run code, :class:`CheckpointError` naming the
    file for one that cannot be read (truncated, not a torch file)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if names := _unsafe_globals(path, e):
            raise UnsafeCheckpoint(
                f"{path}: refused to load: unsupported global {', '.join(names)}. Only tensors, "
                "plain containers, numbers, strings and argparse.Namespace are read from "
                "checkpoints; if you trust the file, re-save its weights as a plain "
                "state_dict") from None
        raise CheckpointError(f"{path}: not a torch checkpoint (its bytes are no pickle): "
                              "damaged, or another kind of file") from None
    except (RuntimeError, EOFError) as e:  # torch's zip reader on a cut or garbled file
        raise CheckpointError(f"{path}: cannot be read ({str(e).splitlines()[0]}): truncated or "
                              "damaged; save or copy it again") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a state_dict or a training checkpoint (a dict), "
                              f"got {type(ckpt).__name__}")
    return ckpt


def stored_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The network weights as stored: EMA, else the raw model, else the file itself (a bare
    state_dict), with DDP's ``module.`` prefix removed."""
    state = checkpoint.get("ema", checkpoint.get("model", checkpoint))
    return {k.removeprefix("module."): v for k, v in state.items()}


def inference_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The SiT weights of a checkpoint in any layout above, training-only heads dropped."""
    return {k: v for k, v in stored_state(checkpoint).items()
            if not k.startswith(TRAINING_ONLY_PREFIXES)}


def _learns_sigma(state: dict[str, torch.Tensor], channels: int = 4) -> bool:
    patch = state["x_embedder.proj.weight"].shape[-1]
    return state["final_layer.linear.weight"].shape[0] == 2 * channels * patch * patch


def detect_convention(checkpoint: dict, source: str = "checkpoint") -> Convention:
    """The time convention a checkpoint was trained in, read off its layout (rules above)."""
    state = stored_state(checkpoint)
    if any(k.startswith(REPA_ONLY_PREFIXES) for k in state):
        return "repa"
    if "steps" in checkpoint:  # REPA and SRA count "steps"; SiT stores no count, we "step"
        return "repa"
    if OWN_KEYS & checkpoint.keys() or "args" in checkpoint:  # ours, or SiT's train.py
        return "sit"
    bare = "ema" not in checkpoint and "model" not in checkpoint
    if bare and _learns_sigma(state):  # the official SiT release; REPA/SRA output 4 channels
        return "sit"
    raise CheckpointError(
        f"{source}: cannot tell whether these weights run in SiT time or REPA time: the file has "
        "no REPA/SRA heads, no REPA 'steps' count, none of our keys, and is not an 8-channel "
        "official SiT state_dict; set sample.convention to 'sit' or 'repa'")


class ReversedTime(nn.Module):
    """A REPA-time network (s = 1 - t, 1 = noise, predicts eps - x) as a SiT-time velocity
    network: v(x, t) = -net(x, 1 - t), so every sampler and CFG run it unchanged."""

    def __init__(self, net: SiT):
        super().__init__()
        self.net = net
        # what the samplers and the sample stage read off a model
        self.num_classes, self.in_channels = net.num_classes, net.in_channels
        self.input_size, self.patch_size = net.input_size, net.patch_size
        self.hidden_size, self.cls_dim = net.hidden_size, net.cls_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                cls: torch.Tensor | None = None):
        if cls is None:
            return -self.net(x, 1 - t, y)
        v, cls_v = self.net(x, 1 - t, y, cls=cls)
        return -v, -cls_v

    def tokens(self, patches: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        return -self.net.tokens(patches, 1 - t, y, pos)


def from_state(name: str, state: dict[str, torch.Tensor], **kwargs) -> SiT:
    """``name`` with the weights ``state`` (ours, SiT's, REPA's, REG's), its class count, output
    width, class token and grid read off them."""
    kwargs.setdefault("learn_sigma", _learns_sigma(state, kwargs.get("in_channels", 4)))
    kwargs.setdefault("num_classes", state["y_embedder.embedding_table.weight"].shape[0] - 1)
    if "cls_projectors2.weight" in state:  # REG's class token: one more position
        kwargs.setdefault("cls_dim", state["cls_projectors2.weight"].shape[1])
    patches = state["pos_embed"].shape[1] - int(kwargs.get("cls_dim") is not None)
    kwargs.setdefault("input_size", int(round(patches ** 0.5))
                      * state["x_embedder.proj.weight"].shape[-1])
    model = build(name, **kwargs)
    model.load_state_dict(state)
    return model
