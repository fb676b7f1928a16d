"""REG (params section ``reg``), representation entanglement for generation: DINOv2's class token
of the image enters the SiT as one more token, and the SiT learns to denoise it with the latent.

Each step the class token c (``x_norm_clstoken``, 768 values) is noised on the latent's path at
the same time t with its own noise e: c_t = t c + (1 - t) e (SiT time), embedded by
Linear(768, D) and a LayerNorm, and put in front of the patch tokens (its position embedding a
slot of zeros; :class:`sra2.model.sit.SiT` with ``cls_dim``). The final layer gives its velocity
through its own Linear(D, 768). The loss adds to the velocity MSE

- ``loss_reg``: REPA's projection term (weight ``reg.weight``, 0.5) on the hidden state after
  ``reg.layer``, every token (the class token's too) against DINOv2's class token followed by its
  patch tokens: minus the cosine per token, averaged over tokens and batch;
- ``loss_reg_cls``: the class token's velocity MSE against c - e, averaged over its 768 values
  and the batch (weight ``reg.cls_weight``, 0.03).

Sampling denoises the class token jointly with the latent (sra2.sample.joint). Facts from the
authors' code (Martinser/REG: ``models/sit.py``, ``loss.py``, ``train.py``, ``samplers.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from sra2.config.params import Config
from sra2.methods.align import build_projector
from sra2.methods.method import Method, Pass, Row
from sra2.methods.repa import ENCODER_DIM, encoder_flops, load_features, repa_loss
from sra2.model.flops import count_flops
from sra2.model.networks import family
from sra2.model.sit import SiT
from sra2.model.transport import interpolate


class RegMethod(Method):
    name, title = "reg", "REG"
    # REG's paper at SiT-B/2 400K without guidance (its SiT-XL/2 at 800 epochs with guidance:
    # FID 1.36, IS 299.4)
    rows = {"3": (Row("reg", "REG (DINOv2 class token entangled, block 4)",
                      {"align.enabled": False, "reg.enabled": True}, 15.2),)}

    def describe(self, cfg: Config) -> str:
        r = cfg.reg
        return (f"REG (block {r.layer}, {r.encoder}, weight {r.weight}, class token weight "
                f"{r.cls_weight})")

    def blocks(self, cfg: Config) -> dict[str, int]:
        return {"reg.layer": cfg.reg.layer}

    def problems(self, cfg: Config) -> list[str]:
        if cfg.repa.enabled:  # two projections to DINOv2 from the same run: not a paper method
            return ["reg.enabled: REG holds REPA's projection term already; turn repa.enabled "
                    "off (got True)"]
        if family(cfg.model.name) != "sit":  # its class token enters a SiT's one stream
            return [f"reg.enabled: REG trains a SiT with a class token; model.name is "
                    f"{cfg.model.name!r}, an MMDiT (got True)"]
        return []

    def terms(self, cfg: Config) -> dict[str, float]:
        return {"reg": cfg.reg.weight, "reg_cls": cfg.reg.cls_weight}

    def model_options(self, cfg: Config) -> dict:
        return {"cls_dim": ENCODER_DIM}

    def head(self, model: SiT, cfg: Config) -> nn.Module:
        return build_projector(model.hidden_size, ENCODER_DIM, 3, cfg.reg.width)

    def needs_images(self, cfg: Config) -> bool:
        return True

    def draws(self, cfg, g, n, shape, device) -> dict[str, torch.Tensor]:
        return {"noise": torch.randn((n, ENCODER_DIM), generator=g, device=device)}

    def prepare(self, cfg, model, ema, device):
        features = load_features(cfg.reg, model, device)
        return lambda images: features(images, with_cls=True)

    def inputs(self, cfg, aid, batch, common, drawn) -> dict[str, torch.Tensor]:
        target = aid(batch["images"])  # (N, 1 + T, 768): the class token first
        cls_t, cls_u = interpolate(drawn["noise"], target[:, 0], common["t"])
        return {"target": target, "cls_t": cls_t, "cls_u": cls_u}

    def forward_options(self, inputs) -> dict[str, torch.Tensor]:
        return {"cls": inputs["cls_t"]}

    def losses(self, cfg, aid, head, step: Pass, inputs) -> list[torch.Tensor]:
        project = repa_loss(head(step.out.hidden[cfg.reg.layer]), inputs["target"])
        cls = (step.out.cls_v.float() - inputs["cls_u"].float()).square().mean(1).mean()
        return [project, cls]

    def flops(self, cfg, model, head) -> tuple[int, int]:
        """The head on every token, the class token through the SiT, and DINOv2."""
        like = next(model.parameters())
        x = torch.zeros(1, model.in_channels, model.input_size, model.input_size,
                        dtype=like.dtype, device=like.device)
        t, y = x.new_zeros(1), torch.zeros(1, dtype=torch.long, device=x.device)
        token = count_flops(lambda: model(x, t, y, cls=x.new_zeros(1, ENCODER_DIM)))
        trained = count_flops(head, self.tokens(model, 1)) + token - count_flops(model, x, t, y)
        return trained, encoder_flops(model)


METHOD = RegMethod()
