"""Sample images from the EMA weights into a sharded store, then assemble the ADM ``.npz``.

The shards are scratch: once the ``.npz`` is written beside them (``shards/<signature>/
samples.npz``) they are removed, and the stage's ``samples.npz`` is a hard link to that file, so
the 50K images are stored once (DVC's cache links the same file). A rerun with the same weights
and settings checks that file's CRC32 and links it again instead of sampling.

Sample i's label and every noise draw (initial latent, SDE steps) come from seeds derived from
(seed, i) alone, so the images do not depend on the batch size, the number of GPUs or restarts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sra2.config.params import Config, result_settings
from sra2.data import space
from sra2.data.store import ShardedStore, digest, quarantine_folder
from sra2.model import text as text_lib
from sra2.model import vae as vae_lib
from sra2.model.networks import load_checkpoint
from sra2.model.sit import read_checkpoint
from sra2.runtime import atomic, dist, dvc_cache
from sra2.runtime.worker import Progress
from sra2.sample import ralu
from sra2.sample.joint import Joint
from sra2.sample.outputs import (
    npz_damage,
    read_npz_captions,
    read_npz_images,
    write_grid,
    write_npz,
)
from sra2.sample.prompts import Prompts
from sra2.sample.samplers import Generators, derived_seed, guided_velocity, randn, sample

NPZ = "samples.npz"


def sample_labels(seed: int, n: int, num_classes: int, kind: str = "uniform",
                  set_index: int = 0) -> np.ndarray:
    """Labels of samples 0..n-1 of set ``set_index`` (sample.labels). ``uniform``: independent
    uniform draws, as SiT and REPA sample. ``balanced``: n // num_classes of every class and one
    more for n % num_classes distinct seeded classes, in a seeded random order (ADM's contiguous
    Inception Score splits of 5000 then see all classes, not a sorted tenth of them)."""
    rng = np.random.default_rng([seed, n, *([set_index] if set_index else [])])
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


def signature(cfg: Config, ema_sha256: str, prompts: Prompts | None = None) -> dict:
    """What the images depend on: the weights (by digest), the VAE, the sample settings and the
    captions sampled for (``prompts``, text-to-image)."""
    sc = cfg.sample
    exclude = set()
    if sc.sampler != "ralu":  # ralu's settings change the images only when ralu samples
        exclude.add("ralu")
    if sc.seeds == 1:  # what runs made before sets existed drew: their folders stay theirs
        exclude.add("seeds")
    sample = result_settings(sc, exclude=exclude)
    return {"ema_sha256": ema_sha256, "vae": result_settings(cfg.vae), "sample": sample,
            **({"prompts": prompts.signature()} if prompts else {})}


def latents(cfg: Config, model: torch.nn.Module, vae: torch.nn.Module, y: torch.Tensor,
            noise: torch.Tensor, generator: Generators,
            null: torch.Tensor | None = None) -> torch.Tensor:
    """The configured sampler (with guidance) from ``noise`` (of :func:`state_shape`) to latents
    at t = 1; ``null``: the unconditional contexts of caption contexts ``y``."""
    sc, joint = cfg.sample, isinstance(model, Joint)
    # a joint state is guided whole: the latent's channels and the class token
    guide = (y, sc.cfg_scale, None if joint else sc.cfg_channels, sc.cfg_interval)
    if sc.sampler == "ralu":  # never joint (for_sampling)
        return ralu.sample(guided_velocity(model, *guide, tokens=True, null=null), noise,
                           generator, sc.ralu, model.patch_size, model.hidden_size,
                           decode=lambda z: vae_lib.decode(vae, z, cfg.vae.scale))
    z = sample(sc.sampler, guided_velocity(model, *guide, null=null), noise, generator, sc.steps,
               sc.last_step)
    return model.split(z)[0] if joint else z


def for_sampling(cfg: Config, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as the samplers take it: a SiT with a class token (REG) as :class:`Joint`, after
    checking that the settings can sample it."""
    if getattr(model, "cls_dim", None) is None:
        return model
    sc = cfg.sample
    if sc.sampler == "ralu":
        raise ValueError("sample.sampler: ralu cannot sample a SiT with a class token (REG): its "
                         "token sets have no place for it; use sde, ode-euler or ode-heun")
    if sc.cfg_channels != model.in_channels:
        raise ValueError(f"sample.cfg_channels: a SiT with a class token (REG) is guided on the "
                         f"whole latent and the token; set it to {model.in_channels} "
                         f"(got {sc.cfg_channels})")
    return Joint(model)


def state_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """The shape of one sample's state in the samplers."""
    if isinstance(model, Joint):
        return (model.width,)
    return (model.in_channels, model.input_size, model.input_size)


def generate(cfg: Config, ema_path: str | Path, out: str | Path, progress: Progress | None = None,
             npz: Path | None = None, sign: dict | None = None) -> Path:
    """Fill ``out/<signature hash>`` with ``cfg.sample.total`` images (every set); returns the
    store's path. ``npz``: where the caller then writes them as one file (the preflight counts
    it); ``sign``: :func:`signature`, where the caller has it already."""
    sc = cfg.sample
    rank, world = dist.init()
    device = dist.device(sc.device, rank)
    ckpt = read_checkpoint(ema_path)  # weights_only: the file may come from elsewhere
    # our export names its architecture; an official SiT or REPA file takes model.name. REPA-time
    # weights come back wrapped as a SiT-time velocity network, so samplers and CFG run unchanged
    model = for_sampling(cfg, load_checkpoint(ckpt.get("name", cfg.model.name), ckpt,
                                              convention=sc.convention,
                                              source=str(ema_path)).to(device).eval())
    vae = vae_lib.load_vae(cfg.vae, device)
    prompts = Prompts(cfg, device) if cfg.data.kind == "coco" else None
    side, state = cfg.data.image_size, state_shape(model)
    sign = sign or signature(cfg, _file_sha256(Path(ema_path)), prompts)
    # one folder per signature: new weights or settings start afresh, old samples stay put
    path = Path(out) / digest(sign)
    if rank == 0:
        made = ShardedStore.open_or_create(
            path, sc.total, sc.shard_size, 1,  # one image a chunk: read one by one
            {"images": ((side, side, 3), "uint8")},
            fixed=prompts.fixed(sc.seed, sc.total) if prompts else {
                "labels": np.concatenate([sample_labels(sc.seed, sc.num_samples,
                                                        model.num_classes, sc.labels, j)
                                          for j in range(sc.seeds)])},
            signature=sign)
        needs = space.sample_needs(cfg, path, made.pending_shards(), npz)
        space.ensure("sample", needs + space.dvc_share({npz.parent: needs[0].end} if npz else {}))
    dist.barrier()
    store = ShardedStore(path)
    labels = store.array("labels")[:]
    captions = store.array("captions")[:] if prompts else None
    shards = store.pending_shards(rank, world)
    todo = sum(stop - start for start, stop in map(store.shard_range, shards))
    bar = tqdm(total=todo, unit="img", desc="sample", disable=rank != 0 or not todo)
    done = 0
    for shard in shards:
        start, stop = store.shard_range(shard)
        images = []
        for b in range(start, stop, sc.batch_size):
            index = range(b, min(b + sc.batch_size, stop))
            gens = [torch.Generator().manual_seed(derived_seed(sc.seed, i)) for i in index]
            if prompts:  # the captions' contexts, the empty caption's for guidance
                y = prompts.contexts(captions[index.start:index.stop])
                null = prompts.null(len(index))
            else:
                y, null = torch.from_numpy(labels[index.start:index.stop]).to(device), None
            with dist.autocast(device, sc.precision):
                z = latents(cfg, model, vae, y, randn((len(index), *state), gens, device), gens,
                            null)
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
    if rank == 0:  # every rank's shards written: never report a store with a file gone
        store.raise_for(store.check())
    return path


def sample_stage(cfg: Config, ema_path: str | Path, out: str | Path,
                 progress: Progress | None = None) -> dict | None:
    """The sample stage: shards under ``out/shards/<signature>``, assembled there into
    ``samples.npz`` (the shards then removed), linked to ``out/samples.npz``; (rank 0)
    ``grid.png``."""
    out = Path(out)
    prompts = Prompts(cfg) if cfg.data.kind == "coco" else None
    sign = signature(cfg, _file_sha256(Path(ema_path)), prompts)
    folder = out / "shards" / digest(sign)
    kept, npz = folder / NPZ, out / NPZ
    rank = dist.init()[0]
    if rank == 0 and kept.exists():
        _drop_if_damaged(kept, npz)
    dist.barrier()  # every rank sees whether the samples are kept
    if kept.exists():
        if progress:
            progress(0, 0)
    else:
        generate(cfg, ema_path, folder.parent, progress, kept, sign)
        if rank == 0:  # generate has just checked every done shard's files
            write_npz(ShardedStore(folder, check=False), kept)
    if rank != 0:
        return None
    _remove_shards(folder)  # also what a stage killed right after the npz left behind
    atomic.link(kept, npz)
    images, n = read_npz_images(npz), cfg.sample.grid
    # demo weights say what they are on the picture itself
    caption = ""
    if cfg.data.demo is not None:
        text = f"; {text_lib.describe(cfg.text.source)}" if prompts else ""
        caption = f"DEMO: {vae_lib.describe(cfg.vae)}{text}"
    said = read_npz_captions(npz)
    write_grid(images[:n], out / "grid.png", caption, None if said is None else said[:n])
    return {"samples": len(images), "npz": str(npz), "grid": str(out / "grid.png"),
            "kept": str(kept)}


def _drop_if_damaged(kept: Path, npz: Path) -> None:
    """Move ``kept`` aside, with the DVC cache entry of ``npz`` linked to it, when its bytes fail
    the zip's CRC32: the samples are then drawn again."""
    why = npz_damage(kept)
    if why is None:
        return
    folder = quarantine_folder(kept.parent)
    folder.mkdir(parents=True)
    print(f"{kept}: {why}; moved to {folder}: the samples are drawn again", file=sys.stderr)
    dvc_cache.evict_damaged([npz], folder, lambda line: print(line, file=sys.stderr))
    os.replace(kept, folder / kept.name)
    shutil.rmtree(kept.parent)  # a store starts afresh in its place


def _remove_shards(folder: Path) -> None:
    """Everything in the sample store's folder but its ``samples.npz``."""
    for path in folder.iterdir():
        if path.name != NPZ:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
