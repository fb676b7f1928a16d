"""Training throughput in one run on one machine: the whole training loop against the bare model
step, a method's step (``--method``: sra2, sra, repa, sra2+repa) against vanilla SiT's, model FLOP
utilisation, peak host and GPU memory.

The bare step is ``sra2.train.loop.train_step`` on a batch and noise already on the device (forward,
backward, clipping, optimizer and EMA): what the hardware can do. The loop is
``sra2.train.loop.train`` on a synthetic latent store of ``--items`` latents
(``sra2.data.latents.write_synthetic_store``): reader processes, host-to-device copies, noise,
logging and checkpoints included. Goals: loop/bare >= 0.95, SRA 2/vanilla step time <= 1.05 on
SiT-XL/2.

    python bench/train.py                                         # demo preset, CPU
    python bench/train.py --preset sit-b2 --items 100000          # on a GPU
    python bench/train.py --preset sit-xl2 --batch 256 --batch-per-gpu 64 --compile
    python bench/train.py --method repa                           # REPA's encoder and projector
    python bench/train.py --preset mmdit-coco --versus SiT-B/2    # MMDiT against a SiT as wide

With ``--versus MODEL`` the bare steps of that model (vanilla and with the method) are timed in the
same rounds: the step time of one network against the other's, and the method's overhead on each.
An MMDiT's batches carry caption contexts of text.max_length tokens (the demo's text width, else
CLIP ViT-L/14's 768).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sra2.config.params import Config, resolve
from sra2.data.latents import write_synthetic_store
from sra2.methods import registry
from sra2.model import flops
from sra2.model.networks import family
from sra2.runtime import dist
from sra2.tools.plan import text_width
from sra2.train import cost
from sra2.train.loop import build_trainer, draws, step_inputs, train, train_step

# each method's alignment terms (sra2.methods.objective), as configuration sections
METHODS = {"vanilla": {"align": {"enabled": False}},
           "sra2": {"align": {"enabled": True}},
           "sra": {"align": {"enabled": False}, "sra": {"enabled": True}},
           "repa": {"align": {"enabled": False}, "repa": {"enabled": True}},
           "sra2+repa": {"align": {"enabled": True}, "repa": {"enabled": True}}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo",
                   help="preset whose model and train settings are used")
    p.add_argument("--model", help="override model.name, e.g. SiT-XL/2")
    p.add_argument("--items", type=int, default=4096, help="latents in the synthetic store")
    p.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    p.add_argument("--batch-per-gpu", type=int, help="micro-batch size (default: the whole batch)")
    p.add_argument("--steps", type=int, default=40, help="timed steps of each measurement")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first; also the steps of one timed window (one log row)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: the preset's")
    p.add_argument("--workers", type=int,
                   help="reader processes of the loop (default: the preset's)")
    p.add_argument("--chunk-size", type=int, default=1, help="latents per chunk of the store")
    p.add_argument("--read-from", choices=["copy", "store"], default="copy",
                   help="train.read_from: the node-local copy of the store, or the store itself")
    p.add_argument("--method", choices=sorted(METHODS), default="sra2",
                   help="the alignment terms measured against vanilla SiT (default: sra2)")
    p.add_argument("--versus", metavar="MODEL",
                   help="also time the bare steps of this model.name (e.g. SiT-B/2 beside "
                        "MMDiT-D24/2, the same width)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak, for MFU (default: known GPUs)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, method: str, model: str | None = None) -> Config:
    """The preset with the bench's train settings, ``method``'s terms and ``model`` (default:
    --model, else the preset's)."""
    base = resolve({"preset": args.preset})
    train = {"device": args.device, "compile": args.compile, "log_every": args.warmup,
             "read_from": args.read_from,
             "ckpt_every": 10**9, "steps": args.warmup + args.steps}
    for key, value in (("global_batch", args.batch), ("batch_per_gpu", args.batch_per_gpu),
                       ("precision", args.precision), ("workers", args.workers)):
        if value is not None:
            train[key] = value
    overrides = {"train": train, **METHODS[method]}
    if METHODS[method].get("repa"):
        overrides["encode"] = {"pixels": True}
    if model or args.model:
        overrides["model"] = {"name": model or args.model}
    data = base.model_dump()
    for section, values in overrides.items():
        data[section] = {**data[section], **values}
    return Config.model_validate(data)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_rate(cfg: Config, shape: tuple, device: torch.device, steps: int,
                   warmup: int) -> float:
    """Images/s of a step on one batch and one draw of noise already on the device: the median
    over windows of ``warmup`` steps, as the loop's rate is over its log rows."""
    n = cfg.train.global_batch
    g = torch.Generator(device).manual_seed(0)
    batch = {"mean": torch.randn((n, *shape), generator=g, device=device),
             "std": torch.rand((n, *shape), generator=g, device=device) * 0.5,
             "labels": torch.randint(0, cfg.model.num_classes, (n,), generator=g, device=device)}
    null = None
    if family(cfg.model.name) == "mmdit":  # caption contexts, and the empty caption's
        tokens = (cfg.text.max_length, text_width(cfg) or 768)
        batch["context"] = torch.randn((n, *tokens), generator=g, device=device)
        null = torch.randn((1, *tokens), generator=g).numpy()
    tr = build_trainer(cfg, shape, device, world=1, null=null)
    if registry.needs_images(cfg):
        side = cfg.data.image_size
        batch["images"] = torch.randint(0, 256, (n, side, side, 3), generator=g, device=device,
                                        dtype=torch.uint8)
    drawn = draws(cfg, 0, shape, 0, 1, device)

    def step() -> None:  # the inputs are made every step, as the loop makes them (REPA's encoder)
        train_step(tr, step_inputs(tr, batch, drawn))

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(steps // warmup):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize(device)
        rates.append(warmup * n / (time.perf_counter() - start))
    return statistics.median(rates)


def loop_rate(cfg: Config, store: Path, out: Path) -> float:
    """Images/s of the training loop: the median over its log rows after the first (start-up and
    warm-up excluded); a row is ``warmup`` steps."""
    rows = []
    train(cfg, store, out, lambda done, total, info: rows.append(info))
    return statistics.median(r["images_per_s"] for r in rows[1:] if "images_per_s" in r)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    return flops.peak_tflops(torch.cuda.get_device_name(device))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vanilla, method = build_config(args, "vanilla"), build_config(args, args.method)
    net = method.model.name.split("-")[0]  # SiT or MMDiT
    name = f"{net} + {args.method}" if args.method != "vanilla" else f"vanilla {net}"
    device = dist.device(args.device)
    side = method.data.image_size // 8
    shape = (4, side, side)
    print(f"machine: {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}")
    t = method.train
    print(f"config:  {method.model.name} + {args.method}, latents {shape}, global batch "
          f"{t.global_batch}, micro-batch {t.batch_per_gpu or t.global_batch}, {t.precision}, "
          f"compile {t.compile}, {t.workers} reader(s) of the {t.read_from}, {args.items} latents "
          f"(chunks of {args.chunk_size})")
    with tempfile.TemporaryDirectory() as tmp:
        # the loop's copy goes with the store
        os.environ["SRA2_COPY_DIR"] = str(Path(tmp) / "copies")
        store = Path(tmp) / "latents"
        context = ((method.text.captions_per_image, method.text.max_length,
                    text_width(method) or 768) if family(method.model.name) == "mmdit" else None)
        write_synthetic_store(store, args.items, shape, method.model.num_classes, args.chunk_size,
                              max(args.chunk_size, 1024),
                              image_size=method.data.image_size if method.encode.pixels else None,
                              context=context)
        # interleaved, the first pair only warms the machine up: one-time costs and drift hit both
        configs = {"vanilla": vanilla, "method": method}
        if args.versus:
            configs |= {"versus vanilla": build_config(args, "vanilla", args.versus),
                        "versus method": build_config(args, args.method, args.versus)}
        timed = {k: [] for k in configs}
        for _ in range(3):
            for k, c in configs.items():
                timed[k].append(bare_step_rate(c, shape, device, args.steps, args.warmup))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates = {f"bare step, vanilla {net}": statistics.median(timed["vanilla"][1:]),
                 f"bare step, {name}": statistics.median(timed["method"][1:]),
                 f"training loop, {name}": loop_rate(method, store, Path(tmp) / "run")}
        rates[f"bare step, {name} (again)"] = bare_step_rate(method, shape, device, args.steps,
                                                             args.warmup)
        versus = {k: statistics.median(timed[k][1:]) for k in ("versus vanilla", "versus method")
                  if k in timed}
    bare = (rates[f"bare step, {name}"] + rates[f"bare step, {name} (again)"]) / 2
    print(f"\n{'':40}{'images/s':>10}{'/ bare':>8}")
    for label, rate in rates.items():
        print(f"{label:40}{rate:10.1f}{rate / bare:8.3f}")

    train_flops, vanilla_flops = cost.train_flops(method), cost.train_flops(vanilla)
    peak = peak_tflops(args, device)
    achieved = rates[f"training loop, {name}"] * train_flops / 1e12
    mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else "n/a (no known peak)"
    rss = max(resource.getrusage(w).ru_maxrss
              for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"\nmodel FLOPs per training image: {train_flops / 1e9:.2f} GFLOP, "
          f"{train_flops / vanilla_flops:.3f} x vanilla's {vanilla_flops / 1e9:.2f} (3 x the "
          f"forward of the network and heads, plus the teacher's and encoder's forwards)")
    print(f"achieved: {achieved:.3f} TFLOP/s; MFU {mfu}")
    print(f"peak host RSS (largest process): {rss / 1024:.0f} MB")
    if device.type == "cuda":
        print("peak GPU memory of the loop: "
              f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"{args.method} / vanilla step time: "
          f"{rates[f'bare step, vanilla {net}'] / rates[f'bare step, {name}']:.3f}")
    if versus:
        print(f"\n{args.versus}, same rounds: vanilla {versus['versus vanilla']:.1f} images/s, "
              f"+ {args.method} {versus['versus method']:.1f}; {args.method} / vanilla step time "
              f"{versus['versus vanilla'] / versus['versus method']:.3f}")
        print(f"{method.model.name} / {args.versus} step time (vanilla): "
              f"{versus['versus vanilla'] / rates[f'bare step, vanilla {net}']:.3f}; with "
              f"{args.method}: {versus['versus method'] / rates[f'bare step, {name}']:.3f}")
    print(f"loop / bare ratio: {rates[f'training loop, {name}'] / bare:.3f}")


if __name__ == "__main__":
    main()
