"""The training objective as named terms: L = velocity + sum of weight x term over the terms on.

- ``align`` (SRA 2): a projector on the hidden state after ``align.layer`` predicts the image's own
  VAE latent (:func:`sra2.methods.align.sra2_loss`).
- ``sra`` (SRA v1): a head Linear(D, 2D), SiLU, Linear(2D, D) on the hidden state after
  ``sra.student_block`` predicts the EMA teacher's hidden state after ``sra.teacher_block``; the
  teacher, without gradients, sees the same noise and labels at the time t + t_max x U(0, 1)
  (clamped to 1: toward the data, SiT time), and its forward stops at its block.
- ``repa`` (REPA): a projector Linear(D, W), SiLU, Linear(W, W), SiLU, Linear(W, 768) on the hidden
  state after ``repa.layer`` matches the DINOv2 patch tokens of the image: minus the cosine per
  token, averaged over tokens and batch.

The SiT runs once and hands every hidden state the terms read. One step's losses travel as one
tensor ``[total, velocity, *terms]`` whose names are :attr:`Objective.names` (``loss``,
``loss_velocity``, ``loss_<term>``): the metrics log's columns, the Prefect table and the loss plot
follow them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sra2.config.params import Config
from sra2.methods.align import build_projector, projector_for, sra2_loss
from sra2.model.sit import SiT
from sra2.model.transport import interpolate

REPA_DIM = 768  # DINOv2 ViT-B/14's feature width


@dataclass(frozen=True)
class Term:
    name: str  # its column: loss_<name>
    weight: float
    block: int  # 1-based block of the SiT whose hidden state the term reads
    # inputs beyond the latents: "teacher_t" (and the EMA), "repa_target"
    needs: tuple[str, ...] = ()


def terms(cfg: Config) -> list[Term]:
    """The alignment terms switched on, in a fixed order."""
    on = []
    if cfg.align.enabled:
        on.append(Term("align", cfg.align.weight, cfg.align.layer))
    if cfg.sra.enabled:
        on.append(Term("sra", cfg.sra.weight, cfg.sra.student_block, ("teacher_t",)))
    if cfg.repa.enabled:
        on.append(Term("repa", cfg.repa.weight, cfg.repa.layer, ("repa_target",)))
    return on


def describe(cfg: Config) -> str:
    """The methods a run trains with, in words: the terms on and their settings."""
    a, s, r = cfg.align, cfg.sra, cfg.repa
    words = {"align": f"SRA 2 (block {a.layer}, {a.loss}, weight {a.weight}, "
                      f"t in [{a.t_min}, {a.t_max}])",
             "sra": f"SRA (blocks {s.student_block} -> {s.teacher_block}, {s.loss}, "
                    f"weight {s.weight})",
             "repa": f"REPA (block {r.layer}, {r.encoder}, weight {r.weight})"}
    return " + ".join(words[t.name] for t in terms(cfg)) or "no alignment (vanilla SiT)"


def check_blocks(cfg: Config, depth: int) -> None:
    """Every block a term reads exists in a SiT of ``depth`` blocks."""
    keys = {"align": "align.layer", "sra": "sra.student_block", "repa": "repa.layer"}
    for term in terms(cfg):
        if not 1 <= term.block <= depth:
            raise ValueError(f"{keys[term.name]} must be in [1, {depth}] for this model, "
                             f"got {term.block}")
    if cfg.sra.enabled and not 1 <= cfg.sra.teacher_block <= depth:
        raise ValueError(f"sra.teacher_block must be in [1, {depth}] for this model, "
                         f"got {cfg.sra.teacher_block}")


def build_heads(model: SiT, cfg: Config) -> nn.ModuleDict:
    """The trained head of each term on."""
    check_blocks(cfg, model.depth)
    d, heads = model.hidden_size, nn.ModuleDict()
    for term in terms(cfg):
        if term.name == "align":
            heads["align"] = projector_for(model, cfg.align)
        elif term.name == "sra":
            heads["sra"] = build_projector(d, d, 2, 2 * d)
        else:
            heads["repa"] = build_projector(d, REPA_DIM, 3, cfg.repa.width)
    return heads


def sra_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """SRA v1's loss between (N, T, D) tokens: smooth-L1 averaged over every element; ``cosine``,
    1 - cosine over the feature axis, averaged over tokens and batch; ``cosine_tokens``, as SRA's
    repository computes it, 1 - cosine over the token axis (its ``F.cosine_similarity(a, b)`` on
    (N, T, D) takes dim 1), averaged over features and batch."""
    pred, target = pred.float(), target.float()
    if kind in ("cosine", "cosine_tokens"):
        return (1 - F.cosine_similarity(pred, target, dim=-1 if kind == "cosine" else 1)).mean()
    return F.smooth_l1_loss(pred, target, beta=beta)


def repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the cosine of each token's projection and target, averaged over tokens and batch."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def teacher_time(t: torch.Tensor, shift: torch.Tensor, t_max: float) -> torch.Tensor:
    """SRA's teacher time in SiT time: moved toward the data (t = 1) by t_max x U(0, 1)."""
    return (t + t_max * shift).clamp(max=1.0)


class Objective(nn.Module):
    """The SiT and the heads of the terms on as one module, so that DDP sees every trained
    parameter; the EMA teacher (SRA) is kept outside the module tree: it is neither trained nor
    synchronised, only read."""

    def __init__(self, model: SiT, heads: nn.ModuleDict, cfg: Config, teacher: SiT | None = None):
        super().__init__()
        self.model, self.heads, self.cfg, self.terms = model, heads, cfg, terms(cfg)
        self._teacher = [teacher]  # a list: not a submodule

    @property
    def names(self) -> list[str]:
        return ["loss", "loss_velocity", *(f"loss_{term.name}" for term in self.terms)]

    def forward(self, x1, y, t, x0, align_target=None, teacher_t=None,
                repa_target=None) -> torch.Tensor:
        xt, u = interpolate(x0, x1, t)
        blocks = tuple(sorted({term.block for term in self.terms}))
        if blocks:
            v, hidden = self.model(xt, t, y, return_hidden=blocks)
        else:
            v, hidden = self.model(xt, t, y), {}
        values = [(v.float() - u.float()).square().flatten(1).mean(1).mean()]
        for term in self.terms:
            h, head = hidden[term.block], self.heads[term.name]
            if term.name == "align":
                patch = self.model.patch_size
                values.append(sra2_loss(head, h, x1 if align_target is None else align_target, t,
                                        self.cfg.align, patch))
            elif term.name == "sra":
                values.append(sra_loss(head(h), self._teacher_hidden(x0, x1, y, teacher_t),
                                       self.cfg.sra.loss, self.cfg.sra.beta))
            else:
                values.append(repa_loss(head(h), repa_target))
        total = values[0] + sum(term.weight * value for term, value in zip(self.terms, values[1:]))
        return torch.stack([total, *values])

    @torch.no_grad()
    def _teacher_hidden(self, x0, x1, y, teacher_t) -> torch.Tensor:
        teacher = self._teacher[0]
        xt, _ = interpolate(x0, x1, teacher_t)
        return teacher.hidden_after(xt, teacher_t, y, self.cfg.sra.teacher_block)
