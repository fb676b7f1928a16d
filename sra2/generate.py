"""Sample images from the EMA weights into a sharded store, then assemble the ADM ``.npz``.

Sample i's label and every noise draw (initial latent, SDE steps) come from seeds derived from
(seed, i) alone, so the images do not depend on the batch size, the number of GPUs or restarts.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from sra2 import atomic, dist, ralu, vae as vae_lib
from sra2.config import Config
from sra2.models import load_checkpoint, read_checkpoint
from sra2.sampling import Generators, guided_velocity, randn, sample
from sra2.store import ShardedStore, digest

Progress = Callable[[int, int], None]


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def sample_labels(seed: int, n: int, num_classes: int, kind: str = "uniform") -> np.ndarray:
    """Labels of samples 0..n-1 (sample.labels). ``uniform``: independent uniform draws, as SiT and
    REPA sample. ``balanced``: n // num_classes of every class and one more for n % num_classes
    distinct seeded classes, in a seeded random order (ADM's contiguous Inception Score splits of
    5000 then see all classes, not a sorted tenth of them)."""
    rng = np.random.default_rng([seed, n])
    if kind == "uniform":
        return rng.integers(0, num_classes, n, dtype=np.int64)
    if kind == "balanced":
        extra = rng.choice(num_classes, n % num_classes, replace=False)
        labels = np.concatenate([np.repeat(np.arange(num_classes), n // num_classes), extra])
        return rng.permutation(labels).astype(np.int64)
    raise ValueError(f"sample.labels: {kind!r} is neither 'uniform' nor 'balanced'")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def latents(cfg: Config, model: torch.nn.Module, vae: torch.nn.Module, y: torch.Tensor,
            noise: torch.Tensor, generator: Generators) -> torch.Tensor:
    """The configured sampler (with guidance) from ``noise`` to latents at t = 1."""
    sc = cfg.sample
    guide = (y, sc.cfg_scale, sc.cfg_channels, sc.cfg_interval)
    if sc.sampler == "ralu":
        return ralu.sample(guided_velocity(model, *guide, tokens=True), noise, generator,
                           sc.ralu, model.patch_size, model.hidden_size,
                           decode=lambda z: vae_lib.decode(vae, z, cfg.vae.scale))
    return sample(sc.sampler, guided_velocity(model, *guide), noise, generator, sc.steps,
                  sc.last_step)


def generate(cfg: Config, ema_path: str | Path, out: str | Path, progress: Progress | None = None) -> Path:
    """Fill ``out/<signature hash>`` with ``cfg.sample.num_samples`` images; returns the store's path."""
    sc = cfg.sample
    rank, world = dist.init()
    device = dist.device(sc.device, rank)
    ckpt = read_checkpoint(ema_path)  # weights_only: the file may come from elsewhere
    # our export names its architecture; an official SiT or REPA file takes model.name. REPA-time
    # weights come back wrapped as a SiT-time velocity network, so samplers and CFG run unchanged
    model = load_checkpoint(ckpt.get("name", cfg.model.name), ckpt, convention=sc.convention,
                            source=str(ema_path)).to(device).eval()
    vae = vae_lib.load_vae(cfg.vae, device)
    side, channels = cfg.data.image_size, model.in_channels
    latent = (channels, model.input_size, model.input_size)
    # what does not change the images is left out (and ralu's settings unless it samples)
    ignored = {"batch_size", "grid", "device"} | ({"ralu"} if sc.sampler != "ralu" else set())
    signature = {"ema_sha256": _file_sha256(Path(ema_path)), "vae": cfg.vae.model_dump(),
                 "sample": sc.model_dump(exclude=ignored)}
    # one folder per signature: new weights or settings start afresh, old samples stay put
    path = Path(out) / digest(signature)
    if rank == 0:
        ShardedStore.open_or_create(
            path, sc.num_samples, sc.shard_size, 1,  # one image a chunk: read one by one
            {"images": ((side, side, 3), "uint8")},
            fixed={"labels": sample_labels(sc.seed, sc.num_samples, model.num_classes, sc.labels)},
            signature=signature)
    dist.barrier()
    store = ShardedStore(path)
    labels = store.array("labels")[:]
    shards = store.pending_shards(rank, world)
    todo = sum(stop - start for start, stop in map(store.shard_range, shards))
    bar = tqdm(total=todo, unit="img", desc="sample", disable=rank != 0 or not todo)
    done = 0
    for shard in shards:
        start, stop = store.shard_range(shard)
        images = []
        for b in range(start, stop, sc.batch_size):
            index = range(b, min(b + sc.batch_size, stop))
            gens = [torch.Generator().manual_seed(sample_seed(sc.seed, i)) for i in index]
            y = torch.from_numpy(labels[index.start:index.stop]).to(device)
            with dist.autocast(device, sc.precision):
                z = latents(cfg, model, vae, y, randn((len(index), *latent), gens, device), gens)
            images.append(vae_lib.decode(vae, z, cfg.vae.scale).cpu().numpy())
            done += len(index)
            bar.update(len(index))
            if progress:
                progress(done, todo)
        store.write_shard(shard, {"images": np.concatenate(images)}, {})
    bar.close()
    if progress and not todo:  # nothing left to sample: say it is complete
        progress(0, 0)
    dist.barrier()
    return path


def write_npz(store: ShardedStore, path: str | Path) -> None:
    """``arr_0`` uint8 [N, H, W, 3], streamed shard by shard (50K images do not fit in memory twice)."""
    images = store.array("images")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(images.shape)}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for shard in range(store.num_shards):
                    member.write(np.ascontiguousarray(images[slice(*store.shard_range(shard))]).tobytes())

    atomic.write_with(path, write)


def read_npz_images(path: str | Path) -> np.ndarray:
    """``arr_0`` of an uncompressed ``.npz`` as a read-only memory map (no 10 GB load for 50K)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("arr_0.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return np.load(path)["arr_0"]
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # local file header: name and extra field lengths
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, fortran, dtype = read_header(f)
        return np.memmap(f, dtype=dtype, mode="r", shape=shape, offset=f.tell(),
                         order="F" if fortran else "C")


def write_grid(images: np.ndarray, path: str | Path, caption: str = "") -> None:
    """A square PNG grid of uint8 NHWC images, with an optional caption strip on top."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    top = 14 if caption else 0
    canvas = Image.new("RGB", (cols * w, rows * h + top), "white")
    for i, img in enumerate(images):
        canvas.paste(Image.fromarray(img), ((i % cols) * w, top + (i // cols) * h))
    if caption:
        ImageDraw.Draw(canvas).text((2, 1), caption, fill="red")
    atomic.write_with(path, lambda f: canvas.save(f, format="PNG"))


def sample_stage(cfg: Config, ema_path: str | Path, out: str | Path,
                 progress: Progress | None = None) -> dict | None:
    """The sample stage: shards under ``out/shards``, then (rank 0) ``samples.npz`` and ``grid.png``."""
    out = Path(out)
    store = ShardedStore(generate(cfg, ema_path, out / "shards", progress))
    if dist.init()[0] != 0:
        return None
    write_npz(store, out / "samples.npz")
    # demo weights say what they are on the picture itself
    caption = f"DEMO: {vae_lib.describe(cfg.vae)}" if cfg.data.demo is not None else ""
    write_grid(store.array("images")[: cfg.sample.grid], out / "grid.png", caption)
    return {"samples": store.num_items, "npz": str(out / "samples.npz"), "grid": str(out / "grid.png"),
            "shards": str(store.path)}
