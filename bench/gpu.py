"""One command for a lent GPU: every speed figure the README promises, in one table, in minutes.

    python bench/gpu.py results/gpu            # one H100/H200: about 6-8 minutes
    python bench/gpu.py results/cpu --smoke    # the same code on a tiny model, on the CPU: minutes

Sections, each a few rows of (section, case, figure, value):

- train: SiT-B/2 and SiT-XL/2 in bf16, without and with ``train.compile``: images/s of the bare
  step (vanilla and SRA 2) and of the whole training loop reading a synthetic ImageNet-shaped store
  through the node-local copy (``bench/train.py``'s measurements), MFU, SRA 2 / vanilla step time,
  loop / bare, peak GPU memory; and one short row of SiT-B/2 + SRA 2 + REPA, eager, reading the
  images from the store (REPA's DINOv2 encoder, projector and loss under autocast);
- sample: the SDE sampler (250 steps) of SiT-XL/2 with and without CFG, the whole sample stage
  against the bare forwards it cannot avoid;
- encode: the SD-VAE architecture's encoder, images/s; inception: the evaluator's Inception
  features, images/s;
- read: latents/s of one reader (the read path, and the bare memmap gather) against what one GPU
  needs at 50% MFU for each model;
- determinism: two identical short runs, and one resumed from its checkpoint, compared byte for
  byte, with and without ``train.deterministic``, and the step rate each way.

Weights are seeded random ones (speed does not depend on them), DINOv2's too. Each section is
saved as soon as it is measured, as ``table.json`` and ``table.md`` in the folder given; a section
that fails records its error and the others still run.

``--smoke`` takes every path of the full run that a CPU can take, so that the GPU's minutes are not
spent on bugs a CPU shows: bf16 autocast (on the CPU too, here only), ``torch.compile`` (the CPU's
inductor), REPA's DINOv2 encoder under autocast, ``train.deterministic``. Not the CPU's: Triton
kernels, cuBLAS's workspace.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before torch: train.deterministic

import argparse
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import read as read_bench
from bench import sample as sample_bench
from bench import train as train_bench
from bench.encode import SD_VAE_SHAPE
from sra2.config.params import VAE, Config
from sra2.data import latent_copy
from sra2.data.encode import measure_encoder
from sra2.data.latents import write_synthetic_store
from sra2.evaluate.metrics import ArrayImages, inception_features, write_random_inception
from sra2.model import flops
from sra2.model import vae as vae_lib
from sra2.runtime import atomic, dist
from sra2.sample.generate import sample_stage
from sra2.train import cost
from sra2.train.loop import build_model, train

# what each run measures: the GPU's, and the smoke test's (the same code, tiny sizes); models:
# their micro-batch (SiT-XL/2's accumulates gradients); repa: the model, batch, store size (latents
# with their images), projector width and block of the SRA 2 + REPA row
FULL = {"preset": "sit-b2", "models": {"SiT-B/2": 256, "SiT-XL/2": 64}, "compile": [False, True],
        "precision": "bf16", "batch": 256, "steps": 20, "warmup": 5, "items": 20000, "workers": 2,
        "repa": {"model": "SiT-B/2", "batch": 256, "items": 2048, "width": 2048, "layer": 4},
        "sample": {"model": "SiT-XL/2", "num": 64, "steps": 250}, "vae": SD_VAE_SHAPE,
        "image": 256, "encode_batch": 64, "inception": 500, "determinism": ("SiT-B/2", 32, 10)}
SMOKE = {"preset": "demo", "models": {"SiT-Demo/2": 8}, "compile": [False, True],
         "precision": "bf16", "batch": 16, "steps": 4, "warmup": 2, "items": 512, "workers": 0,
         "repa": {"model": "SiT-Demo/2", "batch": 4, "items": 64, "width": 64, "layer": 3},
         "sample": {"model": "SiT-Demo/2", "num": 4, "steps": 4}, "vae": None,
         "image": 64, "encode_batch": 4, "inception": 8, "determinism": ("SiT-Demo/2", 8, 4)}
METHODS = {"vanilla": "vanilla", "sra2": "SRA 2", "sra2+repa": "SRA 2 + REPA"}  # in the table


class Table:
    """Rows of (section, case, figure, value), saved as JSON and Markdown after every section."""

    def __init__(self, folder: Path, header: dict):
        self.folder, self.header, self.rows = folder, header, []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, case: str, figure: str, value) -> None:
        if isinstance(value, float):
            value = round(value, 4 if abs(value) < 10 else 1)
        self.rows.append({"section": section, "case": case, "figure": figure, "value": value})
        print(f"{section:12} {case:34} {figure:34} {value}", flush=True)

    def save(self) -> None:
        atomic.write_json(self.folder / "table.json", {**self.header, "rows": self.rows})
        lines = [f"# bench/gpu.py on {self.header['device']}", "",
                 f"torch {self.header['torch']}, {self.header['when']}, "
                 f"{'SMOKE (tiny sizes)' if self.header['smoke'] else 'full sizes'}", "",
                 "| section | case | figure | value |", "|---|---|---|---:|"]
        lines += [f"| {r['section']} | {r['case']} | {r['figure']} | {r['value']} |"
                  for r in self.rows]
        atomic.write_text(self.folder / "table.md", "\n".join(lines) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float:
    """GiB allocated at most since the last reset (0 on the CPU), then reset."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def autocast(device: torch.device, precision: str):
    """``sra2.runtime.dist.autocast`` on any device: the pipeline's CPU runs stay fp32, the smoke's
    run the GPU's bf16 paths."""
    if precision in dist.AUTOCAST:
        return torch.autocast(device.type, dist.AUTOCAST[precision])
    return nullcontext()


def train_configs(size: dict, model: str, micro: int, compiled: bool, device: str,
                  methods: tuple[str, ...] = ("vanilla", "sra2")) -> dict[str, Config]:
    """The configuration of each method (``bench/train.py``'s) at these sizes."""
    args = train_bench.parse_args(
        ["--preset", size["preset"], "--model", model, "--batch", str(size["batch"]),
         "--batch-per-gpu", str(micro), "--precision", size["precision"],
         "--steps", str(size["steps"]), "--warmup", str(size["warmup"]), "--device", device,
         "--workers", str(size["workers"])]
        + (["--compile"] if compiled else []))
    configs = {}
    for method in methods:
        data = train_bench.build_config(args, method).model_dump()
        # seeded DINOv2 weights (a lent GPU cannot download them), the REPA row's width and block
        data["repa"].update(encoder="random", width=size["repa"]["width"],
                            layer=size["repa"]["layer"])
        configs[method] = Config.model_validate(data)
    return configs


def measure_train(t: Table, size: dict, device: torch.device, case: str, configs: dict[str, Config],
                  store: Path, peak: float | None) -> None:
    """The bare step of each method (vanilla first), the training loop of the last one."""
    # every case compiles as a run does, in a fresh process: the last case's graphs would make
    # this one's batch size dynamic (dynamo's automatic dynamic shapes) and count to its limit
    torch._dynamo.reset()
    shape = (4, size["image"] // 8, size["image"] // 8)
    peak_memory(device)
    rates = {method: train_bench.bare_step_rate(cfg, shape, device, size["steps"], size["warmup"])
             for method, cfg in configs.items()}
    bare_memory = peak_memory(device)
    method, cfg = list(configs.items())[-1]
    with tempfile.TemporaryDirectory() as out:
        loop = train_bench.loop_rate(cfg, store, Path(out))
    loop_memory = peak_memory(device)
    name = METHODS[method]
    for each, rate in rates.items():
        t.add("train", case, f"bare step, {METHODS[each]} (images/s)", rate)
    t.add("train", case, f"training loop, {name} (images/s)", loop)
    t.add("train", case, f"{name} / vanilla step time", rates["vanilla"] / rates[method])
    t.add("train", case, "loop / bare step", loop / rates[method])
    if peak and method == "sra2":  # sra2/tools/plan.py takes the mean of these for SRA 2 runs
        t.add("train", case, "MFU of the loop (%)",
              100 * loop * cost.train_flops(cfg) / peak / 1e12)
    t.add("train", case, "peak GPU memory, bare / loop (GiB)",
          f"{bare_memory:.1f} / {loop_memory:.1f}")


def section_train(t: Table, size: dict, device: torch.device, store: Path, scratch: Path,
                  peak: float | None) -> None:
    for model, micro in size["models"].items():
        for compiled in size["compile"]:
            case = f"{model} {size['precision']}{' compiled' if compiled else ''}"
            configs = train_configs(size, model, micro, compiled, device.type)
            measure_train(t, size, device, case, configs, store, peak)
    repa = size["repa"]
    configs = train_configs({**size, "batch": repa["batch"]}, repa["model"], repa["batch"], False,
                            device.type, ("vanilla", "sra2+repa"))
    cfg = configs["sra2+repa"]
    side = cfg.data.image_size // 8
    images = write_synthetic_store(scratch / "repa", repa["items"], (4, side, side),
                                   cfg.model.num_classes, 1, 1024, image_size=cfg.data.image_size)
    measure_train(t, size, device, f"{repa['model']} {size['precision']}, SRA 2 + REPA", configs,
                  images.path, peak)


def section_sample(t: Table, size: dict, device: torch.device) -> None:
    s = size["sample"]
    for scale in (1.0, 4.0):
        args = ["--preset", size["preset"], "--model", s["model"], "--num", str(s["num"]),
                "--batch", str(s["num"]), "--steps", str(s["steps"]), "--device", device.type,
                "--precision", size["precision"], "--vae", "random-sd" if size["vae"] else "random"]
        cfg = sample_bench.build_config(sample_bench.parse_args(args))
        cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"cfg_scale": scale})})
        model = build_model(cfg, size["image"] // 8).to(device).eval()
        # the bare forwards: one per step, on twice the batch with guidance (as the sampler runs)
        n = s["num"] * (2 if scale != 1 else 1)
        x = torch.randn(n, 4, size["image"] // 8, size["image"] // 8, device=device)
        tt, y = (torch.full((n,), 0.5, device=device),
                 torch.zeros(n, dtype=torch.long, device=device))
        with torch.no_grad(), dist.autocast(device, size["precision"]):
            model(x, tt, y)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                model(x, tt, y)
            synchronize(device)
        bare = s["num"] / ((time.perf_counter() - start) / 10 * s["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            ema = Path(tmp) / "ema.pt"
            atomic.save_torch({"name": cfg.model.name, "ema": model.state_dict()}, ema)
            start = time.perf_counter()
            sample_stage(cfg, ema, Path(tmp) / "samples")
            stage = s["num"] / (time.perf_counter() - start)
        case = (f"{s['model']} SDE {s['steps']} steps, "
                + ("no CFG" if scale == 1 else f"CFG {scale}"))
        t.add("sample", case, "bare forwards (images/s)", bare)
        t.add("sample", case, "sample stage (images/s)", stage)
        t.add("sample", case, "stage / bare", stage / bare)


def section_encode_inception(t: Table, size: dict, device: torch.device, scratch: Path) -> None:
    shape = size["vae"] or {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
                            "norm_num_groups": 16}
    vae = vae_lib.load_vae(VAE.model_validate({"source": "random", "random": {**shape, "seed": 0}}),
                           device)
    name = "SD-VAE architecture" if size["vae"] else "demo VAE architecture"
    for precision in ("fp32", "bf16"):
        rate = measure_encoder(vae, size["encode_batch"], size["image"], device, precision)
        t.add("encode", f"{name}, {size['image']} px, {precision}", "encoder (images/s)", rate)
    weights = write_random_inception(scratch / "inception.pth", 0)
    images = np.random.default_rng(0).integers(0, 256, (size["inception"], 256, 256, 3), np.uint8)
    inception_features(ArrayImages(images[:8]), weights, 8, device)  # load and warm up
    start = time.perf_counter()
    inception_features(ArrayImages(images), weights, 250, device)
    t.add("inception", "torch-fidelity InceptionV3, 256 px in", "features (images/s)",
          size["inception"] / (time.perf_counter() - start))


def section_read(t: Table, size: dict, store: Path, copy: latent_copy.LatentCopy,
                 built: dict) -> None:
    rates, _, after = read_bench.read_rates(store, copy, size["batch"], size["steps"], 3)
    for name, rate in rates.items():
        t.add("read", name, "latents/s", rate)
    t.add("read", read_bench.READ_PATH, "/ bare gather",
          rates[read_bench.READ_PATH] / rates[read_bench.BARE])
    t.add("read", "copy", "build / verify (GB/s)",
          f"{built['build GB/s']:.2f} / {built['verify GB/s']:.2f}")
    t.add("read", "this process", "anonymous memory (MB)", after["anonymous"])
    for model in size["models"]:
        sra2 = train_configs(size, model, size["batch"], False, "cpu")["sra2"]
        t.add("read", f"one GPU, {model} + SRA 2", "need at 50% MFU of 989 TFLOP/s (latents/s)",
              cost.gpu_need(sra2))


def section_determinism(t: Table, size: dict, device: torch.device, store: Path) -> None:
    model, batch, steps = size["determinism"]
    for deterministic in (False, True):
        cfg = train_configs(size, model, batch, False, device.type)["sra2"]
        data = cfg.model_dump()
        data["train"].update(global_batch=batch, steps=steps, ckpt_every=steps // 2,
                             log_every=steps // 2, deterministic=deterministic)
        cfg = Config.model_validate(data)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            start = time.perf_counter()
            train(cfg, store, out / "a")
            seconds = time.perf_counter() - start
            train(cfg, store, out / "b")
            half = Config.model_validate({**data, "train": {**data["train"], "steps": steps // 2}})
            train(half, store, out / "c")
            train(cfg, store, out / "c")
            ema = {run: torch.load(out / run / "ema.pt", weights_only=True)["ema"] for run in "abc"}
        same = {run: all(torch.equal(ema["a"][k], ema[run][k]) for k in ema["a"]) for run in "bc"}
        case = f"{model}, {steps} steps, deterministic {deterministic}"
        t.add("determinism", case, "two runs byte-identical", same["b"])
        t.add("determinism", case, "resumed run byte-identical", same["c"])
        t.add("determinism", case, "run time (s)", seconds)
    dist.deterministic(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for table.json and table.md")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on any device: checks the script")
    p.add_argument("--only", nargs="+",
                   choices=["train", "sample", "encode", "read", "determinism"],
                   help="run only these sections")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense bf16 peak (default: known GPUs)")
    args = p.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    device = dist.device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or flops.peak_tflops(name)
    t = Table(args.out, {"device": name, "torch": torch.__version__, "smoke": args.smoke,
                         "when": time.strftime("%Y-%m-%d %H:%M"), "peak_tflops": peak})
    wanted = set(args.only or ["train", "sample", "encode", "read", "determinism"])
    # sra2.runtime.dist.autocast is a no-op on the CPU: here it autocasts there too, as on a GPU
    cpu_autocast = (mock.patch.object(dist, "autocast", autocast) if device.type == "cpu"
                    else nullcontext())
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, cpu_autocast:
        scratch = Path(tmp)
        os.environ["SRA2_COPY_DIR"] = str(scratch / "copies")
        side = size["image"] // 8
        first = train_configs(size, next(iter(size["models"])), size["batch"], False, "cpu")
        classes = first["sra2"].model.num_classes
        store, copy, built = read_bench.build_copy(scratch, size["items"], (4, side, side), 1,
                                                   classes)
        sections = {"train": lambda: section_train(t, size, device, store, scratch, peak),
                    "sample": lambda: section_sample(t, size, device),
                    "encode": lambda: section_encode_inception(t, size, device, scratch),
                    "read": lambda: section_read(t, size, store, copy, built),
                    "determinism": lambda: section_determinism(t, size, device, store)}
        for section, run in sections.items():
            if section not in wanted:
                continue
            started = time.perf_counter()
            try:
                run()
            except Exception as e:  # record it and go on: the device time is short
                traceback.print_exc()
                t.add(section, "FAILED", type(e).__name__, str(e)[:200])
                failed += 1
            t.add(section, "section", "wall time (s)", time.perf_counter() - started)
            t.save()
    print(f"\nsaved {args.out / 'table.md'} and {args.out / 'table.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
