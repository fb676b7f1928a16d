"""RALU against the full-size sampler, in one run on the same weights, labels and noise.

Samplers (all deterministic, so each sample's error is measured from the same starting noise):
- reference: Euler, ``--reference-steps`` steps at full size (the best this ODE can do);
- RALU, with the token positions ``centres`` and ``half`` (sample.ralu, arXiv 2507.08422);
- Euler with as many network evaluations as RALU, and with as many FLOPs;
- the preset's own sampler (the pipeline's SDE), for its FID only (other noise path).
For each: wall time of sampling (RALU's edge decode included), FLOPs per sample (network: tokens
x steps, counted by FlopCounterMode; RALU adds one half-size VAE decode), latent RMS error and
pixel mean absolute error against the reference, FID / sFID / IS against the real images.
Then the FLOPs of SiT-XL/2 + SD-VAE with the same RALU plan at 256 and 512 px (meta device), and
with ``--time-model`` the seconds of one sample of that SiT (random weights) with each sampler.

Run from a checkout where the demo pipeline has run (weights, VAE, encoded store):
    cd <repo> && dvc repro && python bench/ralu.py --num 128
    python bench/ralu.py --time-model SiT-XL/2 --device cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.encode import SD_VAE_SHAPE
from sra2.config.params import VAE, Config, Ralu, load
from sra2.data.store import pointed_store
from sra2.model import vae as vae_lib
from sra2.model.flops import count_flops, token_flops
from sra2.model.networks import load_checkpoint
from sra2.model.sit import build, read_checkpoint
from sra2.sample import ralu
from sra2.sample.generate import latents, sample_labels
from sra2.sample.samplers import derived_seed, randn
from sra2.train.fid_curve import score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--ema", default="data/train/ema.pt")
    p.add_argument("--latents", default="data/latents.json", help="the encoded store (real images)")
    p.add_argument("--num", type=int, default=128, help="samples per sampler")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reference-steps", type=int, default=250)
    p.add_argument("--steps", type=int, nargs=3, help="ralu.steps (default: the config's)")
    p.add_argument("--no-fid", action="store_true", help="skip FID (no encoded store needed)")
    p.add_argument("--time-model", help="also time one sample of this SiT (random weights, with "
                                        "the SD-VAE architecture) at --time-px, e.g. SiT-XL/2")
    p.add_argument("--time-px", type=int, default=256)
    p.add_argument("--device", default="cpu", help="for --time-model")
    return p.parse_args(argv)


def with_sample(cfg: Config, **values) -> Config:
    return cfg.model_copy(update={"sample": cfg.sample.model_validate(
        {**cfg.sample.model_dump(), **values})})


def run(cfg: Config, model, vae, labels: np.ndarray, batch: int) -> tuple[torch.Tensor, float]:
    """Latents of every sample (noise and labels as the sample stage draws them) and seconds."""
    out, seconds = [], 0.0
    for start in range(0, len(labels), batch):
        index = range(start, min(start + batch, len(labels)))
        gens = [torch.Generator().manual_seed(derived_seed(cfg.sample.seed, i)) for i in index]
        noise = randn((len(index), model.in_channels, model.input_size, model.input_size), gens)
        y = torch.from_numpy(labels[index.start:index.stop])
        began = time.perf_counter()
        out.append(latents(cfg, model, vae, y, noise, gens))
        seconds += time.perf_counter() - began
    return torch.cat(out), seconds


def plan_flops(model, plan: Ralu, decode_flops: int) -> tuple[int, int, int]:
    """FLOPs per sample of RALU (network + decode), of one full-size evaluation, and RALU's
    network evaluations."""
    grid = model.input_size // model.patch_size // 2
    per_stage = [token_flops(model, tokens) for tokens in ralu.stage_tokens(plan, grid)]
    network = sum(steps * flops for steps, flops in zip(plan.steps, per_stage))
    decode = decode_flops if plan.steps[0] and plan.steps[1] and plan.top_k < 1 else 0
    return network + decode, token_flops(model, (2 * grid) ** 2), sum(plan.steps)


def decode_flops(vae, channels: int, half_side: int) -> int:
    param = next(vae.parameters())
    z = torch.zeros(1, channels, half_side, half_side, dtype=param.dtype, device=param.device)
    return count_flops(lambda x: vae.decode(x).sample, z)


def paper_scale(plan: Ralu) -> list[str]:
    """RALU against 50 and against as-many-evaluations Euler steps for SiT-XL/2 + SD-VAE."""
    lines = []
    with torch.device("meta"):
        sd = vae_lib.build_random_vae(VAE(source="random", random=SD_VAE_SHAPE, scale=0.18215))
        for px in (256, 512):
            model = build("SiT-XL/2", input_size=px // 8, num_classes=1000, learn_sigma=False)
            total, full, evals = plan_flops(model, plan, decode_flops(sd, 4, px // 16))
            lines.append(f"SiT-XL/2 {px}px: RALU {total / 1e12:.2f} TFLOPs/sample "
                         f"({evals} evaluations) vs Euler {evals} steps {evals * full / 1e12:.2f}: "
                         f"x{evals * full / total:.2f} fewer; same FLOPs = {total / full:.1f} "
                         "Euler steps")
    return lines


def time_at_scale(cfg: Config, name: str, px: int, device: str) -> list[str]:
    """Seconds for one sample of ``name`` (random weights: the time does not depend on them)
    with RALU, with Euler of as many evaluations and with Euler of as many FLOPs."""
    plan = cfg.sample.ralu
    sd = vae_lib.build_random_vae(VAE(source="random", random=SD_VAE_SHAPE, scale=0.18215))
    sd = sd.to(device).eval()
    model = build(name, input_size=px // 8, num_classes=1000, learn_sigma=False).to(device).eval()
    total, full, evals = plan_flops(model, plan, decode_flops(sd, 4, px // 16))
    same = max(1, round(total / full))
    gens = [torch.Generator().manual_seed(0)]
    noise = randn((1, 4, px // 8, px // 8), gens, device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    lines = []
    for label, c in ((f"RALU {plan.steps}", with_sample(cfg, sampler="ralu")),
                     (f"Euler {evals}", with_sample(cfg, sampler="ode-euler", steps=evals)),
                     (f"Euler {same} (same FLOPs)",
                      with_sample(cfg, sampler="ode-euler", steps=same))):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        latents(c, model, sd, y, noise, gens)
        if device == "cuda":
            torch.cuda.synchronize()
        lines.append(f"{name} {px}px, one sample on {device}: "
                     f"{label} {time.perf_counter() - began:.2f} s")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load(args.params)
    if args.steps:
        cfg = with_sample(cfg, ralu={**cfg.sample.ralu.model_dump(), "steps": args.steps})
    plan = cfg.sample.ralu
    torch.set_grad_enabled(False)
    ckpt = read_checkpoint(args.ema)
    model = load_checkpoint(ckpt.get("name", cfg.model.name), ckpt).eval()
    vae = vae_lib.load_vae(cfg.vae)
    labels = sample_labels(cfg.sample.seed, args.num, model.num_classes, cfg.sample.labels)
    half = model.input_size // 2
    total, full, evals = plan_flops(model, plan, decode_flops(vae, model.in_channels, half))
    same_flops = max(1, round(total / full))
    samplers = {
        f"reference: Euler {args.reference_steps}": (with_sample(cfg, sampler="ode-euler",
                                                                 steps=args.reference_steps),
                                                     args.reference_steps * full),
        "RALU, positions centres": (with_sample(cfg, sampler="ralu", ralu={
            **plan.model_dump(), "positions": "centres"}), total),
        "RALU, positions half": (with_sample(cfg, sampler="ralu", ralu={
            **plan.model_dump(), "positions": "half"}), total),
        f"Euler {evals} (same evaluations)": (with_sample(cfg, sampler="ode-euler", steps=evals),
                                              evals * full),
        f"Euler {same_flops} (same FLOPs)": (with_sample(cfg, sampler="ode-euler",
                                                         steps=same_flops), same_flops * full),
        f"preset's {cfg.sample.sampler} {cfg.sample.steps}": (cfg, cfg.sample.steps * full),
    }
    print(f"{model.__class__.__name__} {cfg.model.name} from {args.ema}, "
          f"VAE {vae_lib.describe(cfg.vae)}, "
          f"{args.num} samples, RALU steps {plan.steps} ends {plan.ends} c {plan.c} "
          f"top_k {plan.top_k}; CPU threads {torch.get_num_threads()}")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for name, (c, flops) in samplers.items():
            z, seconds = run(c, model, vae, labels, args.batch)
            images = torch.cat([vae_lib.decode(vae, z[i:i + args.batch], cfg.vae.scale)
                                for i in range(0, len(z), args.batch)]).numpy()
            if reference is None:
                reference = (z, images.astype(np.float64))
            row = {"sampler": name, "s": seconds, "GFLOPs/sample": flops / 1e9,
                   "latent RMSE": (z - reference[0]).square().mean().sqrt().item(),
                   "pixel MAE": np.abs(images - reference[1]).mean()}
            if not args.no_fid:
                row.update(score(cfg, images, pointed_store(args.latents), Path(scratch)))
            rows.append(row)
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else str(v)
                            for k, v in row.items()), flush=True)
    print()
    print(table(rows))
    print()
    print("\n".join(paper_scale(plan)))
    if args.time_model:
        print("\n".join(time_at_scale(cfg, args.time_model, args.time_px, args.device)))


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
