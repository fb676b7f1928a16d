"""REPA (params section ``repa``): a projector Linear(D, W), SiLU, Linear(W, W), SiLU,
Linear(W, 768) on the hidden state after ``repa.layer`` matches the DINOv2 patch tokens of the
image: minus the cosine per token, averaged over tokens and batch. It reads the training images:
the store must be encoded with ``encode.pixels``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sra2.config.params import Config
from sra2.methods.align import build_projector
from sra2.methods.method import Method, Pass, Row
from sra2.model.sit import SiT

ENCODER_DIM = 768  # DINOv2 ViT-B/14's feature width


def repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the cosine of each token's projection and target, averaged over tokens and batch."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def load_features(section, model: SiT, device: torch.device):
    """images -> DINOv2's tokens (sra2.model.dinov2.features) for ``model``'s token grid, with
    the encoder ``section`` (repa or reg) names loaded."""
    from sra2.model import dinov2  # timm takes seconds to import: only the runs that need it pay

    encoder = dinov2.load_encoder(section, device, model.input_size // model.patch_size)
    return functools.partial(dinov2.features, encoder)


def encoder_flops(model: SiT) -> int:
    from sra2.model import dinov2

    return dinov2.forward_flops(model.input_size // model.patch_size)


class RepaMethod(Method):
    name, title = "repa", "REPA"
    # REPA's own paper at SiT-B/2 400K (reproductions found 27.3 and 22.75)
    rows = {"3": (Row("repa", "REPA (DINOv2 ViT-B/14, block 4)",
                      {"align.enabled": False, "repa.enabled": True}, 24.4),)}

    def describe(self, cfg: Config) -> str:
        r = cfg.repa
        return f"REPA (block {r.layer}, {r.encoder}, weight {r.weight})"

    def blocks(self, cfg: Config) -> dict[str, int]:
        return {"repa.layer": cfg.repa.layer}

    def head(self, model: SiT, cfg: Config) -> nn.Module:
        return build_projector(model.hidden_size, ENCODER_DIM, 3, cfg.repa.width)

    def needs_images(self, cfg: Config) -> bool:
        return True

    def prepare(self, cfg, model, ema, device):
        return load_features(cfg.repa, model, device)

    def inputs(self, cfg, aid, batch, common, drawn) -> dict[str, torch.Tensor]:
        return {"target": aid(batch["images"])}

    def losses(self, cfg, aid, head, step: Pass, inputs) -> list[torch.Tensor]:
        return [repa_loss(head(step.patches(cfg.repa.layer)), inputs["target"])]

    def flops(self, cfg, model, head) -> tuple[int, int]:
        trained, _ = super().flops(cfg, model, head)
        return trained, encoder_flops(model)


METHOD = RepaMethod()
