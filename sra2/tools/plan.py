"""What a run will cost, printed before anything runs: per stage the time, GPU-hours and host
memory; per folder the bytes at the end and at the peak, against what is free; what will not fit.

    sra2 plan -S preset=sit-b2 --gpus 8 --gpu H100
    sra2 plan -S preset=sit-b2 -S +repa.enabled=true -S +encode.pixels=true --images 1281167

Times come from the FLOPs of each stage's networks (sra2.model.flops, counted on the meta device) at
an MFU, measured by bench/gpu.py (--gpu-table, its table.json) or assumed (--mfu, 0.4 by
default), and for encode from the cores' JPEG decoding rate. Bytes come from sra2.data.space: the
figures each stage's preflight checks before it writes.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from sra2.config.params import Config, apply_overrides, resolve
from sra2.data import space
from sra2.data.encode import decode_workers, latent_arrays
from sra2.data.space import Need, size
from sra2.methods import registry
from sra2.model import flops
from sra2.train import cost
from sra2.train.loop import checkpoint_bytes

IMAGENET_TRAIN = 1_281_167
COCO_TRAIN, COCO_VAL = 82_783, 40_504  # MS-COCO 2014's train and val images
DECODE_PER_CORE = 190  # ImageNet-like JPEGs decoded and cropped per core-second (bench/decode.py)
MFU = 0.4  # assumed where no bench/gpu.py table says otherwise
INCEPTION_FLOPS = 11.4e9  # InceptionV3 at 299 x 299: 5.7 GMACs
PROCESS_RAM = 3 * 2**30  # a worker's PyTorch, CUDA context and model, before the data


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu: str
    cores: int
    peak_tflops: float
    mfu: float
    mfu_source: str


@dataclass(frozen=True)
class Stage:
    name: str
    work: str
    seconds: float
    gpu_seconds: float
    ram: int  # host memory per process
    needs: list[Need]


def images_in(cfg: Config, given: int | None) -> tuple[int, str]:
    """The dataset's image count: given, counted in data.root, the demo's, or ImageNet's."""
    if given:
        return given, "given"
    if cfg.data.demo is not None:
        return cfg.data.demo.classes * cfg.data.demo.per_class, "the demo's"
    root = Path(cfg.data.root)
    if root.is_dir():
        from sra2.data.captions import listing

        return len(listing(cfg).images), f"counted in {root}"
    if cfg.data.kind == "coco":
        return COCO_TRAIN, f"MS-COCO 2014's train split ({root} not found)"
    return IMAGENET_TRAIN, f"ImageNet's train split ({root} not found)"


def val_images(cfg: Config) -> int:
    """The val split's image count (captioned data): counted, the demo's, or MS-COCO's."""
    demo = cfg.data.demo
    if demo is not None:
        return demo.classes * demo.val_per_class
    if Path(cfg.data.val_root).is_dir():
        from sra2.data.captions import listing

        return len(listing(cfg, "val").images)
    return COCO_VAL


def text_width(cfg: Config) -> int | None:
    """The width of a caption context's vectors (None: class labels): the demo's encoder, or CLIP
    ViT-L/14's 768."""
    if cfg.data.kind != "coco":
        return None
    demo = cfg.data.demo
    return demo.text.hidden_size if demo is not None and demo.text is not None else 768


def measured_mfu(table: Path | None) -> tuple[float, str] | None:
    """The training MFU bench/gpu.py measured (its table.json), the mean of its rows."""
    if table is None or not table.is_file():
        return None
    rows = [r for r in json.loads(table.read_text())["rows"]
            if r["figure"].lower().startswith("mfu") and isinstance(r["value"], (int, float))]
    if not rows:
        return None
    values = [r["value"] / 100 if r["value"] > 1 else r["value"] for r in rows]
    return sum(values) / len(values), f"measured by bench/gpu.py ({table})"


def gpu_time(total_flops: float, hw: Hardware, processes: int | None = None) -> tuple[float, float]:
    """(wall seconds, GPU-seconds) of ``total_flops`` spread over ``processes`` GPUs."""
    n = processes or hw.gpus
    per_gpu = hw.peak_tflops * 1e12 * hw.mfu
    return total_flops / (per_gpu * n), total_flops / per_gpu


def decoding_seconds(cfg: Config, n: int, processes: int, cores: int) -> float:
    """Encode's JPEG decoding of ``n`` images: each of ``processes`` ranks decodes with its own
    workers, a core of its share of ``cores`` left to the rank (with encode.workers: 0 the rank
    decodes itself)."""
    decoders = processes * max(1, decode_workers(cfg.encode.workers, cores, processes))
    return n / (decoders * DECODE_PER_CORE)


def stages(cfg: Config, n: int, hw: Hardware, root: Path) -> list[Stage]:
    from sra2.data import latent_copy

    data, tc, sc = root / "data", cfg.train, cfg.sample
    encoder, decoder = flops.vae_flops(cfg)
    views = 2 if cfg.encode.flip else 1
    gpu_s, gpus_s = gpu_time(n * views * encoder, hw)
    decode_s = decoding_seconds(cfg, n, hw.gpus, hw.cores)
    arrays = latent_arrays(cfg, space.latent_shape(cfg), text_width(cfg))
    store = space.encode_needs(cfg, arrays, data / "latents" / "store", n)
    encode = Stage("encode", f"{n:,} images, VAE encoder {encoder / 1e9:.0f} GFLOPs x {views}",
                   max(gpu_s, decode_s), gpus_s, PROCESS_RAM, store)

    per_image = cost.train_flops(cfg)
    train_s, train_gpu = gpu_time(tc.steps * tc.global_batch * per_image, hw)
    copied = [*latent_copy.ARRAYS, *([latent_copy.CONTEXT] if cfg.data.kind == "coco" else []),
              *([latent_copy.IMAGES] if registry.needs_images(cfg) else [])]
    raw = space.item_bytes(arrays)
    copy = (space.copy_need(n * sum(raw[name] for name in copied),
                            latent_copy.copy_root(tc.copy_dir)) if tc.read_from == "copy" else None)
    step, ema = checkpoint_bytes(cfg)
    evals = tc.steps // tc.eval_every if tc.eval_every else 0
    forward = cost.report(cfg.model.name, space.latent_shape(cfg)[-1]).flops
    per_sample = sample_flops(cfg, forward, decoder)
    eval_s, eval_gpu = gpu_time(evals * tc.eval_samples * (per_sample + INCEPTION_FLOPS), hw)
    train = Stage("train", f"{tc.steps:,} steps x {tc.global_batch} images, "
                           f"{per_image / 1e9:.0f} GFLOPs per image"
                           + (f", {evals} FID evaluations" if evals else ""),
                  train_s + eval_s, train_gpu + eval_gpu, PROCESS_RAM + 16 * n,
                  space.train_needs(cfg, data / "train", step, ema) + ([copy] if copy else [])
                  + space.dvc_share({data / "train": ema}))

    sample_s, sample_gpu = gpu_time(sc.total * per_sample, hw)
    store = data / "samples" / "shards" / "store"
    samples = space.sample_needs(cfg, store, None, store / "samples.npz")
    sample = Stage("sample", f"{sc.total:,} images x {sc.steps} steps, "
                             f"{per_sample / 1e9:.0f} GFLOPs per image",
                   sample_s, sample_gpu, PROCESS_RAM,
                   samples + space.dvc_share({data / "samples": samples[0].end}))

    # the real images: the dataset's, or for captioned data the val split's
    pool = n if cfg.data.kind == "imagefolder" else val_images(cfg)
    scored = sc.total + min(cfg.evaluate.num_real or pool, pool)
    evaluate_s, evaluate_gpu = gpu_time(scored * INCEPTION_FLOPS, hw, processes=1)
    # features kept for the statistics: pool 2048, spatial 2023, logits 1008, float64
    features = scored * (2048 + 2023 + 1008) * 8
    evaluate = Stage("evaluate", f"Inception on {scored:,} images, FID/sFID/IS/P/R",
                     evaluate_s, evaluate_gpu, PROCESS_RAM + features, [])
    return [encode, train, sample, evaluate]


def sample_flops(cfg: Config, forward: float, decoder: float) -> float:
    """One sample: ``sample.steps`` evaluations of the SiT (two where classifier-free guidance
    applies: over the guidance interval's share of the steps), and one VAE decode."""
    sc = cfg.sample
    guided = (sc.cfg_interval[1] - sc.cfg_interval[0]) if sc.cfg_scale != 1.0 else 0.0
    return sc.steps * forward * (1 + guided) + decoder


def folders(all_needs: list[Need]) -> list[tuple[Path, int, int, int]]:
    """Per folder: (folder, bytes at the end, at the peak, free on its file system)."""
    by_folder: dict[Path, list[Need]] = {}
    for need in all_needs:
        by_folder.setdefault(need.folder, []).append(need)
    out = []
    for folder, needs in by_folder.items():
        end = sum(n.end for n in needs)
        peak = end + max(n.peak - n.end for n in needs)
        out.append((folder, end, peak, space.free_bytes(folder)[0]))
    return out


def duration(seconds: float) -> str:
    return (f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"
            if seconds >= 90 else f"{seconds:.0f} s")


def render(cfg: Config, n: int, counted: str, hw: Hardware, plan: list[Stage]) -> str:
    lines = [f"sra2 plan: preset {cfg.preset}, {cfg.model.name}"
             f" ({registry.titles(cfg)}), {n:,} images ({counted})",
             f"hardware: {hw.gpus} x {hw.gpu} ({hw.peak_tflops:.0f} TFLOP/s dense bf16, MFU "
             f"{hw.mfu:.0%} {hw.mfu_source}), {hw.cores} cores "
             f"(decoding {DECODE_PER_CORE} JPEGs/s a core)", "",
             "| stage | work | time | GPU-hours | host RAM per process |", "|---|---|---|---|---|"]
    for s in plan:
        lines.append(f"| {s.name} | {s.work} | {duration(s.seconds)} | "
                     f"{s.gpu_seconds / 3600:.1f} | {size(s.ram)} |")
    total = sum(s.seconds for s in plan)
    lines += [f"| total | | {duration(total)} | {sum(s.gpu_seconds for s in plan) / 3600:.1f} | |",
              "", "| folder | holds | at the end | at the peak | free now |",
              "|---|---|---|---|---|"]
    all_needs = [need for s in plan for need in s.needs]
    whole = []
    for folder, end, peak, free in folders(all_needs):
        holds = ", ".join(dict.fromkeys(n.what for n in all_needs if n.folder == folder))
        remedy = "; ".join(dict.fromkeys(n.remedy for n in all_needs
                                         if n.folder == folder and n.remedy))
        whole.append(Need(folder, holds, peak, end, remedy))
        lines.append(f"| {folder} | {holds} | {size(end)} | {size(peak)} | {size(free)} |")
    short = space.shortfalls(whole)
    lines += (["", *(f"WILL NOT FIT: {line}" for line in short)] if short
              else ["", "everything fits"])
    return "\n".join(lines)


def hardware(args: argparse.Namespace) -> Hardware:
    import torch

    visible = torch.cuda.device_count()
    gpu = args.gpu or (torch.cuda.get_device_name(0) if visible else "H100")
    peak = flops.peak_tflops(gpu.upper())
    if peak is None:
        raise ValueError(f"--gpu {gpu!r}: unknown; one of {', '.join(flops.PEAK_TFLOPS)}")
    mfu, source = (args.mfu, "given") if args.mfu else (
        measured_mfu(args.gpu_table) or (MFU, "assumed: no bench/gpu.py table"))
    return Hardware(args.gpus or visible or 1, gpu, args.cores or len(os.sched_getaffinity(0)),
                    peak, mfu, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra2 plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter over params.yaml, as dvc exp run -S takes it")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--images", type=int, help="training images (default: counted in "
                        "data.root, else ImageNet's 1,281,167)")
    parser.add_argument("--gpus", type=int, help="GPUs in the run (default: those visible, 1)")
    parser.add_argument("--gpu", help="GPU kind: H100, H200, A100 (default: the visible one)")
    parser.add_argument("--cores", type=int,
                        help="CPU cores for decoding (default: this machine's)")
    parser.add_argument("--mfu", type=float, help=f"model FLOP utilisation, 0-1 (default: "
                        f"measured by bench/gpu.py in --gpu-table, else {MFU})")
    parser.add_argument("--gpu-table", type=Path, default=Path("bench/results/gpu/table.json"),
                        help="bench/gpu.py's table.json (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text()) if args.params.is_file() else {}
    cfg = resolve(apply_overrides(params or {}, args.set), f"{args.params} with -S")
    hw = hardware(args)
    n, counted = images_in(cfg, args.images)
    plan = stages(cfg, n, hw, Path("."))
    print(render(cfg, n, counted, hw, plan))
    if args.json:
        from sra2.runtime import atomic

        atomic.write_json(args.json, {
            "images": n, "stages": {s.name: {"seconds": s.seconds, "gpu_seconds": s.gpu_seconds,
                                             "ram": s.ram} for s in plan},
            "folders": {str(f): {"end": e, "peak": p, "free": fr}
                        for f, e, p, fr in folders([x for s in plan for x in s.needs])}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
