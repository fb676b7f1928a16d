"""The training read path: a node-local, uncompressed, memory-mapped copy of a latent store.

The zarr store stays the durable record that encode writes; reading random single-latent chunks
from it costs a decompression each (~1,000 latents/s per reader). Training reads a copy made for
random rows instead: ``mean.npy`` and ``std.npy`` hold every stored row (rejected ones too, so row
i is store item i) in the store's dtype, read through ``np.load(mmap_mode="r")``. The page cache
holds them once per node however many ranks and readers map them; no process keeps a private copy.
A copy for a run that needs the training images (REPA) holds ``images.npy`` too: the store's uint8
(N, H, W, 3) crops.

Layout of ``<copy dir>/``:

- ``<key>/``: one copy. ``key`` is a digest of the store's absolute path, its settings and the
  name, size and mtime of each done mark, so a store re-encoded, resumed or repaired gets a new
  copy, never one that only looks current; and of the arrays copied where they are more than
  ``ARRAYS``: a copy with images and one without are two copies. ``building.json`` records the
  shards copied so far (with their CRC32s) while it is made; ``manifest.json``, written last and
  atomically, makes it complete and records the source, each file's size and each shard's CRC32.
- ``<key>.lock``: ``flock`` on it, exclusive while one process builds, shared while runs read.

Checks: every start compares the files' sizes with the manifest (a stat per file); a build
verifies every shard's CRC32 after writing it all; :func:`verify` re-reads the whole copy on
demand (``python -m sra2.data.latent_copy verify``) and copies damaged shards again from the store.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import suppress
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sra2.data.store import ShardedStore, digest, pointed_store
from sra2.runtime import atomic
from sra2.runtime.lock import EXCLUSIVE, SHARED, FileLock

ARRAYS = ("mean", "std")  # what training reads
IMAGES = "images"  # and, for REPA, the pixels the store holds with encode.pixels
CONTEXT = "context"  # and, for captioned data, every caption's text features
MANIFEST, BUILDING = "manifest.json", "building.json"
HEADROOM = 1 << 30  # free bytes a copy must leave on its disk
MAX_BUILDERS = 16  # processes that copy shards at once


class CopyDamaged(RuntimeError):
    """A copy's bytes differ from the checksums recorded when it was built."""


def trained_arrays(store: ShardedStore, images: bool = False) -> tuple[str, ...]:
    """What training reads of ``store``: the latents, the caption contexts where it has them,
    and the images where ``images``."""
    return (ARRAYS + ((CONTEXT,) if CONTEXT in store.group else ())
            + ((IMAGES,) if images else ()))


def copy_root(copy_dir: str | None = None) -> Path:
    """Where copies live: ``copy_dir``, else $SRA2_COPY_DIR, else <$TMPDIR or /tmp>/sra2-latents."""
    return Path(copy_dir or os.environ.get("SRA2_COPY_DIR")
                or Path(tempfile.gettempdir()) / "sra2-latents")


def source(store: ShardedStore, names: tuple[str, ...] = ARRAYS) -> dict:
    """What a copy is made from: the store's path and settings, and a stamp of its done marks
    (stats only: cheap at every start); and which arrays, where more than ``ARRAYS`` (a copy of
    the latents alone keeps the name it had before images could be copied)."""
    marks = sorted((store.path / "done").glob("shard-*.json"))
    stamps = [[p.name, s.st_size, s.st_mtime_ns] for p in marks for s in [p.stat()]]
    return {"store": str(store.path.resolve()), "settings": digest(store.attrs),
            "marks": digest({"marks": stamps}),
            **({"arrays": list(names)} if names != ARRAYS else {})}


def layout(store: ShardedStore, names: tuple[str, ...] = ARRAYS) -> dict:
    """Shape and dtype of each copied array."""
    return {name: {"shape": list(store.array(name).shape), "dtype": str(store.array(name).dtype)}
            for name in names}


def nbytes(arrays: dict) -> int:
    return sum(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in arrays.values())


def _crc(values: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8))


# --- one copy

class LatentCopy:
    """The copy of ``store`` under ``root``, with the store's images where ``images``;
    :meth:`check` says whether it can be read as it is; ``with`` lets go of its lock."""

    def __init__(self, store: ShardedStore, root: Path, images: bool = False):
        self.names = trained_arrays(store, images)
        self.store, self.source = store, source(store, self.names)
        self.key = digest(self.source)
        self.folder, self.arrays = root / self.key, layout(store, self.names)
        self.lock = FileLock(root / f"{self.key}.lock")

    def file(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def manifest(self) -> dict | None:
        with suppress(FileNotFoundError, ValueError):
            return json.loads((self.folder / MANIFEST).read_text())
        return None

    def check(self) -> str | None:
        """Why the copy cannot be read (None: complete, made from this store as it is now, every
        file of its recorded size): stats and one small file, no data read."""
        manifest = self.manifest()
        if manifest is None:
            return "no complete copy"
        if manifest.get("source") != self.source or manifest.get("arrays") != self.arrays:
            return "made from another store or another state of it"
        for name, size in manifest["bytes"].items():
            path = self.file(name)
            found = path.stat().st_size if path.exists() else None
            if found != size:
                return f"{path} has {found} bytes, {size} expected (truncated or replaced)"
        return None

    def open(self, name: str) -> np.ndarray:
        return np.load(self.file(name), mmap_mode="r")

    def close(self) -> None:
        """Let go of the lock: this process no longer reads the copy."""
        self.lock.close()

    def __enter__(self) -> LatentCopy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- building

    def build(self, show: bool = True) -> None:
        """Copy every shard of the store (resuming a build that was cut off), verify the CRC32s,
        then write the manifest. The caller holds the exclusive lock."""
        (self.folder / MANIFEST).unlink(missing_ok=True)  # from here on the copy is not complete
        _opened.cache_clear()
        record = self._resumable() or self._start()
        done = {int(s) for s in record["crc32"]["mean"]}
        todo = [s for s in range(self.store.num_shards) if s not in done]
        bar = tqdm(total=self.store.num_shards, initial=len(done), unit="shard", file=sys.stderr,
                   desc=f"latent copy {self.folder}", disable=not show or not todo)
        with bar:
            for shard, crcs in copy_shards(self.store.path, self.folder, todo):
                for name, crc in crcs.items():
                    record["crc32"][name][str(shard)] = crc
                atomic.write_json(self.folder / BUILDING, record)  # after the bytes are on disk
                bar.update(1)
        crc32 = {name: [record["crc32"][name][str(s)] for s in range(self.store.num_shards)]
                 for name in self.names}
        bad = self.damaged(crc32)
        if bad:
            raise CopyDamaged(f"{self.folder}: shards {bad} read back other bytes than were "
                              f"written (a failing disk?); delete the folder or set "
                              f"train.copy_dir elsewhere")
        atomic.write_json(self.folder / MANIFEST, {
            "source": self.source, "arrays": self.arrays, "crc32": crc32,
            "shard_size": self.store.shard_size,
            "bytes": {name: self.file(name).stat().st_size for name in self.names}})
        (self.folder / BUILDING).unlink()

    def _resumable(self) -> dict | None:
        """The record of a build of this very source that was cut off, if its files are whole."""
        with suppress(FileNotFoundError, ValueError):
            record = json.loads((self.folder / BUILDING).read_text())
            if record.get("source") == self.source and record.get("arrays") == self.arrays and \
                    all(self.file(n).stat().st_size == record["bytes"][n] for n in self.names):
                return record
        return None

    def _start(self) -> dict:
        """Fresh files of the full size, their blocks reserved up front (a full disk fails here,
        not half-way)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        sizes = {}
        for name, spec in self.arrays.items():
            array = np.lib.format.open_memmap(self.file(name), mode="w+", dtype=spec["dtype"],
                                              shape=tuple(spec["shape"]))
            del array
            sizes[name] = self.file(name).stat().st_size
            fd = os.open(self.file(name), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, sizes[name])
            finally:
                os.close(fd)
        record = {"source": self.source, "arrays": self.arrays, "bytes": sizes,
                  "crc32": {name: {} for name in self.names}}
        atomic.write_json(self.folder / BUILDING, record)
        return record

    def damaged(self, crc32: dict[str, list[int]]) -> list[tuple[str, int]]:
        """(array, shard) of every shard whose bytes do not have the recorded CRC32."""
        bad = []
        for name in self.names:
            array = self.open(name)
            for shard, expected in enumerate(crc32[name]):
                start, stop = self.store.shard_range(shard)
                if _crc(array[start:stop]) != expected:
                    bad.append((name, shard))
        return bad

    def repair(self, bad: list[tuple[str, int]]) -> None:
        """Copy the ``bad`` shards again from the store (the caller holds the exclusive lock)."""
        for _ in copy_shards(self.store.path, self.folder, sorted({shard for _, shard in bad})):
            pass


# --- copying shards, in parallel where there are many

@functools.lru_cache(maxsize=1)
def _opened(store: Path, folder: Path) -> tuple[ShardedStore, dict[str, np.memmap]]:
    # the copy's arrays: the .npy files LatentCopy._start made in its folder
    return ShardedStore(store), {p.stem: np.load(p, mmap_mode="r+")
                                 for p in sorted(folder.glob("*.npy"))}


def copy_shard(store: Path, folder: Path, shard: int) -> tuple[int, dict[str, int]]:
    """Copy one shard of each array of the copy in ``folder`` and flush it to disk; returns
    the CRC32 of the bytes the store gave."""
    source, targets = _opened(store, folder)
    start, stop = source.shard_range(shard)
    crcs = {}
    for name, target in targets.items():
        values = source.array(name)[start:stop]
        target[start:stop] = values
        target.flush()
        crcs[name] = _crc(values)
    return shard, crcs


def copy_shards(store: Path, folder: Path, shards: list[int]):
    """(shard, CRC32s) of each of ``shards`` as it is copied: by a pool of processes where there
    are enough shards to share (zarr decodes ~2,500 single-latent chunks/s per core), else here."""
    workers = min(os.cpu_count() or 1, MAX_BUILDERS, len(shards) // 4)
    if workers < 2:
        try:
            yield from (copy_shard(store, folder, shard) for shard in shards)
        finally:
            _opened.cache_clear()  # the files may be made anew: never write through old maps
        return
    # spawn: the fork server is the training readers', started apart (sra2.data.latents.stream)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(copy_shard, repeat(store), repeat(folder), shards)


def _state(source: dict) -> dict:
    return {k: v for k, v in source.items() if k != "arrays"}


def remove_older(copy: LatentCopy, log) -> None:
    """Delete the copies of the same store made from an earlier state of it, unless a run still
    reads them (it holds their lock); a copy of the same state with other arrays stays."""
    for manifest in copy.folder.parent.glob(f"*/{MANIFEST}"):
        folder = manifest.parent
        if folder == copy.folder:
            continue
        with suppress(OSError, ValueError):
            found = json.loads(manifest.read_text())["source"]
            if found["store"] != copy.source["store"] or _state(found) == _state(copy.source):
                continue
            with FileLock(folder.with_name(f"{folder.name}.lock")) as lock:
                if lock.take(EXCLUSIVE, wait=False):
                    shutil.rmtree(folder)
                    log(f"latent copy: removed {folder}, made from an earlier state of the store")


def ensure(store_path: str | Path, copy_dir: str | None = None, log=print,
           images: bool = False) -> LatentCopy | None:
    """A complete, checked copy of the store (with its images where ``images``), built here if
    needed; the calling process then holds its shared lock until it ends (or closes the copy), so
    no one rebuilds or deletes it under a run. Returns None (and logs why) when the copy cannot be
    made on this node: not enough disk, or not writable.

    Processes of the node that call it at once wait for one of them to build it."""
    store = ShardedStore(store_path)
    if not store.complete:
        raise RuntimeError(f"latent store {store.path} is incomplete: run the encode stage first")
    try:
        copy = LatentCopy(store, copy_root(copy_dir), images)
    except OSError as e:
        log(f"latent copy: cannot use {copy_root(copy_dir)} ({e})")
        return None
    ready = False
    try:
        ready = _hold_complete(copy, log)
        return copy if ready else None
    finally:
        if not ready:  # no copy to read: the lock goes, in whatever mode it was
            copy.close()


def _hold_complete(copy: LatentCopy, log) -> bool:
    """Hold the shared lock of ``copy``, complete and checked (True), after building it under the
    exclusive lock where needed; False where it cannot be built here (the lock then still held)."""
    waited = time.monotonic()
    while True:
        copy.lock.take(SHARED)  # waits while another process builds
        reason = copy.check()
        if reason is None:
            return True
        copy.lock.release()
        if copy.lock.take(EXCLUSIVE, wait=False):
            break
        if time.monotonic() - waited > 60:  # a run reads a copy that has since been damaged
            log(f"latent copy: waiting for the processes that hold {copy.lock.path} ({reason})")
            waited = time.monotonic()
        time.sleep(1)
    reason = copy.check()
    if reason is not None and not _build(copy, reason, log):
        return False
    copy.lock.take(SHARED)  # from exclusive to shared: readers may join
    return True


def _build(copy: LatentCopy, reason: str, log) -> bool:
    """Build ``copy`` (the caller holds its exclusive lock); False where it does not fit on its
    disk (a build that fills the disk up is deleted)."""
    remove_older(copy, log)
    if not _room_for(copy, log):
        return False
    log(f"latent copy: building {copy.folder} from {copy.store.path} ({reason}; "
        f"{nbytes(copy.arrays) / 1e9:.2f} GB)")
    started = time.monotonic()
    try:
        copy.build()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log(f"latent copy: {copy.folder.parent} filled up while copying ({e})")
        shutil.rmtree(copy.folder, ignore_errors=True)
        return False
    log(f"latent copy: built and verified in {time.monotonic() - started:.1f} s")
    return True


def _room_for(copy: LatentCopy, log) -> bool:
    """Whether the copy fits on its disk with ``HEADROOM`` to spare (a partial build counts as
    already there)."""
    have = sum(p.stat().st_size for p in copy.folder.glob("*.npy")) if copy.folder.exists() else 0
    need = nbytes(copy.arrays) - have
    free = shutil.disk_usage(copy.folder.parent).free
    if need + HEADROOM <= free:
        return True
    log(f"latent copy: {copy.folder.parent} has {free / 1e9:.1f} GB free, the copy needs "
        f"{need / 1e9:.1f} GB more (+{HEADROOM / 1e9:.0f} GB headroom)")
    return False


def verify(store_path: str | Path, copy_dir: str | None = None, repair: bool = True,
           log=print, images: bool = False) -> list[tuple[str, int]]:
    """Re-read the whole copy (the one with images where ``images``) and compare every shard with
    its CRC32; copy damaged shards again from the store when ``repair`` (which waits until no run
    reads the copy). Returns the damaged (array, shard) pairs found."""
    with LatentCopy(ShardedStore(store_path), copy_root(copy_dir), images) as copy:
        with copy.lock.held(SHARED):
            reason = copy.check()
            if reason is not None:
                raise CopyDamaged(f"{copy.folder}: {reason}; the next training start rebuilds it")
            started = time.monotonic()
            bad = copy.damaged(copy.manifest()["crc32"])
            seconds = time.monotonic() - started
        gb = nbytes(copy.arrays) / 1e9
        log(f"latent copy {copy.folder}: {gb:.3f} GB checked in {seconds:.2f} s "
            f"({gb / max(seconds, 1e-9):.2f} GB/s): "
            + (f"{len(bad)} damaged shard(s): {bad}" if bad else "every shard matches its CRC32"))
        if bad and repair:
            log("latent copy: waiting for the runs that read it to end, then copying them again")
            with copy.lock.held(EXCLUSIVE):
                copy.repair(bad)
                still = copy.damaged(copy.manifest()["crc32"])
            if still:
                raise CopyDamaged(f"{copy.folder}: shards {still} are still damaged after "
                                  "copying them again: delete the folder")
            log(f"latent copy: {len(bad)} shard(s) copied again from {copy.store.path}; verified")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build or verify the node-local copy of a latent "
                                "store that training reads (sra2.data.latent_copy).")
    p.add_argument("action", choices=["build", "verify"])
    p.add_argument("--latents", default="data/latents.json", help="store folder or pointer file")
    p.add_argument("--copy-dir",
                   help="train.copy_dir (default: $SRA2_COPY_DIR, else $TMPDIR/sra2-latents)")
    p.add_argument("--no-repair", action="store_true", help="verify only: report damaged shards")
    p.add_argument("--images", action="store_true",
                   help="the copy with the store's images, which REPA runs read (repa.enabled)")
    args = p.parse_args(argv)
    store = pointed_store(args.latents)
    if args.action == "build":
        return 0 if ensure(store, args.copy_dir, images=args.images) is not None else 1
    bad = verify(store, args.copy_dir, repair=not args.no_repair, images=args.images)
    return 1 if bad and args.no_repair else 0


if __name__ == "__main__":
    sys.exit(main())
