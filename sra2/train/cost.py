"""What a training image costs: parameter and FLOP counts of a SiT, of its SRA 2 projector and
of every term a run trains with (counted as :mod:`sra2.model.flops` counts).

    python -m sra2.train.cost                                 # the table for B/2, L/2 and XL/2
    python -m sra2.train.cost --model SiT-XL/2 --depth 2      # one model, a 2-layer projector
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from sra2.config.params import Config
from sra2.methods import objective, registry
from sra2.methods.align import build_projector
from sra2.methods.objective import build_heads
from sra2.model import networks
from sra2.model.flops import PEAK_TFLOPS, count_flops

# the SRA 2 paper: the alignment layer (1-based block) of the paper for each model
PAPER_LAYERS = {"SiT-B/2": 2, "SiT-L/2": 8, "SiT-XL/2": 8}


@dataclass(frozen=True)
class Report:
    name: str
    input_size: int
    align_layer: int
    depth: int  # projector Linear layers
    width: int  # projector hidden width
    params: int  # SiT alone (the inference model)
    projector_params: int
    flops: int  # SiT forward, per image
    projector_flops: int  # projector forward, per image
    device: str  # where the counting ran: "meta" or "cpu"

    @property
    def params_with_projector(self) -> int:
        return self.params + self.projector_params

    @property
    def flops_with_projector(self) -> int:
        return self.flops + self.projector_flops

    @property
    def extra_percent(self) -> float:
        """Extra forward FLOPs of a training step due to the projector, in % of the SiT's."""
        return 100.0 * self.projector_flops / self.flops


def default_layer(name: str) -> int:
    """The paper's layer where it gives one, else 8 (or the last block of a shallower model)."""
    if name in PAPER_LAYERS:
        return PAPER_LAYERS[name]
    networks.family(name)  # raises the helpful "unknown model" error
    return min(8, networks.MODELS[name].keywords["depth"])


def _measure(name: str, input_size: int, depth: int, width: int | None, device: str):
    with torch.device(device):
        model = networks.build(name, input_size=input_size, num_classes=1000,
                               learn_sigma=False).eval()
        width = width or 2 * model.hidden_size
        out = model.patch_size ** 2 * model.in_channels
        projector = build_projector(model.hidden_size, out, depth, width).eval()
        x = torch.zeros(1, model.in_channels, input_size, input_size)
        t, y = torch.zeros(1), networks.example_condition(model)
        tokens = (input_size // model.patch_size) ** 2
        hidden = torch.zeros(1, tokens, model.hidden_size)
    return model, projector, width, count_flops(model, x, t, y), count_flops(projector, hidden)


def report(name: str, input_size: int = 32, align_layer: int | None = None, depth: int = 5,
           width: int | None = None) -> Report:
    """Build ``name`` and a ``depth``-layer projector (hidden ``width``, default 2*D) and count
    parameters and forward FLOPs per image. ``align_layer`` (default: the paper's) only has to be a
    valid block: the projector's cost does not depend on where it reads."""
    if align_layer is None:
        align_layer = default_layer(name)
    networks.family(name)  # raises the helpful "unknown model" error
    blocks = networks.MODELS[name].keywords["depth"]
    if not 1 <= align_layer <= blocks:
        raise ValueError(f"align layer must be in [1, {blocks}] for {name}, got {align_layer}")
    try:
        model, projector, width, flops, projector_flops = _measure(name, input_size, depth, width,
                                                                   "meta")
        device = "meta"
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on the CPU
        model, projector, width, flops, projector_flops = _measure(name, input_size, depth, width,
                                                                   "cpu")
        device = "cpu"

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return Report(name=name, input_size=input_size, align_layer=align_layer, depth=depth,
                  width=width, params=count(model), projector_params=count(projector),
                  flops=flops, projector_flops=projector_flops, device=device)


def train_flops(cfg: Config) -> int:
    """Model FLOPs of one training image: forward and backward (3 forward passes) of the SiT and of
    what each method on adds to it (its head), plus the forwards without gradients the methods add
    (SRA's teacher up to its block, DINOv2)."""
    try:
        return _train_flops(cfg, "meta")
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on the CPU
        return _train_flops(cfg, "cpu")


def _train_flops(cfg: Config, device: str) -> int:
    side = cfg.data.image_size // 8
    with torch.device(device):
        # an MMDiT's contexts as wide as CLIP ViT-L/14's (the context embedder is a sliver)
        model = networks.build(cfg.model.name, input_size=side, num_classes=cfg.model.num_classes,
                               learn_sigma=False, **objective.model_options(cfg)).eval()
        heads = build_heads(model, cfg)
        x, t = torch.zeros(1, model.in_channels, side, side), torch.zeros(1)
        y = networks.example_condition(model, cfg.text.max_length)
    trained, frozen = count_flops(model, x, t, y), 0
    for m in registry.active(cfg):
        own, without_grad = m.flops(cfg, model, heads[m.name])
        trained, frozen = trained + own, frozen + without_grad
    return 3 * trained + frozen


def gpu_need(cfg: Config, peak_tflops: float = PEAK_TFLOPS["H100"], mfu: float = 0.5) -> float:
    """Training images (latents) per second one GPU of ``peak_tflops`` consumes at ``mfu``."""
    return peak_tflops * 1e12 * mfu / train_flops(cfg)


def table(reports: list[Report]) -> str:
    header = ("model", "layer", "proj", "SiT params", "proj params", "SiT GFLOPs", "(GMACs)",
              "proj GFLOPs", "total GFLOPs", "extra")
    rows = [header]
    for r in reports:
        rows.append((r.name, str(r.align_layer), f"{r.depth}x{r.width}", f"{r.params / 1e6:.1f}M",
                     f"{r.projector_params / 1e6:.2f}M", f"{r.flops / 1e9:.1f}",
                     f"({r.flops / 2e9:.1f})", f"{r.projector_flops / 1e9:.2f}",
                     f"{r.flops_with_projector / 1e9:.1f}", f"+{r.extra_percent:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Report]:
    parser = argparse.ArgumentParser(
        prog="python -m sra2.train.cost",
        description="Parameters and forward FLOPs per image of a SiT and of its SRA 2 projector "
                    "(measured with torch's FlopCounterMode at batch 1; a multiply-add counts as 2 "
                    "FLOPs, so GMACs, the unit of the DiT/SiT papers, are half). Without --model: "
                    "SiT-B/2 (layer 2), SiT-L/2 (layer 8) and SiT-XL/2 (layer 8).")
    parser.add_argument("--model", action="append", choices=sorted(networks.MODELS), metavar="NAME",
                        help="a SiT name such as SiT-XL/2; repeat for several "
                             "(default: B/2, L/2, XL/2)")
    parser.add_argument("--layer", type=int, default=None,
                        help="1-based block the projector reads (default: the paper's, 2 for B/2, "
                             "8 for L/2 and XL/2); it does not change the cost")
    parser.add_argument("--depth", type=int, default=5,
                        help="Linear layers in the projector (default 5)")
    parser.add_argument("--width", type=int, default=None,
                        help="projector hidden width (default 2 x the SiT hidden size)")
    parser.add_argument("--input-size", type=int, default=32,
                        help="latent side (default 32: 256x256 images through the SD-VAE)")
    args = parser.parse_args(argv)
    names = args.model or list(PAPER_LAYERS)
    try:
        reports = [report(n, args.input_size, args.layer, args.depth, args.width) for n in names]
    except ValueError as e:
        parser.error(str(e))
    print(table(reports))
    return reports


if __name__ == "__main__":
    main()
