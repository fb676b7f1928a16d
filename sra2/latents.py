"""Training batches streamed from the latent store: reader processes fetch the items of step s
(``batch_indices``) ahead of the training loop, so host memory does not grow with the dataset.

Item s of :class:`StepBatches` is this rank's slice of global batch s: the posterior mean and std
and the label of each latent, exactly the rows an in-memory copy of the accepted latents would
give. Only the labels and the map from accepted to stored indices stay in memory (16 bytes an
image: 20 MB for ImageNet).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from sra2.encode import rejects
from sra2.store import ShardedStore


def batch_indices(step: int, batch: int, n: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
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
    """Item ``step``: {"mean", "std", "labels"} of this rank's part of global batch ``step``."""

    def __init__(self, path: str | Path, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        store = ShardedStore(path)
        if not store.complete:
            raise RuntimeError(f"latent store {path} is incomplete ({len(store.done_shards())} of "
                               f"{store.num_shards} shards): run the encode stage to the end first")
        rejected = {r["index"] for r in rejects(store)}
        # accepted position -> stored index; rejected files never reach a batch
        self.rows = np.array([i for i in range(store.num_items) if i not in rejected], np.int64)
        self.labels = store.array("labels")[:][self.rows]
        self.shape = tuple(store.array("mean").shape[1:])
        self.signature = store.attrs["signature"]
        self.path, self.global_batch, self.seed, self.rank, self.world = (
            str(path), global_batch, seed, rank, world)
        self._arrays = None  # opened in the process that reads (zarr handles are not shared)

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> dict[str, zarr.Array]:
        if self._arrays is None:
            group = zarr.open_group(self.path, mode="r")
            self._arrays = {name: group[name] for name in ("mean", "std")}
        return self._arrays

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        picked = batch_indices(step, self.global_batch, len(self.rows), self.seed, self.rank, self.world)
        # one sorted read per array (a batch spanning two epochs may hold an item twice)
        stored, back = np.unique(self.rows[picked], return_inverse=True)
        out = {name: torch.from_numpy(arr.oindex[stored][back].astype(np.float32, copy=False))
               for name, arr in self._open().items()}
        out["labels"] = torch.from_numpy(self.labels[picked])
        return out


def step_loader(batches: StepBatches, start: int, stop: int, workers: int, pin: bool) -> DataLoader:
    """Steps ``start``..``stop - 1`` in order, read by ``workers`` processes ahead of use."""
    return DataLoader(batches, sampler=range(start, stop), batch_size=None, num_workers=workers,
                      pin_memory=pin, prefetch_factor=4 if workers else None,
                      # not fork: zarr's I/O thread does not survive a fork
                      multiprocessing_context="forkserver" if workers else None)


def write_synthetic_store(path: str | Path, items: int, shape: tuple[int, ...], classes: int,
                          chunk_size: int, shard_size: int, dtype: str = "float32",
                          rejected: tuple[int, ...] = (), seed: int = 0) -> ShardedStore:
    """A complete latent store of seeded random latents, laid out as encode lays it out (for
    benchmarks and tests at sizes no demo dataset reaches); ``rejected`` items are marked as
    undecodable files."""
    rng = np.random.default_rng(seed)
    store = ShardedStore.open_or_create(
        path, items, shard_size, chunk_size, {"mean": (shape, dtype), "std": (shape, dtype)},
        fixed={"labels": rng.integers(0, classes, items, dtype=np.int64),
               "files": np.asarray([f"synthetic/{i:08d}.JPEG" for i in range(items)],
                                   dtype=np.dtypes.StringDType())},
        signature={"synthetic": {"items": items, "shape": list(shape), "seed": seed}})
    for shard in store.pending_shards():
        start, stop = store.shard_range(shard)
        size = (stop - start, *shape)
        data = {"mean": rng.standard_normal(size, np.float32).astype(dtype),
                "std": rng.uniform(0.05, 0.5, size).astype(dtype)}
        bad = [{"index": i, "file": f"synthetic/{i:08d}.JPEG", "reason": "synthetic reject"}
               for i in rejected if start <= i < stop]
        store.write_shard(shard, data, {"rejects": bad})
    return store
