"""Training batches: reader processes fetch the rows of step s (``batch_indices``) ahead of the
training loop, from the node-local memory-mapped copy of the latent store
(:mod:`sra2.data.latent_copy`) or from the zarr store itself, so host memory does not grow with the
dataset.

Item s of :class:`StepBatches` is this rank's slice of global batch s: the posterior mean and std
and the label of each latent (and for REPA its training image, uint8 (N, H, W, 3), from a store
encoded with ``encode.pixels``), exactly the rows an in-memory copy of the accepted latents would
give, whichever way they are read. Only the labels and the map from accepted to stored indices
stay in each process's memory (16 bytes an image: 20 MB for ImageNet); the copy's pages live in
the page cache, shared by every process of the node.
"""

from __future__ import annotations

import functools
import multiprocessing.forkserver
import os
import signal
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sra2.config.params import Config
from sra2.data import latent_copy
from sra2.data.encode import rejects
from sra2.data.store import ShardedStore, StoredArray, pointed_store


def batch_indices(step: int, batch: int, n: int, seed: int, rank: int = 0,
                  world: int = 1) -> np.ndarray:
    """Indices of this rank's slice of global batch ``step``: epoch e visits a permutation drawn
    from (seed, e), so the order depends on the step only, not on restarts or world size."""
    per_rank = batch // world
    positions = np.arange(step * batch + rank * per_rank, step * batch + (rank + 1) * per_rank)
    epochs = positions // n
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(seed, int(e), n)[positions[sel] % n]
    return out


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepBatches(Dataset):
    """Item ``step``: {"mean", "std", "labels"} of this rank's part of global batch ``step``, with
    "context" (one drawn caption's features of each image, :meth:`caption_picks`) where the store
    has captions and "images" (uint8 (N, H, W, 3)) where ``images``, read from ``copy`` (a
    :class:`sra2.data.latent_copy.LatentCopy` of the store at ``path``, with images where
    ``images``) when given, else from the store. The copy's shared lock stays held until the
    process ends or ``copy.close()``."""

    def __init__(self, path: str | Path, global_batch: int, seed: int, rank: int = 0,
                 world: int = 1, copy: latent_copy.LatentCopy | None = None, images: bool = False):
        store = ShardedStore(path)
        if not store.complete:
            raise RuntimeError(f"latent store {path} is incomplete ({len(store.done_shards())} of "
                               f"{store.num_shards} shards): run the encode stage to the end first")
        if images:
            require_images(store, "this run")
        self.names = latent_copy.trained_arrays(store, images)
        if copy is not None and copy.names != self.names:
            raise ValueError(f"the latent copy {copy.folder} holds {copy.names}, the batches read "
                             f"{self.names}")
        rejected = {r["index"] for r in rejects(store)}
        # accepted position -> stored index; rejected files never reach a batch
        self.rows = np.array([i for i in range(store.num_items) if i not in rejected], np.int64)
        self.labels = store.array("labels")[:][self.rows]
        self.shape = tuple(store.array("mean").shape[1:])
        # captioned data: captions per image, and the empty caption's context (the null condition)
        self.captions, self.empty_context = None, None
        if latent_copy.CONTEXT in self.names:
            self.captions = store.array(latent_copy.CONTEXT).shape[1]
            self.empty_context = store.array("empty_context")[:].astype(np.float32)
        self.signature = store.attrs["signature"]
        self.path, self.global_batch, self.seed, self.rank, self.world = (
            str(path), global_batch, seed, rank, world)
        self.copy = copy
        self.files = {name: copy.file(name) for name in self.names} if copy else None
        self._arrays = None  # opened in the process that reads (zarr handles are not shared)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # a reader process gets the file names, not the lock or the open arrays of its parent
        return {**self.__dict__, "copy": None, "_arrays": None}

    def _readers(self) -> dict:
        """Per array, a function from stored rows (in batch order) to their values, made in the
        process that reads: a gather from the copy's memory map (any order costs the same in
        memory), or one sorted read from the zarr store."""
        if self._arrays is None:
            if self.files:
                self._arrays = {name: functools.partial(_mapped_read, np.load(f, mmap_mode="r"))
                                for name, f in self.files.items()}
            else:  # opened by the constructor, which checked the files
                store = ShardedStore(self.path, check=False)
                self._arrays = {name: functools.partial(_sorted_read, store.array(name))
                                for name in self.names}
        return self._arrays

    def caption_picks(self, step: int) -> np.ndarray:
        """Which caption of each of this rank's images step ``step`` trains on: uniform draws for
        the global batch from (seed, step), as REPA draws one per image each time it is read."""
        picks = np.random.default_rng([self.seed, step, CAPTION_DRAWS]).integers(
            0, self.captions, self.global_batch)
        per_rank = self.global_batch // self.world
        return picks[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        picked = batch_indices(step, self.global_batch, len(self.rows), self.seed, self.rank,
                               self.world)
        rows = self.rows[picked]
        out = {}
        for name, read in self._readers().items():
            if name == latent_copy.IMAGES:
                out[name] = torch.from_numpy(read(rows))
                continue
            picks = self.caption_picks(step) if name == latent_copy.CONTEXT else None
            out[name] = torch.from_numpy(read(rows, picks).astype(np.float32, copy=False))
        out["labels"] = torch.from_numpy(self.labels[picked])
        return out


# the caption draws' own stream beside (seed, step): no other draw of a step is seeded so
CAPTION_DRAWS = 0x636170


def _mapped_read(array: np.ndarray, rows: np.ndarray,
                 picks: np.ndarray | None = None) -> np.ndarray:
    """Rows of a memory-mapped array; with ``picks``, caption ``picks[i]`` of row ``rows[i]``."""
    return array[rows] if picks is None else array[rows, picks]


def _sorted_read(array: StoredArray, rows: np.ndarray,
                 picks: np.ndarray | None = None) -> np.ndarray:
    # one sorted read per array (a batch spanning two epochs may hold an item twice)
    stored, back = np.unique(rows, return_inverse=True)
    values = array[stored][back]
    return values if picks is None else values[np.arange(len(rows)), picks]


def read_rate(batches: StepBatches, steps: int = 3) -> float:
    """Latents/s one process reads from ``batches`` (steps 1.. ``steps``, after opening
    on step 0)."""
    size = len(batches[0]["labels"])
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batches[step]
    return steps * size / (time.perf_counter() - start)


def require_images(store: ShardedStore, needed_by: str) -> None:
    """Fail unless ``store`` holds the training images (what DINOv2 sees for REPA and REG)."""
    if latent_copy.IMAGES not in store.group:
        raise ValueError(f"{needed_by} needs the training images, and the latent store "
                         f"{store.path} was encoded without pixels: set encode.pixels: true and "
                         f"run the encode stage (dvc repro encode)")


def open_batches(cfg: Config, latents: str | Path, rank: int = 0, world: int = 1,
                 log=print, images_for: Sequence[str] = ()) -> StepBatches:
    """This rank's batches, read as ``train.read_from`` says: from the node-local copy (built
    first if this node has none), or from the store; with the images where the methods of
    ``images_for`` (their switches, ``repa.enabled``) need them (a store without them fails here,
    before any copying). Where the copy cannot be made, the store is read (``.copy`` is None)."""
    tc, store, images = cfg.train, pointed_store(latents), bool(images_for)
    if images:
        require_images(ShardedStore(store), " and ".join(images_for))
    copy = latent_copy.ensure(store, tc.copy_dir, log, images) if tc.read_from == "copy" else None
    return StepBatches(store, tc.global_batch, tc.seed, rank, world, copy, images)


def step_loader(batches: StepBatches, start: int, stop: int, workers: int, pin: bool) -> DataLoader:
    """Steps ``start``..``stop - 1`` in order, read by ``workers`` processes ahead of use."""
    return DataLoader(batches, sampler=range(start, stop), batch_size=None, num_workers=workers,
                      pin_memory=pin, prefetch_factor=4 if workers else None,
                      # not fork: zarr's I/O thread does not survive a fork
                      multiprocessing_context="forkserver" if workers else None)


def _own_process_group(_worker: int) -> None:
    # a reader leaves the trainer's process group: torchrun's SIGTERM to that group and a
    # terminal's Ctrl-C are the trainer's to handle, which stops the readers when done with them
    with suppress(OSError):
        os.setpgid(0, 0)


def stream(data: StepBatches, start: int, stop: int, workers: int, device: torch.device):
    """Batches of steps ``start``.. ``stop - 1``, read ahead by ``workers`` processes that outlive
    a stop signal: the step in progress and the next (which several ranks may need before they
    agree to stop) still get their data."""
    if start >= stop:
        return []
    if workers and threading.current_thread() is threading.main_thread():
        # the fork server that starts the readers ignores SIGTERM (it stays ignored across its
        # exec; it ignores SIGINT itself): started here, before the trainer handles SIGTERM
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    loader = step_loader(data, start, stop, workers, device.type == "cuda")
    loader.worker_init_fn = _own_process_group
    return loader


def write_synthetic_store(path: str | Path, items: int, shape: tuple[int, ...], classes: int,
                          chunk_size: int, shard_size: int, dtype: str = "float32",
                          rejected: tuple[int, ...] = (), seed: int = 0,
                          image_size: int | None = None,
                          context: tuple[int, int, int] | None = None) -> ShardedStore:
    """A complete latent store of seeded random latents, laid out as encode lays it out (for
    benchmarks and tests at sizes no demo dataset reaches), with seeded random uint8 images of
    ``image_size`` px where given (as ``encode.pixels`` stores them) and float16 caption contexts
    of ``context`` (captions, tokens, width) where given; ``rejected`` items are marked as
    undecodable files."""
    rng = np.random.default_rng(seed)
    pixels = (image_size, image_size, 3) if image_size else None
    arrays = {"mean": (shape, dtype), "std": (shape, dtype),
              **({latent_copy.IMAGES: (pixels, "uint8")} if pixels else {}),
              **({latent_copy.CONTEXT: (context, "float16")} if context else {})}
    fixed = {"labels": rng.integers(0, classes, items, dtype=np.int64),
             "files": np.asarray([f"synthetic/{i:08d}.JPEG" for i in range(items)],
                                 dtype=np.dtypes.StringDType())}
    if context:
        fixed["empty_context"] = rng.standard_normal((1, *context[1:]), np.float32).astype(
            np.float16)
    store = ShardedStore.open_or_create(
        path, items, shard_size, chunk_size, arrays, fixed=fixed,
        signature={"synthetic": {"items": items, "shape": list(shape), "seed": seed,
                                 **({"image_size": image_size} if pixels else {}),
                                 **({"context": list(context)} if context else {})}})
    for shard in store.pending_shards():
        start, stop = store.shard_range(shard)
        size = (stop - start, *shape)
        data = {"mean": rng.standard_normal(size, np.float32).astype(dtype),
                "std": rng.uniform(0.05, 0.5, size).astype(dtype)}
        if pixels:
            data[latent_copy.IMAGES] = rng.integers(0, 256, (stop - start, *pixels), np.uint8)
        if context:
            data[latent_copy.CONTEXT] = rng.standard_normal(
                (stop - start, *context), np.float32).astype(np.float16)
        bad = [{"index": i, "file": f"synthetic/{i:08d}.JPEG", "reason": "synthetic reject"}
               for i in rejected if start <= i < stop]
        store.write_shard(shard, data, {"rejects": bad})
    return store
