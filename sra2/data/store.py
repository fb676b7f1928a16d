"""A zarr v3 store of per-item arrays written shard by shard, with an atomic done mark per shard.

Layout of ``<path>/``: zarr arrays whose first axis is the item index, sharded so that one shard
of items is one file per array (the unit of writing) and chunked into small runs of items (the
unit of reading); ``done/shard-NNNNNN.json``, written atomically after the shard's data, holds
what the writer wants to remember about it (for example rejected files) and what the shard's
files must be (name, size, CRC32C of the whole file). A shard without a done mark is rewritten
whole on resume, so a killed run ends with the same bytes as an unbroken one.

Checks. Every chunk carries a CRC32C (zarr's codec) that each read verifies; a read that fails
raises :class:`DamagedStore` naming the store, array, shard and file. Opening a store stats every
done shard's files against its mark (a missing chunk file would read as zeros); a writer reopening
its store also compares each file's CRC32C and moves damaged shards aside (:meth:`ShardedStore.
repair`, into ``<folder>/.quarantine/``) so that they are computed again.

Stores made with different settings live side by side as ``<folder>/<digest of the settings>/``
(:func:`attributes`, :func:`digest`); a small pointer file (:func:`write_pointer`) tells readers
which one to open (:func:`pointed_store`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec

from sra2.runtime import atomic, dvc_cache

# numcodecs' Blosc with zstd and bit shuffling (the best ratio on float latents for little CPU),
# then a CRC32C of each compressed chunk that every read checks
CODECS = (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec())
QUARANTINE = ".quarantine"  # beside the stores, where repair moves damaged shards (.dvcignore'd)


class StoreMismatch(ValueError):
    """An existing store was made with other settings than the ones asked for now."""


class DamagedStore(ValueError):
    """Stored bytes failed a check; the message names the store, the array, the shard and the file
    and says what to do."""


@dataclass(frozen=True)
class Damage:
    """One failed check: ``shard`` None for what no shard owns (a fixed array, the metadata)."""

    shard: int | None
    file: Path
    reason: str

    def __str__(self) -> str:
        where = "not a shard's" if self.shard is None else f"shard {self.shard}"
        return f"{where}: {self.file}: {self.reason}"


def file_crc32c(path: Path) -> int:
    """CRC32C of a file's bytes, read in 16 MiB blocks (~10 GB/s in the hardware instruction)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:  # unbuffered: each block is copied once
        while block := f.read(1 << 24):
            crc = google_crc32c.extend(crc, block)
    return crc


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


def advice(path: Path) -> str:
    return (f"run `python -m sra2.tools.verify {path} --repair` to move the damaged shards aside, "
            f"then rerun the stage that wrote the store (dvc repro): it computes them again")


def sweep_partial_writes(path: Path) -> None:
    """Remove what a killed writer left half-done: zarr's ``*.partial`` files and our ``.tmp``s."""
    for leftover in [*path.rglob("*.partial"), *(path / "done").glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)


def quarantine_folder(path: Path) -> Path:
    """Where what is damaged in ``path`` goes now: ``<parent>/.quarantine/<name>/<time>-<pid>/``
    (ignored by DVC, never deleted, one folder per repair)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return path.parent / QUARANTINE / path.name / f"{stamp}-{os.getpid()}"


class ShardedStore:
    """A store opened for reading and writing; with ``check``, every done shard's files are
    stat'ed against its done mark first (:class:`DamagedStore` if one is missing or resized)."""

    def __init__(self, path: str | Path, check: bool = True):
        self.path = Path(path)
        if self.path.is_file():
            raise FileExistsError(f"{self.path} exists and is not a folder: move it away and rerun")
        try:
            self.group = zarr.open_group(self.path, mode="r+")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no store here") from None
        except ValueError as e:  # zarr.json cut short or overwritten
            raise DamagedStore(f"{self.path}: its metadata cannot be read ({e}): delete the "
                               f"store and run the stage that made it again") from e
        self.attrs = self.group.attrs.asdict()
        self.num_items: int = self.attrs["num_items"]
        self.shard_size: int = self.attrs["shard_size"]
        self.num_shards = -(-self.num_items // self.shard_size)
        if check:
            self.raise_for(self.check())

    @classmethod
    def open_or_create(cls, path: str | Path, num_items: int, shard_size: int, chunk_size: int,
                       arrays: dict[str, tuple[tuple[int, ...], str]],
                       fixed: dict[str, np.ndarray] | None = None,
                       signature: dict[str, Any] | None = None) -> "ShardedStore":
        """Open the store at ``path`` and repair it (:meth:`repair`), or create it whole (in a
        temporary folder, then renamed).

        ``arrays`` maps a name to (item shape, dtype) for the arrays written shard by shard;
        ``fixed`` holds arrays known up front (labels, file names), written at creation;
        ``signature`` describes what the bytes depend on: reopening with another one fails.
        """
        path = Path(path)
        attrs = attributes(num_items, shard_size, signature)
        if path.exists():
            store = cls(path, check=False)
            if store.attrs != attrs:
                raise StoreMismatch(
                    f"{path} exists but was made with other settings:\n  found    {store.attrs}\n"
                    f"  expected {attrs}\nDelete it to start over, or restore the old settings.")
            sweep_partial_writes(path)
            store.repair()
            return store
        tmp = atomic.make_folder(path.parent) / f".{path.name}.creating"
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        for name, (item_shape, dtype) in arrays.items():
            group.create_array(name, shape=(num_items, *item_shape), dtype=dtype, fill_value=0,
                               chunks=(chunk_size, *item_shape), shards=(shard_size, *item_shape),
                               compressors=CODECS)
        for name, values in (fixed or {}).items():
            arr = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                     chunks=(min(len(values), 65536), *values.shape[1:]),
                                     compressors=CODECS)
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
        """Write one shard of every array, flush its files to disk and record their sizes and
        CRC32Cs in its done mark (the commit point)."""
        start, stop = self.shard_range(shard)
        for name, values in data.items():
            if len(values) != stop - start:
                raise ValueError(f"shard {shard} of {name!r} needs {stop - start} items, "
                                 f"got {len(values)}")
            try:  # a file even for a shard of zeros: a missing file then always means damage
                self.arrays[name].with_config({"write_empty_chunks": True})[start:stop] = values
            except OSError as e:  # the shard stays pending: its done mark is not written
                raise atomic.write_failed(self.shard_files(shard)[name], e) from e
        files = {}
        for name, path in self.shard_files(shard).items():
            with open(path, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before the mark says it is done
            files[name] = {"file": path.relative_to(self.path).as_posix(),
                           "bytes": path.stat().st_size, "crc32c": file_crc32c(path)}
        atomic.write_json(self._mark(shard), {"shard": shard, **record, "files": files})

    def records(self) -> list[dict[str, Any]]:
        return [self._record(s) for s in sorted(self.done_shards())]

    def _record(self, shard: int) -> dict[str, Any]:
        mark = self._mark(shard)
        try:
            return json.loads(mark.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedStore(f"{mark}: the done mark cannot be read ({e}); "
                               f"{advice(self.path)}") from e

    def array(self, name: str) -> "StoredArray":
        return StoredArray(self, name)

    # --- checks

    @functools.cached_property
    def arrays(self) -> dict[str, zarr.Array]:
        """Every array of the store, opened once (each opening reads its metadata file)."""
        with warnings.catch_warnings():  # zarr warns of done/, which is ours, not an array
            warnings.filterwarnings("ignore", "Object at done is not")
            return dict(sorted(self.group.arrays()))

    @functools.cached_property
    def sharded(self) -> list[str]:
        """The arrays written shard by shard (the others were written when the store was made)."""
        return [name for name, arr in self.arrays.items()
                if isinstance(arr.metadata.codecs[0], ShardingCodec)]

    def shard_files(self, shard: int) -> dict[str, Path]:
        """Each sharded array's file holding ``shard``."""
        out = {}
        for name in self.sharded:
            arr = self.arrays[name]
            key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
            out[name] = self.path / name / key
        return out

    def check(self, deep: bool = False) -> list[Damage]:
        """What is wrong with the done shards: files missing or of another size than their mark
        records (a stat each), with ``deep`` also a CRC32C that differs (every byte read) and a
        fixed array that fails to read. Marks written before marks recorded files pass."""
        damage = []
        for shard in sorted(self.done_shards()):
            try:
                files = self._record(shard).get("files", {})
            except DamagedStore as e:
                damage.append(Damage(shard, self._mark(shard), str(e.__cause__)))
                continue
            for name, want in sorted(files.items()):
                if (problem := _file_problem(self.path / want["file"], want, deep)):
                    damage.append(Damage(shard, self.path / want["file"], problem))
        if deep:
            for name in sorted(set(self.arrays) - set(self.sharded)):
                try:
                    self.arrays[name][:]
                except Exception as e:  # noqa: BLE001 - zarr and its codecs raise many kinds
                    damage.append(Damage(None, self.path / name, f"{type(e).__name__}: {e}"))
        return damage

    def raise_for(self, damage: list[Damage]) -> None:
        if damage:
            listed = "\n  ".join(map(str, damage[:10]))
            more = f"\n  and {len(damage) - 10} more" if len(damage) > 10 else ""
            raise DamagedStore(f"{self.path}: {len(damage)} damaged file(s); {advice(self.path)}:"
                               f"\n  {listed}{more}")

    def repair(self, log: Callable[[str], None] = print) -> list[Damage]:
        """Check every byte of the done shards (:meth:`check` deep) and move each damaged shard's
        mark and files into the quarantine folder, so that the writer computes them again (and
        DVC cache entries linked to the damaged files, :mod:`sra2.runtime.dvc_cache`); returns what
        was found. Damage outside the shards cannot be repaired here: it raises."""
        started = time.perf_counter()
        damage = self.check(deep=True)
        unowned = [d for d in damage if d.shard is None]
        if unowned:
            raise DamagedStore(f"{self.path}: {'; '.join(map(str, unowned))}: delete the store "
                               f"and run the stage that made it again")
        for d in damage:
            log(f"store {self.path}: {d}")
        shards = sorted({d.shard for d in damage})
        if shards:
            folder = self.quarantine(shards)
            log(f"store {self.path}: moved {len(shards)} damaged shard(s) {shards} to {folder}: "
                f"they are computed again")
            dvc_cache.evict_damaged([d.file for d in damage], folder, log)
        checked = len(self.done_shards()) + len(shards)
        if checked:
            log(f"store {self.path}: checked the bytes of {checked} done shard(s) in "
                f"{time.perf_counter() - started:.1f} s")
        return damage

    def quarantine(self, shards: list[int]) -> Path:
        """Move the marks and files of ``shards`` to ``<folder>/.quarantine/<store>/<time>/``
        (same relative paths): out of the store, kept for inspection."""
        folder = quarantine_folder(self.path)
        for shard in shards:
            for path in [self._mark(shard), *self.shard_files(shard).values()]:
                if path.exists():
                    target = folder / path.relative_to(self.path)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)  # the mark first: the shard is pending from here
        return folder

    # --- reads that name what failed

    def read(self, name: str, rows: slice | int | np.ndarray = slice(None)) -> np.ndarray:
        """``array(name)[rows]`` (an index array reads those rows, in its order); bytes that fail
        their checksum raise :class:`DamagedStore` naming the shard and file."""
        arr = self.arrays[name]
        try:
            return arr.oindex[rows] if isinstance(rows, np.ndarray) else arr[rows]
        except Exception as e:  # noqa: BLE001 - zarr and its codecs raise many kinds
            raise DamagedStore(f"{self.path}: reading {name!r}: {self._failed(name, rows, e)}; "
                               f"{advice(self.path)}") from e

    def _failed(self, name: str, rows, error: Exception) -> Damage:
        """The first shard (and its file) whose part of ``rows`` fails to read again alone."""
        reason = f"{type(error).__name__}: {error}"
        if name not in self.sharded:
            return Damage(None, self.path / name, reason)
        first = rows[0] if isinstance(rows, tuple) else rows  # the item axis
        items = np.arange(self.arrays[name].shape[0])[first].reshape(-1)
        for shard in np.unique(items // self.shard_size).tolist():
            try:
                self.arrays[name].oindex[np.unique(items[items // self.shard_size == shard])]
            except Exception as e:  # noqa: BLE001
                return Damage(shard, self.shard_files(shard)[name], f"{type(e).__name__}: {e}")
        return Damage(None, self.path / name, reason)


class StoredArray:
    """An array of a store, read through :meth:`ShardedStore.read`: ``arr[rows]``, with an index
    array for ``rows`` reading those rows."""

    def __init__(self, store: ShardedStore, name: str):
        self.store, self.name = store, name
        self.shape, self.dtype = store.arrays[name].shape, store.arrays[name].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.store.read(self.name, rows)


def _file_problem(path: Path, want: dict, deep: bool) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != want["bytes"]:
        return f"{size} bytes where its done mark records {want['bytes']}"
    if deep and file_crc32c(path) != want["crc32c"]:
        return "its CRC32C differs from the one its done mark records: bytes changed"
    return None
