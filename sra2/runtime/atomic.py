"""Writes that are complete or absent: write a temporary file, fsync, rename."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() would give; mkstemp's 0600 would hide outputs from others


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotAFolder(FileExistsError):
    """A path that should be a folder (an output, or a parent of one) is a file; ``strerror``
    holds the whole message."""

    def __str__(self) -> str:
        return self.strerror


def make_folder(path: str | Path) -> Path:
    """``mkdir -p path``, naming what is in the way when ``path`` or a parent of it is a file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotAFolder(errno.EEXIST, f"{blocker} exists and is not a folder: move it away "
                                       f"and rerun", str(blocker)) from None
    return path


class WriteFailed(OSError):
    """Writing ``filename`` failed with ``errno``; the file is as it was before. ``strerror``
    holds the whole message: what went wrong, the file, what to do."""

    def __str__(self) -> str:
        return self.strerror


_WHAT_TO_DO = {errno.ENOSPC: "free space and rerun",
               errno.EDQUOT: "free space within your quota (or raise it) and rerun",
               errno.EROFS: "remount the file system writable or write elsewhere, and rerun",
               errno.EACCES: "give yourself write permission on its folder and rerun",
               errno.EPERM: "give yourself write permission on its folder and rerun",
               errno.EIO: "check the disk (dmesg) and rerun"}


def write_failed(path: Path, cause: OSError) -> WriteFailed:
    """``cause`` as the :class:`WriteFailed` of writing ``path`` (for writers other than
    :func:`write_with`, such as zarr's)."""
    said = (cause.strerror or str(cause) or type(cause).__name__).rstrip(".")
    what = _WHAT_TO_DO.get(cause.errno, "fix that and rerun")
    return WriteFailed(cause.errno, f"{said[:1].lower()}{said[1:]} writing {path}; {what}: "
                                    f"nothing was lost", str(path))


class _Watched:
    """The temporary file, remembering the first OSError that its write or flush raised: a caller
    may swallow it (torch.save's C++ writer raises "unexpected pos ..." instead, naming neither the
    error nor the file)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def _watch(self, method, *args):
        try:
            return method(*args)
        except OSError as e:
            self.error = self.error or e
            raise

    def write(self, data):
        return self._watch(self.file.write, data)

    def flush(self):
        return self._watch(self.file.flush)

    def __getattr__(self, name):
        return getattr(self.file, name)


def write_with(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place. An
    OSError of the writing itself (a full disk, a read-only file system...) is a
    :class:`WriteFailed` naming ``path``; the temporary file is removed, ``path`` is untouched."""
    path = Path(path)
    make_folder(path.parent)
    tmp = f = theirs = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as raw:
            f = _Watched(raw)
            try:
                write(f)
            except BaseException as e:
                theirs = e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        # an OSError that write() raised on its own (reading its input, say) is not about path
        ours = e if isinstance(e, OSError) and e is not theirs else None
        cause = (f.error if f is not None else None) or ours
        if cause is None or not isinstance(e, Exception):
            raise
        raise write_failed(path, cause) from e
    _fsync_dir(path.parent)


def link(source: str | Path, path: str | Path) -> None:
    """Make ``path`` a hard link to ``source`` (one file, two names), replacing what was there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as JSON; a NaN or an infinity in it is a ValueError, never a file that other tools
    cannot read."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(paths: Iterable[str | Path], columns: list[str], rows: Iterable[dict]) -> None:
    """``rows`` under a header of ``columns``, the same text written to each of ``paths``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for path in paths:
        write_text(path, buf.getvalue())


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    write_with(path, lambda f: torch.save(obj, f))


@contextmanager
def temporary_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh folder to fill, which replaces ``folder`` whole once the block ends without an
    error (its files made readable as open() would and on disk first): ``folder`` is complete or
    as it was."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_folder(tmp)
    yield tmp
    for f in tmp.rglob("*"):  # safetensors writes 0600
        if f.is_file():
            os.chmod(f, FILE_MODE)
            with open(f, "rb") as opened:
                os.fsync(opened.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
