"""Encode an ImageFolder into a latent store: decode and crop in worker processes, run the VAE
in batches, write finished shards from a background thread.

The encode stage keeps one store per encode settings, ``<out>/<digest>/`` (:func:`settings_store`):
changing a setting starts a new store beside the old ones, and going back reopens the old one,
finished, instead of encoding again."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sra2.config.params import Config, result_settings
from sra2.data import space
from sra2.data.captions import Captioned, listing
from sra2.data.images import BadImage, ImageList, center_crop_arr, load_rgb, oddity
from sra2.data.store import ShardedStore, attributes, digest
from sra2.model import text as text_lib
from sra2.model import vae as vae_lib
from sra2.runtime import dist, dvc_cache
from sra2.runtime.worker import Progress

# one rank's decoding processes at most: one H100 eats ~730 SD-VAE encodes/s in fp32, ~1,450 in
# bf16 (its FLOPs at 40% MFU), which ~4 or ~8 cores decode and crop at ~200 ImageNet-like JPEGs/s
# a core (bench/decode.py); twice that would sit idle, holding memory
MAX_WORKERS = 16


def decode_workers(setting: int | str, cores: int | None = None,
                   processes: int | None = None) -> int:
    """``encode.workers`` as a number of processes: a number as it is; ``auto``: this rank's share
    of ``cores`` (default: the cores this process may run on) among the node's ``processes``
    encoding at once (default: torchrun's ``LOCAL_WORLD_SIZE``, 1 outside torchrun), less one core
    for the rank itself, at least 1 and at most :data:`MAX_WORKERS`. torchrun does not pin its
    workers to cores, so each rank sees all the node's cores the job may use."""
    if setting != "auto":
        return setting
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if processes is None else processes
    return max(1, min(MAX_WORKERS, cores // processes - 1))


class _CroppedFiles(Dataset):
    """Item i: (i, uint8 CHW crop or zeros, "WxH" before cropping or "", reason it was rejected or
    "", why it is odd (:func:`sra2.data.images.oddity`) or "")."""

    def __init__(self, images: ImageList, size: int, strict: bool, odd_images: str):
        self.images, self.size, self.strict, self.odd_images = images, size, strict, odd_images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.root / self.images.files[i]
        blank = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        try:
            image = load_rgb(path)
        except BadImage as e:
            if self.strict:
                raise BadImage(f"{path}: {e} (encode.strict is on)") from None
            return i, blank, "", str(e), ""
        size, odd = f"{image.width}x{image.height}", oddity(image.size)
        if odd and self.odd_images == "reject":
            return i, blank, size, f"odd image {size}: {odd} (encode.odd_images is reject)", ""
        arr = center_crop_arr(image, self.size)
        return i, torch.from_numpy(arr.transpose(2, 0, 1).copy()), size, "", odd


def _signature(cfg: Config, split: Captioned) -> dict:
    # a retrained VAE at the same path, or drawn demo images under the same names, are other
    # bytes: their weights' digest (which stands for demo.vae, its training) and the drawing
    # settings name the store too. Left out here only: vae.scale, which multiplies the latents
    # after they are stored (it changes training's results, not the store's), and shard_size,
    # which the store's attributes record beside this signature. pixels and odd_images only where
    # not at their defaults: stores encoded before these settings existed keep their folders
    # captioned data: the captions and the text encoder (and its files' digest) name it too
    weights, demo, images = vae_lib.weights_digest(cfg.vae), cfg.data.demo, split.images
    defaults = {"pixels": False, "odd_images": "accept"}
    left_out = {"shard_size", *(k for k, v in defaults.items() if getattr(cfg.encode, k) == v)}
    listed = {"files": images.files, "labels": images.labels}
    text = {}
    if split.captions is not None:
        listed["captions"] = split.captions
        text = {"text": cfg.text.model_dump(),
                **({"text_weights": w} if (w := text_lib.weights_digest(cfg.text.source)) else {})}
    return {"vae": result_settings(cfg.vae, exclude={"scale"}), "image_size": cfg.data.image_size,
            "files": digest(listed), **result_settings(cfg.encode, exclude=left_out),
            **({"vae_weights": weights} if weights else {}), **text,
            # the val split, and the text encoder's shape (its files' digest is in), are not
            **({"demo": result_settings(demo, exclude={"vae", "text", "val_per_class"})}
               if demo else {})}


def settings_store(cfg: Config, folder: str | Path, split: Captioned) -> Path:
    """``folder/<digest>``: the store for these settings and files, named by the digest of the
    attributes the store records (so it is the one store that would open without a mismatch)."""
    attrs = attributes(len(split.images), cfg.encode.shard_size, _signature(cfg, split))
    return Path(folder) / digest(attrs)


def latent_arrays(cfg: Config, latent_shape: tuple[int, ...],
                  text_width: int | None = None) -> dict[str, tuple]:
    """(item shape, dtype) of each array written shard by shard: the latents, with
    ``encode.pixels`` the uint8 (H, W, 3) ADM crops they were encoded from (``images``), and for
    captioned data each caption's context (``context``: captions x tokens x ``text_width``)."""
    names = ["mean", "std"] + (["mean_flip", "std_flip"] if cfg.encode.flip else [])
    size, tc = cfg.data.image_size, cfg.text
    context = (tc.captions_per_image, tc.max_length, text_width)
    return {**{n: (latent_shape, cfg.encode.dtype) for n in names},
            **({"images": ((size, size, 3), "uint8")} if cfg.encode.pixels else {}),
            **({"context": (context, tc.dtype)} if text_width else {})}


def open_store(cfg: Config, out: str | Path, split: Captioned, latent_shape,
               text: text_lib.TextEncoder | None = None) -> ShardedStore:
    """The store of ``split``; for captioned data with the captions (``captions``: images x
    captions) and the empty caption's context (``empty_context``: 1 x tokens x width)."""
    images = split.images
    fixed = {"labels": np.asarray(images.labels, np.int64),
             "files": np.asarray(images.files, dtype=np.dtypes.StringDType())}
    if text is not None:
        fixed["captions"] = np.asarray(split.captions, dtype=np.dtypes.StringDType())
        fixed["empty_context"] = text([""]).cpu().numpy().astype(cfg.text.dtype)
    return ShardedStore.open_or_create(
        out, len(images), cfg.encode.shard_size, cfg.encode.chunk_size,
        latent_arrays(cfg, latent_shape, text and text.width), fixed=fixed,
        signature=_signature(cfg, split))


def _batches(store: ShardedStore, shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches never cross a shard boundary, so a shard's bytes do not depend on what ran before."""
    out = []
    for s in shards:
        start, stop = store.shard_range(s)
        out += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return out


class _ShardAssembler:
    """Collects batch results per shard and hands complete shards to a writer thread."""

    def __init__(self, store: ShardedStore, dtypes: dict[str, str]):
        self.store, self.dtypes = store, dtypes
        self.parts: dict[int, list] = {}
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def add(self, indices: list[int], outputs: list[np.ndarray], rejects: list[dict],
            odd: list[dict]) -> None:
        shard = indices[0] // self.store.shard_size
        self.parts.setdefault(shard, []).append((outputs, rejects, odd, len(indices)))
        start, stop = self.store.shard_range(shard)
        if sum(p[3] for p in self.parts[shard]) == stop - start:
            self._submit(shard, self.parts.pop(shard))

    def _submit(self, shard: int, parts: list) -> None:
        while len(self.pending) >= 2:  # bound the memory held by shards waiting to be written
            self.pending.pop(0).result()
        self.pending.append(self.writer.submit(self._write, shard, parts))

    def _write(self, shard: int, parts: list) -> None:
        data = {n: np.concatenate([p[0][k] for p in parts]).astype(dtype, copy=False)
                for k, (n, dtype) in enumerate(self.dtypes.items())}
        self.store.write_shard(shard, data, {"rejects": [r for p in parts for r in p[1]],
                                             "odd": [r for p in parts for r in p[2]]})

    def close(self) -> None:
        for f in self.pending:
            f.result()
        self.writer.shutdown()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_encoder(vae: torch.nn.Module, batch: int, size: int, device: torch.device,
                    precision: str = "fp32", repeats: int = 3) -> float:
    """Images/s of the bare VAE encoder on a batch already on the device (after one warm-up)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with dist.autocast(device, precision):
        vae_lib.encode(vae, x)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            vae_lib.encode(vae, x)
        _synchronize(device)
    return batch * repeats / (time.perf_counter() - start)


def _plan(cfg: Config, images: ImageList, store: ShardedStore, todo: int, world: int,
          vae: torch.nn.Module, device: torch.device, bytes_per_image: int) -> str:
    """The line printed before the work: files, store size and an ETA from the VAE's own speed."""
    gib = len(images) * bytes_per_image / 2**30
    kind = ("captioned images" if cfg.data.kind == "coco"
            else f"files in {len(images.classes)} classes")
    line = (f"encode: {len(images)} {kind}, "
            f"{store.num_shards - len(store.pending_shards())} of {store.num_shards} shards done, "
            f"{todo} images to encode on {world} process(es); store ~{gib:.2f} GiB uncompressed")
    if not todo:
        return line
    rate = measure_encoder(vae, cfg.encode.batch_size, cfg.data.image_size, device,
                           cfg.encode.precision)
    rate *= world / (2 if cfg.encode.flip else 1)
    return line + f"; about {todo / rate / 60:.1f} min at the VAE's {rate:.0f} images/s"


def encode_dataset(cfg: Config, out: str | Path, progress: Progress | None = None,
                   per_settings: bool = False) -> dict:
    """Encode ``cfg.data.root`` into the store at ``out`` (with ``per_settings``, into
    ``out/<digest of the settings>``, :func:`settings_store`); returns a summary of the whole
    store, with its path (``store``) and the images this call encoded (``encoded_now``)."""
    rank, world = dist.init()
    split = listing(cfg)
    images, captions = split.images, split.captions
    written = Path(out)  # the folder of stores, or the one store: what DVC records
    if per_settings:
        out = settings_store(cfg, out, split)
    device = dist.device(cfg.encode.device, rank)
    vae = vae_lib.load_vae(cfg.vae, device)
    text = None if captions is None else text_lib.load_text_encoder(
        cfg.text.source, cfg.text.max_length, device)
    side = cfg.data.image_size // vae_lib.downsampling(vae)
    latent_shape = (vae.config.latent_channels, side, side)
    arrays = latent_arrays(cfg, latent_shape, text and text.width)
    if rank == 0:
        # DVC copied the stores it caches out of its cache before this stage: links, not copies
        dvc_cache.relink(written)
        store = open_store(cfg, out, split, latent_shape, text)
        # every rank's share, counted before any rank starts writing
        pending = sum(stop - start
                      for start, stop in map(store.shard_range, store.pending_shards()))
        needs = space.encode_needs(cfg, arrays, store.path, store.num_items,
                                   store.pending_shards())
        space.ensure("encode", needs + space.dvc_share({store.path.parent: needs[0].end}))
    dist.barrier()
    store = ShardedStore(out) if rank else store
    shards = store.pending_shards(rank, world)
    todo = sum(stop - start for start, stop in map(store.shard_range, shards))
    if rank == 0:
        per_image = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                        for shape, dtype in arrays.values())
        print(_plan(cfg, images, store, todo, world, vae, device, per_image))

    workers = decode_workers(cfg.encode.workers)
    loader = DataLoader(
        _CroppedFiles(images, cfg.data.image_size, cfg.encode.strict, cfg.encode.odd_images),
        batch_sampler=_batches(store, shards, cfg.encode.batch_size),
        num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        # not fork: a worker forked from a process running Prefect's threads dies at exit
        multiprocessing_context="forkserver" if workers else None)
    assembler = _ShardAssembler(store, {name: dtype for name, (_, dtype) in arrays.items()})
    start, done = time.perf_counter(), 0
    bar = tqdm(total=todo, unit="img", desc="encode", disable=rank != 0 or not todo, smoothing=0.1)

    def finish(indices: list[int], sizes: list[str], reasons: list[str], odd: list[str],
               staged: list[torch.Tensor], ready) -> None:
        nonlocal done
        if ready is not None:
            ready.synchronize()
        rejects = [{"index": i, "file": images.files[i], "reason": r}
                   for i, r in zip(indices, reasons) if r]
        odd_ones = [{"index": i, "file": images.files[i], "size": s, "reason": o}
                    for i, s, o in zip(indices, sizes, odd) if o]
        assembler.add(indices, [t.numpy() for t in staged], rejects, odd_ones)
        done += len(indices)
        bar.update(len(indices))
        if progress:
            progress(done, todo)

    in_flight = None  # on a GPU, batch i is copied back while batch i + 1 is encoded
    try:
        for idx, pixels, sizes, reasons, odd in loader:
            x = pixels.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            with dist.autocast(device, cfg.encode.precision):
                views = [x, x.flip(3)] if cfg.encode.flip else [x]
                outputs = [t for v in views for t in vae_lib.encode(vae, v)]
            staged = [t.to("cpu", non_blocking=True) for t in outputs]
            if cfg.encode.pixels:  # the crops the VAE saw (zeros for a rejected file), HWC
                staged.append(pixels.permute(0, 2, 3, 1))
            if text is not None:  # every caption of the batch's images, in their order
                said = [c for i in idx.tolist() for c in captions[i]]
                staged.append(text(said).unflatten(0, (len(idx), -1)).to("cpu", non_blocking=True))
            ready = torch.cuda.Event() if device.type == "cuda" else None
            if ready is not None:
                ready.record()
            if in_flight:
                finish(*in_flight)
            in_flight = (idx.tolist(), sizes, reasons, odd, staged, ready)
        if in_flight:
            finish(*in_flight)
    finally:
        assembler.close()
        bar.close()
    seconds = time.perf_counter() - start
    if progress and not todo:  # nothing left to encode: say it is complete
        progress(0, 0)
    dist.barrier()
    if rank == 0:  # every rank's shards written: never report a store with a file gone
        store.raise_for(store.check())
    return summarize(store, seconds, done, pending if rank == 0 else None)


def rejects(store: ShardedStore) -> list[dict]:
    """Files of finished shards that could not be decoded (or odd ones, with encode.odd_images
    reject): index, file and reason."""
    return [r for rec in store.records() for r in rec["rejects"]]


def odd_images(store: ShardedStore) -> list[dict]:
    """Encoded files of finished shards whose crop shows little of them: index, file, size and
    reason (none in done marks written before this list existed)."""
    return [r for rec in store.records() for r in rec.get("odd", [])]


def first_files(records: list[dict], n: int = 5) -> str:
    """': a.JPEG, b.JPEG (1x1) and 3 more' for a log line: the first ``n`` files, with their size
    where it is recorded; "" for none."""
    named = [r["file"] + (f" ({r['size']})" if r.get("size") else "") for r in records[:n]]
    more = f" and {len(records) - n} more" if len(records) > n else ""
    return f": {', '.join(named)}{more}" if records else ""


def summarize(store: ShardedStore, seconds: float, encoded_now: int,
              encoded_all: int | None = None) -> dict:
    """``encoded_now`` images were encoded by this process in ``seconds``; ``encoded_all`` by all
    processes of the run (rank 0 knows it; default ``encoded_now``)."""
    rejected, odd = rejects(store), odd_images(store)
    return {
        "store": str(store.path),
        "files": store.num_items,
        "encoded_now": encoded_now if encoded_all is None else encoded_all,
        "encoded": store.num_items - len(rejected) if store.complete else None,
        "rejected": len(rejected),
        "rejects": rejected,
        "odd": len(odd),
        "odd_images": odd,
        "complete": store.complete,
        "seconds": round(seconds, 2),
        "images_per_s": round(encoded_now / seconds, 2) if seconds > 0 else None,
    }
