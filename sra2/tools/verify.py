"""Scrub stored data on demand, as a file system's scrub or git's fsck: every byte of every done
shard of a store against its done mark, every checkpoint of a training run read back, every byte
of the samples' ``.npz`` against its CRC32.

    python -m sra2.tools.verify data/latents data/samples/shards data/train/checkpoints [--repair]

A path may be a store, a pointer file naming one (``data/latents.json``), a run folder (its
``step-*.pt``), an ``.npz`` or a folder holding any of these. Damage is reported per shard or file;
with ``--repair``, damaged shards are moved to ``.quarantine/`` beside the store and damaged
checkpoints to the run's ``.quarantine/``, so that rerunning the stage that wrote them (``dvc
repro``) computes them again; the sample stage moves a damaged ``.npz`` aside itself. Exits 1 when
damage is found and left in place, else 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sra2.data.store import QUARANTINE, DamagedStore, ShardedStore, pointed_store
from sra2.model.sit import UnsafeCheckpoint
from sra2.sample.outputs import npz_damage
from sra2.train.checkpoints import Checkpoints, resumable


def found(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The stores, run folders and ``.npz`` files at or under ``path`` (a pointer file names a
    store)."""
    if path.is_file():
        return ([], [], [path]) if path.suffix == ".npz" else ([pointed_store(path)], [], [])
    if (path / "zarr.json").is_file():
        return [path], [], []
    if any(Checkpoints.STEP_FILE.fullmatch(p.name) for p in path.iterdir()):
        return [], [path], []
    kinds = [], [], sorted(path.glob("*.npz"))
    for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name != QUARANTINE):
        for kind, more in zip(kinds, found(child)):
            kind.extend(more)
    return kinds


def scrub_store(path: Path, repair: bool) -> int:
    """Print what a deep check of the store finds; returns the damage left in place."""
    started = time.perf_counter()
    try:
        store = ShardedStore(path, check=False)
        damage = store.check(deep=True)
    except DamagedStore as e:  # its metadata: nothing to check shard by shard
        print(f"DAMAGED {e}")
        return 1
    seconds = time.perf_counter() - started
    done = sorted(store.done_shards())
    size = sum(f.stat().st_size for s in done for f in store.shard_files(s).values() if f.exists())
    print(f"{path}: {len(done)} of {store.num_shards} shards done, {size / 2**30:.2f} GiB read in "
          f"{seconds:.1f} s: {'clean' if not damage else f'{len(damage)} damaged file(s)'}")
    for d in damage:
        print(f"  DAMAGED {d}")
    if damage and repair:
        store.repair(log=lambda line: print(f"  {line}"))
        return 0
    return len(damage)


def scrub_run(folder: Path, repair: bool) -> int:
    """Print which checkpoints of a run folder cannot be resumed from; returns those left (a
    file that would run code is never moved: it is no damage, someone put it there)."""
    run = Checkpoints(folder, None)
    steps, bad, left = run.steps(), 0, 0
    for path in map(run.path, steps):
        try:
            why = resumable(path)[1]
        except UnsafeCheckpoint as e:
            print(f"  REFUSED {e}")
            bad, left = bad + 1, left + 1
            continue
        if why:
            bad, left = bad + 1, left + (not repair)
            moved = f"; moved to {run.quarantine(path)}" if repair else ""
            print(f"  DAMAGED {path}: {why}{moved}")
    print(f"{folder}: {len(steps)} checkpoint(s): {f'{bad} damaged' if bad else 'clean'}")
    return left


def scrub_npz(path: Path) -> int:
    """Print whether every byte of the ``.npz`` matches its CRC32; returns 1 when one does not."""
    started = time.perf_counter()
    why = npz_damage(path)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB read in "
          f"{time.perf_counter() - started:.1f} s: {'clean' if why is None else 'damaged'}")
    if why:
        print(f"  DAMAGED {path}: {why}; rerun the sample stage (dvc repro): it moves the file "
              f"aside and draws the samples again")
    return int(why is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sra2.tools.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path,
                        help="stores, pointer files, run folders, or folders holding them")
    parser.add_argument("--repair", action="store_true",
                        help="move what is damaged aside, so that the stage that wrote it "
                             "computes it again")
    args = parser.parse_args(argv)
    stores, runs, npzs = [], [], []
    for path in args.paths:  # every path understood before any is read
        if not path.exists():
            parser.error(f"{path}: no such file or folder")
        more = found(path)
        if not any(more):
            parser.error(f"{path}: no store, pointer file, run folder or .npz here")
        for kind, paths in zip((stores, runs, npzs), more):
            kind.extend(paths)
    left = sum(scrub_store(s, args.repair) for s in stores)
    left += sum(scrub_run(r, args.repair) for r in runs)
    left += sum(map(scrub_npz, npzs))
    if left:
        print(f"{left} damaged file(s) left in place: rerun with --repair, then dvc repro")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
