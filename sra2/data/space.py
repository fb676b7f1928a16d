"""The disk a stage needs, per folder, known before it writes anything.

Each stage's preflight (:func:`ensure`) lists what it is about to write, counting only what a
resumed stage has left, and refuses before any heavy work when a folder's file system cannot hold
it with a margin: one line naming the folder, the bytes needed and free, and what to do. ``sra2
plan`` (:mod:`sra2.tools.plan`) adds the same figures up for a whole run.

Sizes are computed from the arrays and the models: raw bytes of every array, plus what zarr's
shard indexes, the done marks and torch's checkpoint format add per file and per tensor. The one
assumption is how well a store compresses (:data:`RATIO`); a store begun gives its own ratio.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sra2.config.params import Config

# compressed / raw bytes assumed before a store has a shard to measure (then its own ratio is
# used): the latents' mantissas barely compress, their exponents do (the posterior std's more than
# the mean's: 0.80 and 0.92 measured on the tiny preset's random-weight VAE); ADM crops of
# photographs 0.71 (measured, README); samples raw (what a barely trained model draws is noise);
# caption contexts barely (float16 features of a transformer; their padding tokens differ by
# position): assumed 0.95 until a store begun says
RATIO = {"mean": 0.92, "std": 0.80, "mean_flip": 0.92, "std_flip": 0.80, "images": 0.75,
         "samples": 1.0, "context": 0.95}
FIXED_RATIO = 0.2  # labels and file names, compressed
CHUNK_OVERHEAD = 16 + 4 + 16  # Blosc's header, the chunk's CRC32C, its shard index entry
SHARD_OVERHEAD = 4  # the shard index's own CRC32C
# zarr.json files: a sharded array's (its codecs), a fixed array's, the group's (its attributes)
ZARR_JSON = {"sharded": 1360, "fixed": 740, "group": 900}
TENSOR_OVERHEAD = 400  # what torch.save adds per tensor: a zip record, its pickled description
NPZ_OVERHEAD = 264  # the .npz's zip records and the .npy header
MARGIN_SHARE, MARGIN_MIN = 0.02, 64 << 20  # free space a stage leaves: 2% of its need, >= 64 MiB
GiB = 2**30


class NoSpace(OSError):
    """A folder's file system cannot hold what a stage is about to write; ``strerror`` is the one
    line that says where, how much, and what to do."""

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True)
class Need:
    """``peak`` bytes held in ``folder`` while the stage runs, ``end`` when it is done."""

    folder: Path
    what: str
    peak: int
    end: int
    remedy: str = ""  # what else helps than freeing space


def size(n: float) -> str:
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:.1f} KiB"


# --- what each thing weighs

def latent_shape(cfg: Config) -> tuple[int, int, int]:
    """(channels, side, side) of one latent: the configured VAE's downsampling, SD-VAE's 8 when no
    shape is given."""
    shape = cfg.vae.random
    side = cfg.data.image_size // (2 ** (len(shape.block_out_channels) - 1) if shape else 8)
    return 4, side, side


def item_bytes(arrays: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, int]:
    return {name: math.prod(shape) * np.dtype(dtype).itemsize
            for name, (shape, dtype) in arrays.items()}


def shard_file_bytes(raw: int, items: int, chunk_size: int, ratio: float) -> int:
    """One array's file of a shard of ``items`` items of ``raw`` bytes each."""
    chunks = -(-items // chunk_size)
    return round(raw * items * ratio) + chunks * CHUNK_OVERHEAD + SHARD_OVERHEAD


def mark_bytes(arrays: list[str], shard: int, record: dict) -> int:
    """A done mark as :meth:`sra2.data.store.ShardedStore.write_shard` writes it."""
    files = {n: {"file": f"{n}/c/{shard}/0/0/0", "bytes": 10**7, "crc32c": 2**31} for n in arrays}
    return len(json.dumps({"shard": shard, **record, "files": files}, indent=2,
                          sort_keys=True)) + 1


def store_bytes(arrays: dict, num_items: int, shard_size: int, chunk_size: int,
                ratios: dict[str, float], record: dict, shards: list[int] | None = None) -> int:
    """The sharded arrays' files and done marks of ``shards`` (default: all)."""
    raw = item_bytes(arrays)
    num_shards = -(-num_items // shard_size)
    total = 0
    for shard in range(num_shards) if shards is None else shards:
        items = min(shard_size, num_items - shard * shard_size)
        total += sum(shard_file_bytes(raw[n], items, chunk_size, ratios[n]) for n in arrays)
        total += mark_bytes(list(arrays), shard, record)
    return total


def made_bytes(sharded: int, num_items: int, name_length: int) -> int:
    """What a store writes when it is made: every array's zarr.json, the group's, and the arrays
    known up front (labels, and file names of ``name_length`` characters where it keeps them)."""
    fixed = 1 + (name_length > 0)
    return (sharded * ZARR_JSON["sharded"] + fixed * ZARR_JSON["fixed"] + ZARR_JSON["group"]
            + round(num_items * (8 + name_length) * FIXED_RATIO))


def measured_ratios(store_path: Path, raw: dict[str, int], chunk_size: int) -> dict[str, float]:
    """Compressed / raw bytes of each array in a store's done shards (one pass over their done
    marks); arrays without a done shard are left out."""
    from sra2.data.store import ShardedStore

    try:
        store = ShardedStore(store_path, check=False)
    except (FileNotFoundError, ValueError):
        return {}
    stored, items = dict.fromkeys(raw, 0), dict.fromkeys(raw, 0)
    for record in store.records():
        start, stop = store.shard_range(record["shard"])
        chunks = -(-(stop - start) // chunk_size)
        for name, found in record.get("files", {}).items():
            if name in raw:
                stored[name] += found["bytes"] - chunks * CHUNK_OVERHEAD - SHARD_OVERHEAD
                items[name] += stop - start
    return {name: stored[name] / (raw[name] * items[name]) for name in raw if items[name]}


# --- each stage's needs

def encode_needs(cfg: Config, arrays: dict[str, tuple[tuple[int, ...], str]], store: Path,
                 num_items: int, pending: list[int] | None = None,
                 name_length: int = 32) -> list[Need]:
    """The store of ``num_items`` images at ``store`` holding ``arrays`` (name -> item shape,
    dtype); a resumed store counts its ``pending`` shards only (at its measured compression), a
    new one its made-up-front arrays too."""
    ec, raw = cfg.encode, item_bytes(arrays)
    measured = measured_ratios(store, raw, ec.chunk_size) if pending is not None else {}
    ratios = {n: measured.get(n) or RATIO[n] for n in arrays}
    left = store_bytes(arrays, num_items, ec.shard_size, ec.chunk_size, ratios,
                       {"rejects": [], "odd": []}, pending)
    made = 0 if pending is not None else made_bytes(len(arrays), num_items, name_length)
    remedy = ("or set encode.dtype: float16 (half the latents' bytes)" if ec.dtype == "float32"
              else "")
    return [Need(store.parent, "latent store", left + made, left + made, remedy)]


def copy_need(nbytes: int, folder: Path) -> Need:
    """The node-local copy training reads: ``nbytes`` uncompressed in ``folder``."""
    return Need(folder, "node-local latent copy", nbytes, nbytes,
                "or point train.copy_dir at a larger node-local disk, "
                "or set train.read_from: store")


def train_needs(cfg: Config, out: Path, step: int, ema: int, have: int = 0) -> list[Need]:
    """Step checkpoints of ``step`` bytes (``keep_checkpoints`` kept, one more while the next is
    written), FID snapshots and ema.pt of ``ema`` bytes under ``out``, less the ``have`` bytes of
    step files already there."""
    tc = cfg.train
    saves = -(-tc.steps // tc.ckpt_every)
    kept = min(tc.keep_checkpoints, saves)
    snapshots = tc.steps // tc.eval_every if tc.eval_every else 0
    end = kept * step + (snapshots + 1) * ema
    peak = end + (step if saves > kept else 0)
    remedy = f"or lower train.keep_checkpoints ({tc.keep_checkpoints})" if kept > 1 else ""
    return [Need(out, f"{kept} checkpoint(s) of {size(step)}, EMA weights",
                 max(peak - have, 0), max(end - have, 0), remedy)]


def sample_needs(cfg: Config, store: Path, pending: list[int] | None = None,
                 npz: Path | None = None) -> list[Need]:
    """The sample store at ``store`` (its ``pending`` shards when it exists) and, where given,
    ``npz``, the one file the shards are then assembled into (beside them, in the same folder:
    the shards are removed once it is written)."""
    sc, side = cfg.sample, cfg.data.image_size
    arrays = {"images": ((side, side, 3), "uint8")}
    shards = store_bytes(arrays, sc.total, sc.shard_size, 1,  # one image a chunk
                         {"images": RATIO["samples"]}, {}, pending)
    made = 0 if pending is not None else made_bytes(1, sc.total, 0)
    if npz is None:
        return [Need(store.parent, "sample shards", shards + made, shards + made)]
    nbytes = sc.total * side * side * 3 + NPZ_OVERHEAD
    return [Need(store.parent, "sample shards, then samples.npz", shards + made + nbytes, nbytes)]


def dvc_share(cached: dict[Path, int]) -> list[Need]:
    """What DVC's cache adds to the outputs it caches (``cached``: folder -> bytes): nothing where
    it links (this repository's cache.type), a copy where it copies."""
    from sra2.runtime import dvc_cache

    out = []
    for folder, nbytes in cached.items():
        cache = dvc_cache.copies_into(Path(folder))
        if cache is not None and nbytes:
            out.append(Need(cache, f"DVC's copy of {folder}", nbytes, nbytes,
                            "or set cache.type hardlink with the cache on the same file system"))
    return out


# --- the check

def free_bytes(folder: Path) -> tuple[int, int]:
    """(free bytes for us, device id) of the file system that holds or will hold ``folder``."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free, os.stat(folder).st_dev


def shortfalls(needs: list[Need]) -> list[str]:
    """One line per file system that cannot hold the peak of what ``needs`` put on it."""
    by_device: dict[int, list[Need]] = {}
    free = {}
    for need in needs:
        if need.peak <= 0:
            continue
        available, device = free_bytes(need.folder)
        free[device] = available
        by_device.setdefault(device, []).append(need)
    lines = []
    for device, group in by_device.items():
        total = sum(n.peak for n in group)
        margin = max(MARGIN_MIN, round(MARGIN_SHARE * total))
        if total + margin > free[device]:
            what = " + ".join(f"{n.what} {size(n.peak)}" for n in group)
            remedies = "; ".join(dict.fromkeys(n.remedy for n in group if n.remedy))
            where = ", ".join(dict.fromkeys(str(n.folder) for n in group))
            lines.append(f"not enough disk in {where}: needs {size(total)} ({what}) "
                         f"and a margin of {size(margin)}, {size(free[device])} free: free space"
                         + (f", {remedies}" if remedies else "") + ", then rerun")
    return lines


def ensure(stage: str, needs: list[Need], log=print) -> None:
    """The preflight: raise :class:`NoSpace` naming each folder whose file system cannot hold what
    ``stage`` is about to write; else say what it will write."""
    if lines := shortfalls(needs):
        raise NoSpace(errno.ENOSPC, f"{stage}: " + "\n".join(lines))
    if total := sum(n.peak for n in needs):
        log(f"{stage}: will write {size(total)} ("
            + ", ".join(f"{n.what} in {n.folder}: {size(n.peak)}" for n in needs if n.peak) + ")")
