"""The two families of velocity networks, picked by ``model.name``: SiT (``SiT-B/2``: class
labels, :mod:`sra2.model.sit`) and MMDiT (``MMDiT-D24/2``: caption contexts,
:mod:`sra2.model.mmdit`)."""

from __future__ import annotations

import torch
from torch import nn

from sra2.model import mmdit, sit

# every network by name: a constructor whose keywords say its depth and patch size
MODELS = {**sit.SiT_models, **mmdit.MMDiT_models}


def family(name: str) -> str:
    """``sit`` or ``mmdit``; a name of neither is refused with the names there are."""
    if name in sit.SiT_models:
        return "sit"
    if name in mmdit.MMDiT_models:
        return "mmdit"
    raise ValueError(f"model.name {name!r} is not a known network; choose one of "
                     f"{sorted(sit.SiT_models) + sorted(mmdit.MMDiT_models)}")


def build(name: str, context_dim: int | None = None, **kwargs) -> nn.Module:
    """Network ``name``; an MMDiT reads contexts of ``context_dim`` and has no classes."""
    if family(name) == "mmdit":
        kwargs.pop("num_classes", None)
        return mmdit.build(name, **kwargs, **({"context_dim": context_dim} if context_dim else {}))
    return sit.build(name, **kwargs)


def example_condition(model: nn.Module, length: int = 77) -> torch.Tensor:
    """One condition of the kind ``model`` takes (zeros): a label, or a caption context of
    ``length`` tokens (FLOP counts)."""
    if getattr(model, "context_dim", None) is None:
        return torch.zeros(1, dtype=torch.long)
    return torch.zeros(1, length, model.context_dim)


def load_checkpoint(name: str, path_or_state, *, convention: str = "auto",
                    source: str | None = None, **kwargs) -> nn.Module:
    """Build ``name``, load the weights and return a velocity network in SiT time: the network
    itself, or wrapped in :class:`sra2.model.sit.ReversedTime` when the weights are in REPA time.
    ``auto`` reads the convention off the layout (:func:`sra2.model.sit.detect_convention`); the
    architecture's other sizes follow the weights."""
    ckpt = path_or_state
    if not isinstance(ckpt, dict):
        ckpt = sit.read_checkpoint(path_or_state)
        source = source or str(path_or_state)
    if convention == "auto":
        convention = sit.detect_convention(ckpt, source or "checkpoint")
    if convention not in ("sit", "repa"):
        raise ValueError(f"convention must be auto, sit or repa, got {convention!r}")
    loader = mmdit.from_state if family(name) == "mmdit" else sit.from_state
    model = loader(name, sit.inference_state_dict(ckpt), **kwargs)
    return sit.ReversedTime(model) if convention == "repa" else model
