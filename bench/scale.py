"""The pipeline's own machinery as the dataset grows, run under DVC, extrapolated to ImageNet.

For each N (default 5,000, 20,000 and 80,000 images) it draws an ImageFolder of JPEGs with
ImageNet's shape (1,000 class folders, ~400 x 350 px and ~110 KB a file on average, a few large
and odd ones), makes a DVC workspace with this repository's ``.dvc/config`` and four stages that
run the library's own stage functions (``encode_dataset``, ``train``, ``sample_stage``,
``scores.evaluate``) as ``dvc.yaml`` runs the flows (without Prefect, whose temporary server
costs the same at any N), and measures with ``dvc repro``:

- per stage: wall time, the part of it outside the networks, the stage process's peak RSS and
  anonymous memory (RSS less the page cache it maps), and the peak private (USS: page-cache pages
  it alone maps included) and anonymous memory of each of its worker processes;
- per folder: bytes on disk (each inode once: the workspace's outputs, ``.dvc/cache``'s own, the
  node-local copy) and files; the disk used against what cannot be avoided (store, copy,
  checkpoints, samples once);
- ``dvc status`` and a no-op ``dvc repro``.

Networks are stand-ins where their compute would dominate a CPU, their inputs and outputs shaped
as the real ones: the VAE's encoder gives each 256 px crop's 8 x 8 mean colours under a fixed grain
as a 4 x 32 x 32 posterior (mean, std), its decoder paints 8 x 8 pixel blocks under a grain; the SiT
is SiT-Micro/2 (20 training steps, 2 sampling steps); Inception is a fixed random projection of each
image's 8 x 8 mean colours to the evaluator's feature sizes (2048, 2023, 1008), fed by the same
DataLoader torch-fidelity uses. Every byte written has the shapes of a paper run: samples are
0.625 N (50,000 at N = 80,000), evaluated against as many real crops (``evaluate.reference``
null, the presets' default). Each figure's growth exponent is fitted across N, and the figures
are extrapolated to ImageNet (1,281,167 images; samples stay at 50,000).

    python bench/scale.py --out /tmp/scale                       # ~1 h on 2 cores, ~35 GB
    python bench/scale.py --out /tmp/scale --sizes 5000 --cache-type copy   # DVC's default
    python bench/scale.py --out /tmp/scale --smoke                # tiny sizes, ~1 min
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from sra2.runtime import procs

REPO = Path(__file__).resolve().parents[1]
IMAGENET, PAPER_SAMPLES = 1_281_167, 50_000
SAMPLES_PER_IMAGE = PAPER_SAMPLES / 80_000
STAGES = ("encode", "train", "sample", "evaluate")


# --- the data: an ImageFolder shaped like ImageNet's train split

def jpeg(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> bytes:
    """A photograph-like JPEG: smooth colour fields under grain; the grain sets the bytes."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.normal(0, 26, (height, width, 3))
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "RGB" else image
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct files: sides around 400 x 350 (ImageNet's mean is ~400 x 350, ~110 KB),
    one in 50 large (1600 x 1200), and odd ones: greyscale, CMYK, a thin strip, a tiny image."""
    rng = np.random.default_rng(seed)
    pool = [jpeg(rng, 16, 16), jpeg(rng, 500, 90), jpeg(rng, 300, 300, "L"),
            jpeg(rng, 360, 280, "CMYK")]
    while len(pool) < count:
        if len(pool) % 50 == 0:
            pool.append(jpeg(rng, 1600, 1200))
        else:
            pool.append(jpeg(rng, int(rng.integers(300, 500)), int(rng.integers(250, 450))))
    return pool


def imagefolder(root: Path, n: int, classes: int, pool: list[bytes]) -> Path:
    """``n`` files over ``classes`` folders (n01440764-like names), the pool's bytes in turn."""
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
    for i in range(n):
        c = i % classes
        (root / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG").write_bytes(pool[i % len(pool)])
    (root / ".complete").touch()
    return root


# --- the stages, as the flows run them, with stand-in networks

def config(images: Path, n: int, smoke: bool):
    from sra2.config.params import resolve

    samples = max(16, round(n * SAMPLES_PER_IMAGE))
    return resolve({"preset": "tiny", "data": {"root": str(images), "image_size": 64 if smoke
                                               else 256, "demo": None},
                    "vae": {"source": "random", "random": {"block_out_channels": [8, 8, 8, 8],
                                                           "layers_per_block": 1,
                                                           "norm_num_groups": 4, "seed": 0}},
                    "encode": {"batch_size": 64, "shard_size": 64 if smoke else 1024,
                               "chunk_size": 1, "workers": "auto"},
                    "model": {"name": "SiT-Micro/2", "num_classes": 1000},
                    "train": {"steps": 4 if smoke else 20, "global_batch": 16,
                              "batch_per_gpu": None, "ckpt_every": 10, "copy_dir": "copy",
                              "workers": 1},
                    "sample": {"num_samples": samples, "batch_size": 250,
                               "shard_size": 64 if smoke else 1000, "steps": 2, "grid": 16},
                    "evaluate": {"num_real": samples, "batch_size": 250}})


GRAIN = np.random.default_rng(0).standard_normal((4, 256, 256)).astype(np.float32)


def vae_encode(vae, images):
    """SD-VAE's encoder's stand-in: each crop's 8 x 8 mean colours under a fixed grain, as the
    posterior's (mean, std) of 4 x 32 x 32 for 256 px crops; the grain gives the values the
    random mantissas of real latents (what decides how a store compresses)."""
    import torch

    side = images.shape[-1] // 8
    grain = torch.from_numpy(GRAIN[:, :side, :side])
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) + grain
    return mean, torch.exp(-3 + 0.1 * (mean - grain.roll(1, -1)))


def vae_decode(vae, latents, scale):
    """SD-VAE's decoder's stand-in: each latent's first three channels as 8 x 8 pixel blocks
    under a fixed grain (samples of a barely trained model are noise, and do not compress)."""
    import torch

    x = torch.nn.functional.interpolate(latents[:, :3] / scale, scale_factor=8)
    x = x + torch.from_numpy(GRAIN[:3, :x.shape[-2], :x.shape[-1]])
    return (127.5 * x.tanh() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def timed(module, name: str, spent: list[float], standin=None) -> None:
    """Add the seconds spent in ``module.name`` (or in ``standin``, put in its place) to
    ``spent[0]``: a network's share of the wall."""
    inner = standin or getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(module, name, wrapper)


FEATURES = {"pool": 2048, "spatial": 2023, "logits": 1008}  # the evaluator's
# the smoke's: its matrix roots are cheap
SMOKE_FEATURES = {"pool": 64, "spatial": 64, "logits": 32}


def standin_features(cfg, device, scratch, seen=None, heads=FEATURES):
    """Inception's stand-in: each image's 8 x 8 mean colours through fixed random projections to
    the evaluator's feature sizes, read by the DataLoader torch-fidelity uses (batches, workers)."""
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(192, d, generator=g) / 14 for k, d in heads.items()}

    def features(images):
        out = {k: [] for k in heads}
        for batch in DataLoader(images, batch_size=cfg.evaluate.batch_size, num_workers=1):
            colours = torch.nn.functional.adaptive_avg_pool2d(batch.float() / 255, 8).flatten(1)
            for k in heads:
                out[k].append(torch.tanh(colours @ weights[k]).numpy())
            if seen:
                seen(len(batch))
        return {k: np.concatenate(v) for k, v in out.items()}

    return features


def run_stage(stage: str, images: Path, n: int, smoke: bool) -> dict:
    """One stage in this process, as its flow runs it; returns its measurements."""
    from sra2.data import encode, store
    from sra2.evaluate import scores
    from sra2.model import vae
    from sra2.sample import generate
    from sra2.train import loop as train

    cfg, network = config(images, n, smoke), [0.0]
    watch = Workers()
    start = time.perf_counter()
    if stage == "encode":
        timed(vae, "encode", network, vae_encode)
        result = encode.encode_dataset(cfg, "data/latents", per_settings=True)
        store.write_pointer("data/latents.json", result["store"])
    elif stage == "train":
        timed(train, "train_step", network)
        train.train(cfg, "data/latents.json", "data/train")
    elif stage == "sample":
        timed(generate, "latents", network)
        timed(vae, "decode", network, vae_decode)
        generate.sample_stage(cfg, "data/train/ema.pt", "data/samples")
    else:
        scores.feature_function = functools.partial(
            standin_features, heads=SMOKE_FEATURES if smoke else FEATURES)
        found = scores.evaluate(cfg, "data/samples/samples.npz",
                                store.pointed_store("data/latents.json"))
        Path("data/metrics.json").write_text(json.dumps(found, default=str))
    wall = time.perf_counter() - start
    return {"wall": wall, "outside": wall - network[0],
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **watch.stop()}


class Workers:
    """Peaks, sampled twice a second, of this process's anonymous memory and of the private and
    anonymous memory of each of its children (reader and decoding processes)."""

    def __init__(self):
        import psutil

        self.peak = {"anon": 0, "worker_uss": 0, "worker_anon": 0}
        self.me, self.done = psutil.Process(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            self.peak["anon"] = max(self.peak["anon"], procs.memory()["anonymous"])
            for child in self.me.children(recursive=True):
                try:
                    found = procs.memory(child.pid)
                except (OSError, ValueError, KeyError):  # gone meanwhile
                    continue
                self.peak["worker_uss"] = max(self.peak["worker_uss"], found["private"])
                self.peak["worker_anon"] = max(self.peak["worker_anon"], found["anonymous"])

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join()
        return self.peak


# --- one N under DVC

DVC_YAML = """stages:
  encode:
    cmd: {py} {me} stage encode {args}
    outs:
      - data/latents: {{persist: true}}
      - data/latents.json: {{cache: false}}
  train:
    cmd: {py} {me} stage train {args}
    deps: [data/latents.json]
    outs:
      - data/train/checkpoints: {{persist: true, cache: false}}
      - data/train/ema.pt
  sample:
    cmd: {py} {me} stage sample {args}
    deps: [data/train/ema.pt]
    outs:
      - data/samples/shards: {{persist: true, cache: false}}
      - data/samples/samples.npz
  evaluate:
    cmd: {py} {me} stage evaluate {args}
    deps: [data/samples/samples.npz, data/latents.json]
    outs:
      - data/metrics.json: {{cache: false}}
"""


def workspace(work: Path, images: Path, n: int, smoke: bool, cache_type: str | None) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = quiet_env()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True, env=env)
    subprocess.run(["dvc", "init", "-q"], cwd=work, check=True, env=env)
    shutil.copy(REPO / ".dvc/config", work / ".dvc/config")
    if cache_type:
        subprocess.run(["dvc", "config", "cache.type", cache_type], cwd=work, check=True, env=env)
    args = f"--images {images} --n {n}" + (" --smoke" if smoke else "")
    (work / "dvc.yaml").write_text(DVC_YAML.format(py=sys.executable, me=Path(__file__).resolve(),
                                                   args=args))
    return work


def quiet_env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO),
            "SRA2_COPY_DIR": "copy"}


def seconds(cmd: list[str], cwd: Path, repeats: int = 2) -> float:
    """The fastest of ``repeats`` runs of ``cmd`` (it must succeed)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=quiet_env())
        best = min(best, time.perf_counter() - start)
    return best


def disk(work: Path) -> dict[str, dict[str, int]]:
    """Bytes on disk (each inode counted once, where first met: the workspace's outputs before
    DVC's cache) and files, per folder."""
    seen, out = set(), {}
    for name, folder in [("store", work / "data/latents"), ("checkpoints", work / "data/train"),
                         ("samples", work / "data/samples"), ("copy", work / "copy"),
                         ("dvc cache", work / ".dvc/cache")]:
        nbytes = apparent = files = 0
        for path in folder.rglob("*"):
            st = path.lstat()
            if path.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                nbytes, apparent, files = (nbytes + st.st_blocks * 512, apparent + st.st_size,
                                           files + 1)
        out[name] = {"bytes": nbytes, "apparent": apparent, "files": files}
    return out


def planned(cfg, n: int) -> dict[str, int]:
    """What ``sra2 plan`` foresees for these folders (sra2.data.space, as the preflights count)."""
    from sra2.data import space
    from sra2.data.encode import latent_arrays
    from sra2.data.latent_copy import ARRAYS
    from sra2.train.loop import checkpoint_bytes

    arrays = latent_arrays(cfg, space.latent_shape(cfg))
    step, ema = checkpoint_bytes(cfg)
    raw = space.item_bytes(arrays)
    here = Path("data")
    return {"store": space.encode_needs(cfg, arrays, here / "latents" / "s", n)[0].end,
            "checkpoints": space.train_needs(cfg, here, step, ema)[0].end,
            "samples": sum(x.end for x in space.sample_needs(cfg, here / "s", None, here / "x")),
            "copy": n * sum(raw[a] for a in ARRAYS)}


def planned_decoding(cfg, n: int) -> float:
    """Seconds ``sra2 plan`` foresees for encode's JPEG decoding of ``n`` images on this machine
    (one process: its workers at DECODE_PER_CORE each): what bounds the stage here."""
    from sra2.tools.plan import decoding_seconds

    return decoding_seconds(cfg, n, 1, len(os.sched_getaffinity(0)))


def measure(n: int, args: argparse.Namespace, pool: list[bytes]) -> dict:
    images = imagefolder(args.out / f"images-{n}", n, args.classes, pool)
    work = workspace(args.out / f"work-{n}", images, n, args.smoke, args.cache_type)
    start = time.perf_counter()
    repro = subprocess.run(["dvc", "repro"], cwd=work, capture_output=True, text=True,
                           env=quiet_env())
    if repro.returncode:
        raise RuntimeError(f"dvc repro at N={n} failed:\n"
                           f"{repro.stdout[-3000:]}{repro.stderr[-3000:]}")
    total = time.perf_counter() - start
    stages = {s: json.loads((work / f"{s}.bench.json").read_text()) for s in STAGES}
    used = disk(work)
    avoidable = used["dvc cache"]["bytes"] + used["samples"]["bytes"] - file_blocks(
        work / "data/samples/samples.npz")
    unavoidable = sum(v["bytes"] for v in used.values()) - avoidable
    row = {"n": n, "samples": config(images, n, args.smoke).sample.num_samples,
           "repro": total, "stages": stages, "disk": used,
           "disk_ratio": sum(v["bytes"] for v in used.values()) / unavoidable,
           "planned": planned(config(images, n, args.smoke), n),
           "planned_decoding": planned_decoding(config(images, n, args.smoke), n),
           "dvc_status": seconds(["dvc", "status"], work),
           "dvc_noop_repro": seconds(["dvc", "repro"], work)}
    if not args.keep:
        shutil.rmtree(work)
    return row


def file_blocks(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


# --- the table

def figures(row: dict) -> dict[str, float]:
    """The figures of one N whose growth is fitted."""
    out = {}
    for s in STAGES:
        st = row["stages"][s]
        out[f"{s} outside networks s"] = st["outside"]
        out[f"{s} RSS MB"] = st["rss"] / 1e6
        for key in ("anon", "worker_uss", "worker_anon"):
            label = (key.replace("worker_", "worker ").replace("anon", "anonymous")
                     .replace("uss", "USS"))
            out[f"{s} {label} MB"] = st.get(key, math.nan) / 1e6
    for name, d in row["disk"].items():
        out[f"{name} MB"] = d["bytes"] / 1e6
        out[f"{name} files"] = d["files"]
    out["dvc status s"], out["no-op dvc repro s"] = row["dvc_status"], row["dvc_noop_repro"]
    return out


def scale_of(name: str) -> str:
    """What a figure grows with: the samples (sample, evaluate) or the images."""
    return "samples" if name.startswith(("sample", "evaluate", "samples")) else "n"


def fit(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per figure: (growth exponent over N, extrapolation to ImageNet or to 50,000 samples)."""
    out = {}
    for name in figures(rows[0]):
        # runs that did not record a figure (older ones) leave it out
        pairs = [(r[scale_of(name)], max(figures(r)[name], 1e-9)) for r in rows
                 if math.isfinite(figures(r)[name])]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        if len(set(xs)) < 2:
            out[name] = (math.nan, math.nan)  # one N: nothing to fit
            continue
        slope, icept = np.polyfit(np.log(xs), np.log(ys), 1)
        target = PAPER_SAMPLES if scale_of(name) == "samples" else IMAGENET
        out[name] = (float(slope), float(math.exp(icept) * target ** slope))
    return out


def table(rows: list[dict]) -> str:
    names = list(figures(rows[0]))
    fitted = fit(rows)
    head = ["figure", *(f"N={r['n']:,}" for r in rows), "exponent", "ImageNet"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        values = [figures(r)[name] for r in rows]
        slope, imagenet = fitted[name]
        lines.append(f"| {name} | " + " | ".join(f"{v:,.2f}" for v in values)
                     + f" | {slope:.2f} | {imagenet:,.1f} |")
    per_item = [f"N={r['n']:,}: " + ", ".join(
        f"{s} {1e3 * r['stages'][s]['outside'] / r[scale_of(s)]:.2f} ms" for s in STAGES)
        for r in rows]
    ratios = ", ".join(f"N={r['n']:,}: {r['disk_ratio']:.3f}" for r in rows)
    plan = "; ".join(f"N={r['n']:,}: " + ", ".join(
        f"{k} {v / r['disk'][k].get('apparent', r['disk'][k]['bytes']):.3f}"
        for k, v in r["planned"].items()) for r in rows)
    decoding = ", ".join(f"N={r['n']:,}: "
                         f"{r['planned_decoding'] / r['stages']['encode']['outside']:.2f}"
                         for r in rows)
    return "\n".join(lines + ["", "per item, outside the networks: " + "; ".join(per_item),
                              f"disk used / unavoidable (store + copy + checkpoints + samples "
                              f"once): {ratios}", f"sra2 plan / bytes written: {plan}",
                              "sra2 plan's JPEG decoding / encode outside the networks: "
                              + decoding])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for data and results")
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cache-type", help="DVC cache.type instead of the repository's")
    p.add_argument("--keep", action="store_true", help="keep each N's workspace")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    p.add_argument("--report", action="store_true", help="print the table of --out's scale.json")
    args = p.parse_args(argv)
    if args.report:
        rows = json.loads((args.out / "scale.json").read_text())
        for r in rows:  # runs saved before the plan's figures were recorded
            cfg = config(args.out / f"images-{r['n']}", r["n"], False)
            r.setdefault("planned", planned(cfg, r["n"]))
            r.setdefault("planned_decoding", planned_decoding(cfg, r["n"]))
        print(table(rows))
        return 0
    if args.smoke:  # one small N: every stage and measurement once (no growth to fit)
        args.sizes, args.classes = [64], 4
    args.out.mkdir(parents=True, exist_ok=True)
    pool = jpeg_pool(8 if args.smoke else 400)
    print(f"JPEG pool: {len(pool)} files, {np.mean([len(b) for b in pool]) / 1e3:.0f} KB mean")
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args, pool))
        (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
        print(f"N={n:,}: dvc repro {rows[-1]['repro']:.0f} s", flush=True)
    print(table(rows))
    return 0


def stage_main(argv: list[str]) -> int:
    """``scale.py stage NAME --images DIR --n N [--smoke]``: what dvc.yaml's stages run."""
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=STAGES)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    result = run_stage(a.name, a.images, a.n, a.smoke)
    Path(f"{a.name}.bench.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(stage_main(sys.argv[2:]) if sys.argv[1:2] == ["stage"] else main())
