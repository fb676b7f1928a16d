"""The DVC cache entries behind a store's files and the samples' ``.npz``.

This repository's ``.dvc/config`` sets ``cache.type: hardlink,copy``: a cached output's file and
its cache entry are one file (a copy only where the cache is on another file system), so nothing
big is stored twice. Bytes damaged in the workspace are then damaged in the cache too, and DVC
trusts its read-only entries without hashing them again: a rerun that computes a damaged file anew
would be linked back to the damaged entry. A repair therefore moves such an entry out of the
cache with the damaged file (:func:`evict_damaged`); DVC then caches the new file. And DVC leaves
a persistent output's files copied out of the cache after its stage reruns: the stage links them
back first (:func:`relink`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable


def entries(files: list[Path]) -> dict[Path, Path]:
    """The cache entry that DVC recorded for each of ``files`` (a cached output file as
    ``dvc.lock`` names it, or a file of a cached output folder by the folder's listing); files
    outside every cached output, or outside a DVC repository, are left out."""
    if not files:
        return {}
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        root = Repo.find_root(os.path.dirname(os.path.abspath(files[0])))
    except NotDvcRepoError:
        return {}
    found = {}
    with Repo(root) as repo:
        oid_path = repo.cache.local.oid_to_path
        for out in repo.index.outs:
            if not (out.use_cache and out.hash_info and out.hash_info.value):
                continue
            base = Path(out.fs_path)
            if not out.is_dir_checksum:
                found.update({f: Path(oid_path(out.hash_info.value)) for f in files
                              if Path(os.path.abspath(f)) == base})
                continue
            inside = [f for f in files if Path(os.path.abspath(f)).is_relative_to(base)]
            tree = out.get_dir_cache() if inside else None
            for file in inside if tree is not None else []:
                entry = tree.get(Path(os.path.abspath(file)).relative_to(base).parts)
                if entry is not None and entry[1] is not None:
                    found[file] = Path(oid_path(entry[1].value))
    return found


def evict_damaged(files: list[Path], folder: Path,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Move the cache entry of each of ``files`` whose bytes no longer have the MD5 that names it
    (DVC's own check) into ``folder/dvc-cache/``, kept for inspection like the quarantined files;
    returns the entries moved."""
    moved = []
    for file, entry in entries(files).items():
        if not entry.is_file() or _md5(entry) == entry.parent.name + entry.name:
            continue  # a reflink or a copy of the good bytes: the cache is intact
        target = folder / "dvc-cache" / entry.parent.name / entry.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(entry, target)
        moved.append(entry)
        log(f"DVC cache entry {entry} of {file} held the same damaged bytes (a link): moved to "
            f"{target}, so that DVC caches the file computed again")
    return moved


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def copies_into(folder: Path) -> Path | None:
    """The DVC cache folder that would hold a copy of an output under ``folder``: None where DVC
    links instead (cache.type hardlink or symlink, the cache on the same file system) or where
    ``folder`` is in no DVC repository."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    try:
        root = Repo.find_root(str(existing))
    except NotDvcRepoError:
        return None
    with Repo(root) as repo:
        cache = Path(repo.cache.local.path)
        types = repo.cache.local.cache_types
    cache_existing = next(p for p in (cache, *cache.parents) if p.exists())
    same_disk = os.stat(cache_existing).st_dev == os.stat(existing).st_dev
    if "symlink" in types or ("hardlink" in types and same_disk):
        return None
    return cache


def relink(folder: Path, log: Callable[[str], None] = print) -> int:
    """Make the files under ``folder`` that are copies of their cache entries the cache's files
    again; returns the bytes this frees. Before a stage with a persistent output runs, DVC copies
    every linked file of that output (its "unprotect"), and they stay copies after the stage: each
    rerun of encode would leave a second copy of every store. A copy is known by its single link
    and its entry's size (DVC made it from that entry moments before)."""
    copies = [p for p in Path(folder).rglob("*") if p.is_file() and p.stat().st_nlink == 1]
    freed = 0
    for file, entry in entries(copies).items():
        if entry.is_file() and entry.stat().st_size == file.stat().st_size:
            tmp = file.with_name(f".{file.name}.relink.tmp")
            os.link(entry, tmp)
            os.replace(tmp, file)
            freed += entry.stat().st_size
    if freed:
        log(f"{folder}: {freed / 2**20:,.1f} MiB that DVC had copied out of its cache are its "
            f"files again (hard links)")
    return freed
