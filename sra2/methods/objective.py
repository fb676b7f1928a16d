"""The training objective: L = velocity + the weighted terms of the methods a run has on
(:mod:`sra2.methods.registry`; each method's module says what its terms are).

The SiT runs once and hands every method the hidden states it reads. One step's losses travel as
one tensor ``[total, velocity, *terms]`` whose names are :attr:`Objective.names` (``loss``,
``loss_velocity``, ``loss_<term>``): the metrics log's columns, the Prefect table and the loss plot
follow them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sra2.config.params import Config
from sra2.methods import registry
from sra2.methods.method import Pass
from sra2.model.sit import SiT
from sra2.model.transport import interpolate


def names(cfg: Config) -> list[str]:
    """The step's loss columns: total, velocity, then each term of each method on."""
    terms = [term for m in registry.active(cfg) for term in m.terms(cfg)]
    return ["loss", "loss_velocity", *(f"loss_{term}" for term in terms)]


def weights(cfg: Config, epoch: int) -> list[float] | None:
    """The weights of the terms after ``epoch`` whole epochs, where a method on schedules them;
    None where every weight is constant (the objective then takes :func:`names`' own)."""
    on = registry.active(cfg)
    if not any(m.scheduled(cfg) for m in on):
        return None
    return [w for m in on for w in m.terms(cfg, epoch).values()]


def model_options(cfg: Config) -> dict[str, Any]:
    """What the methods on need the SiT built with."""
    return {k: v for m in registry.active(cfg) for k, v in m.model_options(cfg).items()}


def build_heads(model: SiT, cfg: Config) -> nn.ModuleDict:
    """The trained head of each method on, by its name, built in registry order."""
    return nn.ModuleDict({m.name: m.head(model, cfg) for m in registry.active(cfg)})


def inputs(cfg: Config, aids: dict, batch: dict, common: dict[str, torch.Tensor],
           drawn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The methods' per-sample inputs of a step, as ``<method>/<name>``: what
    :meth:`Objective.forward` takes beside the ``common`` inputs (``x1``, ``y``, ``t``, ``x0``)."""
    found = {}
    for m in registry.active(cfg):
        for key, value in m.inputs(cfg, aids.get(m.name), batch, common,
                                   own(drawn, m.name)).items():
            found[f"{m.name}/{key}"] = value
    return found


def own(tensors: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """The tensors ``<method>/<name>`` of ``tensors``, by their own names."""
    prefix = f"{method}/"
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


class Objective(nn.Module):
    """The SiT and the methods' heads as one module, so that DDP sees every trained parameter;
    what the methods load once (``aids``: an EMA teacher, an encoder) is kept outside the module
    tree: it is neither trained nor synchronised, only read."""

    def __init__(self, model: SiT, heads: nn.ModuleDict, cfg: Config, aids: dict | None = None):
        super().__init__()
        self.model, self.heads, self.cfg = model, heads, cfg
        self.methods, self.names = registry.active(cfg), names(cfg)
        self._aids = [aids or {}]  # a list: not submodules
        # what every step asks the SiT for, and the terms' weights where none is scheduled
        self.blocks = tuple(sorted({next(iter(m.blocks(cfg).values()))
                                    for m in self.methods if m.blocks(cfg)}))
        self.constant = [w for m in self.methods for w in m.terms(cfg).values()]

    def forward(self, batch: dict[str, torch.Tensor],
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """``batch``: ``x1`` (latents), ``y``, ``t``, ``x0`` (noise) and the methods' inputs
        (:func:`inputs`); ``weights``: the terms' weights of this step, where they are scheduled
        (:func:`weights`; a tensor, so that a compiled objective is not compiled again)."""
        x1, y, t, x0 = batch["x1"], batch["y"], batch["t"], batch["x0"]
        inputs = {m.name: own(batch, m.name) for m in self.methods}
        options = {k: v for m in self.methods
                   for k, v in m.forward_options(inputs[m.name]).items()}
        xt, u = interpolate(x0, x1, t)
        step = Pass(self.model, x1, x0, t, y, self.model.run(xt, t, y, self.blocks, **options))
        values = [(step.out.v.float() - u.float()).square().flatten(1).mean(1).mean()]
        for m in self.methods:
            values += m.losses(self.cfg, self._aids[0].get(m.name), self.heads[m.name], step,
                               inputs[m.name])
        scale = self.constant if weights is None else weights.unbind()
        total = values[0] + sum(w * v for w, v in zip(scale, values[1:]))
        return torch.stack([total, *values])
