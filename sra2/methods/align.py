"""SRA 2 (params section ``align``): a per-token MLP maps the hidden state after block k to the
VAE latent of the same image (the posterior sample the SiT is trained on, or its mean).

The projector's output per token has p*p*C values, laid out like SiT's final layer, so comparing
it with the patchified target is the same as unpatchifying it and comparing with the 4x32x32
latent. Every element-wise loss is averaged over N = C*H*W and the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sra2.config.params import Align, Config
from sra2.methods.method import Method, Pass, Row
from sra2.model.sit import SiT, patchify


def build_projector(dim: int, out_dim: int, depth: int, width: int) -> nn.Sequential:
    """``depth`` (>= 1) Linear layers with SiLU between them: dim -> width -> ... -> out_dim."""
    sizes = [dim] + [width] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.SiLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


def projector_for(model: SiT, cfg: Align) -> nn.Sequential:
    """The projector of ``model``'s tokens to latent patches (which block it reads does not
    change it)."""
    out = model.patch_size ** 2 * model.in_channels
    return build_projector(model.hidden_size, out, cfg.depth, cfg.width or 2 * model.hidden_size)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
                   beta: float) -> torch.Tensor:
    """Per-sample loss between token tensors (N, T, p*p*C); element-wise kinds average over all
    elements, ``cosine`` is 1 - cosine similarity per token, averaged over tokens."""
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean(dim=1)
    if kind == "smooth_l1":
        per_element = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    elif kind == "l1":
        per_element = (pred - target).abs()
    elif kind == "l2":
        per_element = (pred - target).square()
    else:
        raise ValueError(f"align.loss must be smooth_l1, l1, l2 or cosine, got {kind!r}")
    return per_element.flatten(1).mean(dim=1)


def sra2_loss(projector: nn.Module, hidden: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
              cfg: Align, patch: int) -> torch.Tensor:
    """lambda-free alignment loss: batch mean of per-sample losses, zero where t is outside
    [t_min, t_max] (those samples still count in the batch mean)."""
    per_sample = alignment_loss(projector(hidden), patchify(target, patch), cfg.loss, cfg.beta)
    inside = ((t >= cfg.t_min) & (t <= cfg.t_max)).to(per_sample.dtype)
    return (per_sample * inside).mean()


class Sra2Method(Method):
    name, title, always_signed = "align", "SRA 2", True
    # SRA 2 + REPA: published only as 3.1 / 1.9 / 1.1 below REPA at 100K / 200K / 400K on
    # another setting
    rows = {"3": (Row("sra2", "SRA 2 (VAE latent, block 2)", {"align.enabled": True}, 28.89),
                  Row("sra2-repa", "SRA 2 + REPA", {"align.enabled": True, "repa.enabled": True},
                      None))}

    def describe(self, cfg: Config) -> str:
        a = cfg.align
        return f"SRA 2 (block {a.layer}, {a.loss}, weight {a.weight}, t in [{a.t_min}, {a.t_max}])"

    def blocks(self, cfg: Config) -> dict[str, int]:
        return {"align.layer": cfg.align.layer}

    def head(self, model: SiT, cfg: Config) -> nn.Module:
        return projector_for(model, cfg.align)

    def inputs(self, cfg, aid, batch, common, drawn) -> dict[str, torch.Tensor]:
        mean = batch["mean"] * cfg.vae.scale
        return {"target": common["x1"] if cfg.align.target == "sample" else mean}

    def losses(self, cfg, aid, head, step: Pass, inputs) -> list[torch.Tensor]:
        return [sra2_loss(head, step.patches(cfg.align.layer), inputs["target"], step.t,
                          cfg.align, step.model.patch_size)]


METHOD = Sra2Method()
