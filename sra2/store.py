"""A zarr v3 store of per-item arrays written shard by shard, with an atomic done mark per shard.

Layout of ``<path>/``: zarr arrays whose first axis is the item index, sharded so that one shard
of items is one file per array (the unit of writing) and chunked into small runs of items (the
unit of reading); ``done/shard-NNNNNN.json``, written atomically after the shard's data, holds
what the writer wants to remember about it (for example rejected files). A shard without a done
mark is rewritten whole on resume, so a killed run ends with the same bytes as an unbroken one.

Stores made with different settings live side by side as ``<folder>/<digest of the settings>/``
(:func:`attributes`, :func:`digest`); a small pointer file (:func:`write_pointer`) tells readers
which one to open (:func:`pointed_store`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from sra2 import atomic

# numcodecs' Blosc with zstd and bit shuffling: the best ratio on float latents for little CPU
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


class StoreMismatch(ValueError):
    """An existing store was made with other settings than the ones asked for now."""


def digest(signature: dict[str, Any]) -> str:
    """A short name for a set of settings: runs with other settings get other folders."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]


def attributes(num_items: int, shard_size: int, signature: dict[str, Any] | None) -> dict[str, Any]:
    """What a store records about how it was made, as JSON reads it back: reopening compares it,
    and its digest names the store's folder where stores of several settings share a folder."""
    return json.loads(json.dumps({"num_items": num_items, "shard_size": shard_size,
                                  "signature": signature or {}}))


def write_pointer(pointer: str | Path, store: str | Path) -> dict[str, Any]:
    """Write the small JSON file ``pointer`` naming ``store`` (its path relative to the pointer's
    folder) with the store's digest and attributes; returns what it wrote.

    Its bytes depend on the store's settings only, so a DVC stage that depends on the pointer
    re-runs when the store it reads changes, and not when a store of other settings is added
    beside it or a run re-opens a finished store.
    """
    pointer, store = Path(pointer), Path(store)
    attrs = ShardedStore(store).attrs
    rel = Path(os.path.relpath(store.absolute(), pointer.absolute().parent)).as_posix()
    record = {"store": rel, "digest": digest(attrs), **attrs}
    atomic.write_json(pointer, record)
    return record


def pointed_store(latents: str | Path) -> Path:
    """The store ``latents`` names: a store folder itself, or a pointer file that
    :func:`write_pointer` wrote (its ``store`` is relative to the pointer's folder)."""
    latents = Path(latents)
    if latents.is_dir():
        return latents
    try:
        record = json.loads(latents.read_text())
        store = latents.parent / record["store"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{latents}: no latent store or pointer file here; run the "
                                f"encode stage first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{latents}: not a latent store pointer ({e!r})") from None
    if not store.is_dir():
        raise FileNotFoundError(f"{latents} points at {store}, which does not exist: run the "
                                f"encode stage (dvc repro encode, or dvc checkout data/latents)")
    return store


def sweep_partial_writes(path: Path) -> None:
    """Remove what a killed writer left half-done: zarr's ``*.partial`` files and our ``.tmp``s."""
    for leftover in [*path.rglob("*.partial"), *(path / "done").glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)


class ShardedStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.group = zarr.open_group(self.path, mode="r+")
        self.attrs = self.group.attrs.asdict()
        self.num_items: int = self.attrs["num_items"]
        self.shard_size: int = self.attrs["shard_size"]
        self.num_shards = -(-self.num_items // self.shard_size)

    @classmethod
    def open_or_create(cls, path: str | Path, num_items: int, shard_size: int, chunk_size: int,
                       arrays: dict[str, tuple[tuple[int, ...], str]],
                       fixed: dict[str, np.ndarray] | None = None,
                       signature: dict[str, Any] | None = None) -> "ShardedStore":
        """Open the store at ``path``, or create it whole (in a temporary folder, then renamed).

        ``arrays`` maps a name to (item shape, dtype) for the arrays written shard by shard;
        ``fixed`` holds arrays known up front (labels, file names), written at creation;
        ``signature`` describes what the bytes depend on: reopening with another one fails.
        """
        path = Path(path)
        attrs = attributes(num_items, shard_size, signature)
        if path.exists():
            found = zarr.open_group(path, mode="r").attrs.asdict()
            if found != attrs:
                raise StoreMismatch(
                    f"{path} exists but was made with other settings:\n  found    {found}\n"
                    f"  expected {attrs}\nDelete it to start over, or restore the old settings.")
            sweep_partial_writes(path)
            return cls(path)
        tmp = path.with_name(f".{path.name}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        for name, (item_shape, dtype) in arrays.items():
            group.create_array(name, shape=(num_items, *item_shape), dtype=dtype, fill_value=0,
                               chunks=(chunk_size, *item_shape), shards=(shard_size, *item_shape),
                               compressors=COMPRESSOR)
        for name, values in (fixed or {}).items():
            arr = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                     chunks=(min(len(values), 65536),), compressors=COMPRESSOR)
            arr[:] = values
        group.attrs.update(attrs)
        (tmp / "done").mkdir()
        tmp.rename(path)
        return cls(path)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_items)

    def _mark(self, shard: int) -> Path:
        return self.path / "done" / f"shard-{shard:06d}.json"

    def done_shards(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in (self.path / "done").glob("shard-*.json")}

    def pending_shards(self, rank: int = 0, world: int = 1) -> list[int]:
        """Shards this rank owns (round robin) that have no done mark yet."""
        done = self.done_shards()
        return [s for s in range(rank, self.num_shards, world) if s not in done]

    @property
    def complete(self) -> bool:
        return len(self.done_shards()) == self.num_shards

    def write_shard(self, shard: int, data: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Write one shard of every array, then its done mark (the commit point)."""
        start, stop = self.shard_range(shard)
        for name, values in data.items():
            if len(values) != stop - start:
                raise ValueError(f"shard {shard} of {name!r} needs {stop - start} items, "
                                 f"got {len(values)}")
            self.group[name][start:stop] = values
        atomic.write_json(self._mark(shard), {"shard": shard, **record})

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(self._mark(s).read_text()) for s in sorted(self.done_shards())]

    def array(self, name: str) -> zarr.Array:
        return self.group[name]
