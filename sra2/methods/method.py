"""A training method: what an alignment method adds to the SiT's velocity loss, as one object.

The training loop, the objective, the checks, the FLOP count and the paper's tables ask the
registered methods (:mod:`sra2.methods.registry`) and name none of them. A method says, in its own
module, everything it brings:

- its name: the columns of its loss terms (``loss_<name>``...) and its params.yaml section;
- whether a run has it on, and its settings in words;
- the SiT blocks it reads, by their params keys (checked in one place,
  :func:`sra2.methods.registry.problems`), and its checks across sections;
- what it trains beside the SiT (its head), and what the SiT itself must hold (REG's class token);
- what each step needs: its random draws (taken after the common ones, so that runs without it
  keep theirs), what it loads once per run (an EMA teacher, an encoder), its per-sample inputs
  and what it hands the SiT's forward pass;
- its loss terms, their names and weights;
- its FLOPs per training image;
- the rows it adds to the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sra2.config.params import Config, result_settings
from sra2.model.flops import count_flops
from sra2.model.sit import Output, SiT


@dataclass(frozen=True)
class Row:
    """A row of one of the paper's tables: a run of the table's preset with ``changes``."""

    name: str  # the experiment's name: letters, digits, '-' and '.' (a git ref component)
    label: str  # the row as the paper's table reads
    changes: dict[str, Any]  # params.yaml keys (section.key) and the values that make this row
    fid: float | None  # the published FID-50K at the table's setting (None: not published)
    published: dict[str, float] = field(default_factory=dict)  # its other numbers (pickscore)


@dataclass
class Pass:
    """One step's forward pass, what every method's loss reads: its inputs (``x1`` the latents,
    ``x0`` the noise, ``t`` the times, ``y`` the labels) and the SiT's :class:`Output`."""

    model: SiT
    x1: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    out: Output

    def patches(self, block: int) -> torch.Tensor:
        """The stream after ``block``, patch tokens only (a class token in front left out)."""
        return self.out.hidden[block][:, self.model.extra_tokens:]


class Method:
    """The base every method fills in; a method that needs nothing of a hook keeps the default."""

    name: str = ""  # its params.yaml section, and its first loss column loss_<name>
    title: str = ""  # in words: "SRA 2"
    # its settings enter every run's signature, on or off: runs made before other methods existed
    # keep their checkpoint folders (SRA 2 only)
    always_signed: bool = False
    rows: dict[str, tuple[Row, ...]] = {}  # the paper's table number -> the rows this method adds

    def section(self, cfg: Config):
        return getattr(cfg, self.name)

    def on(self, cfg: Config) -> bool:
        return self.section(cfg).enabled

    def settings(self, cfg: Config) -> dict[str, Any]:
        """What its results depend on: its part of a run's signature (its checkpoint folder)."""
        return result_settings(self.section(cfg))

    def describe(self, cfg: Config) -> str:
        return self.title

    def blocks(self, cfg: Config) -> dict[str, int]:
        """The 1-based SiT blocks it reads, by params key; the first is the one its head reads."""
        return {}

    def problems(self, cfg: Config) -> list[str]:
        """What is wrong with its settings against the other sections (one line a problem)."""
        return []

    def terms(self, cfg: Config, epoch: int = 0) -> dict[str, float]:
        """Its loss terms: column suffix (``loss_<suffix>``) -> weight in the total, after
        ``epoch`` whole epochs of the dataset."""
        return {self.name: self.section(cfg).weight}

    def scheduled(self, cfg: Config) -> bool:
        """Whether its weights change with the epoch."""
        return False

    def model_options(self, cfg: Config) -> dict[str, Any]:
        """What the SiT must be built with (keyword arguments of :class:`SiT`)."""
        return {}

    def head(self, model: SiT, cfg: Config) -> nn.Module:
        """What it trains beside the SiT (saved and restored with it, never exported)."""
        return nn.Identity()

    def needs_images(self, cfg: Config) -> bool:
        """Whether a step needs the training images (the store encoded with encode.pixels)."""
        return False

    def draws(self, cfg: Config, g: torch.Generator, n: int, shape: tuple,
              device: torch.device) -> dict[str, torch.Tensor]:
        """Its random tensors of a step, for the whole global batch of ``n``, from the step's
        generator ``g`` (after the common draws and those of the methods before it)."""
        return {}

    def prepare(self, cfg: Config, model: SiT, ema: SiT, device: torch.device) -> Any:
        """What it loads once per run (handed back to :meth:`inputs` and :meth:`losses`)."""
        return None

    def inputs(self, cfg: Config, aid: Any, batch: dict, common: dict[str, torch.Tensor],
               drawn: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Its per-sample tensors of a step (split into micro-batches like the latents): from the
        ``batch`` read, the step's ``common`` inputs (``x1``, ``y``, ``t``, ``x0``) and its own
        ``drawn`` tensors."""
        return {}

    def forward_options(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keyword arguments it adds to the SiT's forward pass (:meth:`SiT.run`)."""
        return {}

    def losses(self, cfg: Config, aid: Any, head: nn.Module, step: Pass,
               inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The value of each of its :meth:`terms`, in their order."""
        raise NotImplementedError

    def flops(self, cfg: Config, model: SiT, head: nn.Module) -> tuple[int, int]:
        """FLOPs per training image: (what it adds to the trained forward pass, its forward passes
        without gradients). The default: the head on one image's patch tokens."""
        return count_flops(head, self.tokens(model)), 0

    @staticmethod
    def tokens(model: SiT, extra: int = 0) -> torch.Tensor:
        """A stream of one image on the model's device: its patch tokens and ``extra`` more."""
        param = next(model.parameters())
        count = (model.input_size // model.patch_size) ** 2 + extra
        return torch.zeros(1, count, model.hidden_size, dtype=param.dtype, device=param.device)

