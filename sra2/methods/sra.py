"""SRA (params section ``sra``), self-representation alignment with an EMA teacher: a head
Linear(D, 2D), SiLU, Linear(2D, D) on the hidden state after ``sra.student_block`` predicts the
EMA model's hidden state after ``sra.teacher_block``. The teacher, without gradients, sees the same
noise and labels at the time t + t_max x U(0, 1) (clamped to 1: toward the data, SiT time), and
its forward stops at its block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sra2.config.params import Config, result_settings
from sra2.methods.align import build_projector
from sra2.methods.method import Method, Pass, Row
from sra2.model.flops import count_flops
from sra2.model.sit import SiT
from sra2.model.transport import interpolate


def sra_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """SRA's loss between (N, T, D) tokens: smooth-L1 averaged over every element; ``cosine``,
    1 - cosine over the feature axis, averaged over tokens and batch; ``cosine_tokens``, as SRA's
    repository computes it, 1 - cosine over the token axis (its ``F.cosine_similarity(a, b)`` on
    (N, T, D) takes dim 1), averaged over features and batch."""
    pred, target = pred.float(), target.float()
    if kind in ("cosine", "cosine_tokens"):
        return (1 - F.cosine_similarity(pred, target, dim=-1 if kind == "cosine" else 1)).mean()
    return F.smooth_l1_loss(pred, target, beta=beta)


def repository_weight(weight: float, epoch: int) -> float:
    """SRA's repository's weight at 256 px after ``epoch`` whole epochs: ``weight`` up to epoch
    149, then weight x 0.1^((epoch - 149) / 1000 + 1) (a tenth at once, then slowly less)."""
    return weight if epoch <= 149 else weight * 0.1 ** ((epoch - 149) / 1000 + 1)


def teacher_time(t: torch.Tensor, shift: torch.Tensor, t_max: float) -> torch.Tensor:
    """SRA's teacher time in SiT time: moved toward the data (t = 1) by t_max x U(0, 1)."""
    return (t + t_max * shift).clamp(max=1.0)


class SraMethod(Method):
    name, title = "sra", "SRA"
    rows = {"3": (Row("sra", "SRA (EMA teacher, block 3 -> 8)",
                      {"align.enabled": False, "sra.enabled": True}, None),)}

    def describe(self, cfg: Config) -> str:
        s = cfg.sra
        schedule = ", the repository's schedule" if self.scheduled(cfg) else ""
        return (f"SRA (blocks {s.student_block} -> {s.teacher_block}, {s.loss}, "
                f"weight {s.weight}{schedule})")

    def terms(self, cfg: Config, epoch: int = 0) -> dict[str, float]:
        s = cfg.sra
        return {"sra": repository_weight(s.weight, epoch) if self.scheduled(cfg) else s.weight}

    def scheduled(self, cfg: Config) -> bool:
        return cfg.sra.weight_schedule == "repository"

    def settings(self, cfg: Config) -> dict:
        # the schedule enters the signature only when on: runs made before it keep their folders
        return result_settings(cfg.sra, exclude=() if self.scheduled(cfg) else {"weight_schedule"})

    def blocks(self, cfg: Config) -> dict[str, int]:
        return {"sra.student_block": cfg.sra.student_block,
                "sra.teacher_block": cfg.sra.teacher_block}

    def head(self, model: SiT, cfg: Config) -> nn.Module:
        d = model.hidden_size
        return build_projector(d, d, 2, 2 * d)

    def draws(self, cfg, g, n, shape, device) -> dict[str, torch.Tensor]:
        return {"shift": torch.rand(n, generator=g, device=device)}

    def prepare(self, cfg, model, ema, device) -> SiT:
        return ema  # the teacher: read, never trained

    def inputs(self, cfg, aid, batch, common, drawn) -> dict[str, torch.Tensor]:
        return {"shift": drawn["shift"]}

    def losses(self, cfg, aid: SiT, head, step: Pass, inputs) -> list[torch.Tensor]:
        s = cfg.sra
        with torch.no_grad():
            t = teacher_time(step.t, inputs["shift"], s.t_max)
            xt, _ = interpolate(step.x0, step.x1, t)
            target = aid.hidden_after(xt, t, step.y, s.teacher_block)
        return [sra_loss(head(step.patches(s.student_block)), target, s.loss, s.beta)]

    def flops(self, cfg, model, head) -> tuple[int, int]:
        trained, _ = super().flops(cfg, model, head)
        x = torch.zeros(1, model.in_channels, model.input_size, model.input_size,
                        device=next(model.parameters()).device)
        t, y = x.new_zeros(1), torch.zeros(1, dtype=torch.long, device=x.device)
        return trained, count_flops(model.hidden_after, x, t, y, cfg.sra.teacher_block)


METHOD = SraMethod()
