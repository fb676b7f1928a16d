"""MMDiT (SD3's joint blocks) as REPA's text-to-image run builds it, with REPA's parameter names so
that its checkpoints load unchanged: the caption's context tokens and the latent's patch tokens
are two streams with weights of their own that meet in one attention over [context; image] in
every block. The time embedding alone conditions the adaLN (no pooled caption vector); the last
block's context stream only gives keys and values. Width 32 x depth and one head per block
(REPA: depth 24, width 768, 24 heads); the context enters through one Linear.

Like :class:`sra2.model.sit.SiT` it runs as ``run(x, t, y, blocks) -> Output``, with the
condition ``y`` a caption context (N, tokens, context_dim) instead of a label, and the hidden
state after block k the image stream's, which the alignment heads read.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sra2.model.sit import (
    FinalLayer,
    Mlp,
    Output,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    sincos_2d,
    unpatchify,
)


class JointAttention(nn.Module):
    """The projections of one stream; the attention itself spans both (:class:`JointBlock`)."""

    def __init__(self, dim: int, pre_only: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)


class Stream(nn.Module):
    """One stream of a joint block (SD3's DismantledBlock): adaLN (shift, scale, gate of the
    attention, then of the MLP) around the shared attention; ``pre_only``: queries, keys and
    values only (the last block's context)."""

    def __init__(self, dim: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(dim, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        chunks = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))

    def before(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(q | k | v of the modulated stream (N, L, 3D), the modulation the rest needs)."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        return self.attn.qkv(modulate(self.norm1(h), mod[0], mod[1])), mod[2:]

    def after(self, h: torch.Tensor, attended: torch.Tensor, mod: tuple) -> torch.Tensor:
        gate_a, shift_m, scale_m, gate_m = mod
        h = h + gate_a.unsqueeze(1) * self.attn.proj(attended)
        return h + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_m, scale_m))


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.heads = heads
        self.context_block = Stream(dim, mlp_ratio, pre_only=last)
        self.x_block = Stream(dim, mlp_ratio)

    def forward(self, context: torch.Tensor, x: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        qkv_c, mod_c = self.context_block.before(context, c)
        qkv_x, mod_x = self.x_block.before(x, c)
        n, length, width = qkv_c.shape[0], qkv_c.shape[1] + qkv_x.shape[1], qkv_x.shape[2] // 3
        q, k, v = (torch.cat([qkv_c, qkv_x], dim=1)
                   .view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
        to_context, to_x = attended.split([context.shape[1], x.shape[1]], dim=1)
        x = self.x_block.after(x, to_x, mod_x)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.after(context, to_context, mod_c), x


class MMDiT(nn.Module):
    # what the samplers, the sample stage and REPA-time wrapping read off a network
    num_classes = None
    cls_dim = None
    extra_tokens = 0  # before the image's tokens in its stream

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 depth: int = 24, hidden_size: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, context_dim: int = 768, learn_sigma: bool = False):
        super().__init__()
        hidden_size, num_heads = hidden_size or 32 * depth, num_heads or depth
        self.in_channels, self.patch_size, self.input_size = in_channels, patch_size, input_size
        self.hidden_size, self.depth, self.context_dim = hidden_size, depth, context_dim
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # a buffer in state_dict, as REPA keeps it: fixed, not trained, not averaged
        # (torch.tensor, not from_numpy: made on the default device, the meta one when counting)
        self.register_buffer("pos_embed", torch.tensor(sincos_2d(hidden_size, grid)[None],
                                                       dtype=torch.float32))
        self.joint_blocks = nn.ModuleList(JointBlock(hidden_size, num_heads, mlp_ratio,
                                                     last=i == depth - 1) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # PyTorch's default initialisation throughout, as REPA's MMDiT (no adaLN-Zero)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                return_hidden: int | None = None):
        """Velocity for latents ``x`` at times ``t`` (N,) and caption contexts ``y``; with
        ``return_hidden=k`` also the image stream after block k (1-based)."""
        out = self.run(x, t, y, () if return_hidden is None else (return_hidden,))
        return out.v if return_hidden is None else (out.v, out.hidden[return_hidden])

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
            blocks: tuple[int, ...] = (), cls: torch.Tensor | None = None) -> Output:
        """The velocity and the image stream after each of ``blocks``."""
        if cls is not None:
            raise ValueError("an MMDiT takes no class token (REG runs on SiT only)")
        h, c, context = self._embed(x, t, y)
        hidden = {}
        for i, block in enumerate(self.joint_blocks, start=1):
            context, h = block(context, h, c)
            if i in blocks:
                hidden[i] = h
        out = unpatchify(self.final_layer(h, c)[0], self.patch_size, self.out_channels)
        return Output(out[:, : self.in_channels], hidden, None)

    def hidden_after(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     block: int) -> torch.Tensor:
        """The image stream after ``block`` (1-based), the later blocks not run."""
        h, c, context = self._embed(x, t, y)
        for layer in self.joint_blocks[:block]:
            context, h = layer(context, h, c)
        return h

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        h = self.x_embedder(x) + self.pos_embed
        return h, self.t_embedder(t), self.context_embedder(y.to(h.dtype))


# REPA's MMDiT is depth 24 (D24); the rest keep its width 32 x depth and its 32-wide heads, but
# the small ones for the CPU demo and the tests
_SIZES = {"D24": (24, 768, 24), "D12": (12, 384, 12), "Demo": (4, 96, 4), "Micro": (2, 32, 2)}
MMDiT_models = {f"MMDiT-{name}/{p}": partial(MMDiT, depth=depth, hidden_size=width,
                                             num_heads=heads, patch_size=p)
                for name, (depth, width, heads) in _SIZES.items() for p in (2, 4)}


def build(name: str, **kwargs) -> MMDiT:
    return MMDiT_models[name](**kwargs)


def from_state(name: str, state: dict[str, torch.Tensor], **kwargs) -> MMDiT:
    """``name`` with the weights ``state`` (ours or REPA's), its context width and grid read off
    them."""
    kwargs.setdefault("context_dim", state["context_embedder.weight"].shape[1])
    patch = state["x_embedder.proj.weight"].shape[-1]
    kwargs.setdefault("input_size", int(round(state["pos_embed"].shape[1] ** 0.5)) * patch)
    kwargs.setdefault("learn_sigma", state["final_layer.linear.weight"].shape[0]
                      == 2 * kwargs.get("in_channels", 4) * patch * patch)
    model = build(name, **kwargs)
    model.load_state_dict(state)
    return model
