"""Errors that name the thing and say what to do, in one line: a write that fails (a full disk), a
reference batch that is not one, a damaged samples.npz, a file where an output folder should be;
and images whose crop shows little of them, listed (or rejected) by encode."""

import errno
import io
import json
import os
import shutil
import subprocess
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sra2.data.captions import Captioned
from sra2.data.encode import _signature, encode_dataset, first_files, odd_images
from sra2.evaluate.metrics import load_reference
from sra2.runtime import atomic
from sra2.runtime.lock import hold
from sra2.sample.outputs import DamagedFile, read_npz_images

from conftest import with_overrides, write_folder

# version v of one file of each kind the stages write, and how to read it back
WRITE = {"bytes": lambda p, v: atomic.write_bytes(p, bytes([v]) * 20000),
         "json": lambda p, v: atomic.write_json(p, {"v": [v] * 5000}),
         "torch": lambda p, v: atomic.save_torch({"w": torch.full((64, 64), v), "step": v}, p)}
READ = {"bytes": lambda p: p.read_bytes()[0],
        "json": lambda p: json.loads(p.read_text())["v"][0],
        "torch": lambda p: torch.load(p)["step"]}


class _FullDisk:
    """A file on a disk with ``room`` bytes free: a write past them fails as write(2) does."""

    def __init__(self, file, room: int, code: int):
        self.file, self.room, self.code = file, room, code

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= n
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk(monkeypatch, room: int = 1000, code: int = errno.ENOSPC) -> None:
    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen",
                        lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), room, code))


def check_failed_write(kind: str, path, error: pytest.ExceptionInfo, before: bytes) -> None:
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
    assert str(error.value) == (f"no space left on device writing {path}; free space and rerun: "
                                f"nothing was lost")
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary file left
    assert path.read_bytes() == before and READ[kind](path) == 1


@pytest.mark.parametrize("kind", list(WRITE))
def test_a_full_disk_names_the_file_and_loses_nothing(tmp_path, monkeypatch, kind):
    path = tmp_path / "out" / f"file.{kind}"
    WRITE[kind](path, 1)
    before = path.read_bytes()
    fill_disk(monkeypatch)
    with pytest.raises(atomic.WriteFailed) as error:
        WRITE[kind](path, 2)
    check_failed_write(kind, path, error, before)
    monkeypatch.undo()  # space is back: a rerun writes the new version
    WRITE[kind](path, 2)
    assert READ[kind](path) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs, where this machine lets the tests mount one."""
    where = tmp_path / "disk"
    where.mkdir()
    mount = shutil.which("mount")
    done = mount and subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                                    capture_output=True)
    if not done or done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_real_full_disk_names_the_file_and_loses_nothing(small_disk):
    paths = {kind: small_disk / f"file.{kind}" for kind in WRITE}
    for kind, path in paths.items():
        WRITE[kind](path, 1)
    with open(small_disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
        while True:
            filler.write(bytes(2**16))
    for kind, path in paths.items():
        before = path.read_bytes()
        with pytest.raises(atomic.WriteFailed) as error:
            WRITE[kind](path, 2)
        check_failed_write(kind, path, error, before)
    (small_disk / "filler").unlink()
    for kind, path in paths.items():
        WRITE[kind](path, 2)
        assert READ[kind](path) == 2


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_other_write_errors_name_the_file_and_what_to_do(tmp_path, monkeypatch, code):
    fill_disk(monkeypatch, room=0, code=code)
    path = tmp_path / "file.json"
    with pytest.raises(atomic.WriteFailed) as error:
        atomic.write_json(path, {"a": 1})
    said = os.strerror(code)
    assert error.value.errno == code
    assert str(error.value).startswith(f"{said[0].lower()}{said[1:]} writing {path}; ")
    assert str(error.value).endswith(": nothing was lost") and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_an_error_of_the_writer_itself_is_left_as_it_is(tmp_path):
    """An OSError that the write function raised on its own is not about the file written."""
    def write(f):
        f.write(b"half")
        open(tmp_path / "no such input")

    with pytest.raises(FileNotFoundError, match="no such input"):
        atomic.write_with(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "train").write_text("not a folder")
    said = f"{tmp_path / 'train'} exists and is not a folder: move it away and rerun"
    with pytest.raises(atomic.NotAFolder) as error:
        atomic.make_folder(tmp_path / "train")
    assert str(error.value) == said
    with pytest.raises(atomic.NotAFolder) as error:
        atomic.write_json(tmp_path / "train" / "run" / "signature.json", {})
    assert str(error.value) == said
    with pytest.raises(atomic.NotAFolder) as error, hold([tmp_path / "train" / "out"]):
        pass
    assert str(error.value) == said


# --- files the evaluate stage reads -------------------------------------------------------------

def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_damaged_samples_npz_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "samples.npz"
    whole = npz_bytes(arr_0=np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3))
    path.write_bytes(whole)
    assert read_npz_images(path).shape == (4, 8, 8, 3)
    path.write_bytes(whole[: len(whole) // 2])  # cut short: no zip directory
    with pytest.raises(DamagedFile, match=f"^{path} is damaged or incomplete .* -s -f sample"):
        read_npz_images(path)
    # the zip is whole but arr_0 holds 2 of the 4 images its header says: a memory map would read
    # the zip's directory as pixels
    header = {"descr": "|u1", "fortran_order": False, "shape": (4, 8, 8, 3)}
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(member, header)
        member.write(bytes(2 * 8 * 8 * 3))
    with pytest.raises(DamagedFile, match=r"arr_0 holds 384 bytes, its header says \(4, 8, 8, 3\)"):
        read_npz_images(path)


def test_arr_0_behind_other_arrays_reads(tmp_path):
    """A reference batch may store arr_0 after its statistics, past offset 65535 (the local file
    header's uint16 lengths once made that offset a uint16 too)."""
    path = tmp_path / "reference.npz"
    path.write_bytes(npz_bytes(mu=np.zeros(20000), arr_0=IMAGES + 7))
    np.testing.assert_array_equal(read_npz_images(path), IMAGES + 7)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


IMAGES = np.zeros((2, 8, 8, 3), np.uint8)
NOT_REFERENCES = {"random": np.random.default_rng(0).bytes(1000),
                  "objects": npz_bytes(mu=np.array([{"a": 1}], dtype=object), arr_0=IMAGES),
                  "npy": npy_bytes(IMAGES),
                  "cut": npz_bytes(arr_0=IMAGES)[:300],
                  "empty": b""}


@pytest.mark.parametrize("content", list(NOT_REFERENCES))
def test_a_file_that_is_no_reference_batch_is_named(tmp_path, content):
    path = tmp_path / "reference.npz"
    path.write_bytes(NOT_REFERENCES[content])
    with pytest.raises(DamagedFile) as error:
        load_reference(path)
    said = str(error.value)
    assert said.startswith(f"evaluate.reference {str(path)!r} is not an ADM reference batch .npz")
    assert said.endswith("download it again, or set evaluate.reference to null to compare with "
                         "the encoded dataset's images")
    assert "allow_pickle" not in said and "\n" not in said


# --- odd images ---------------------------------------------------------------------------------

@pytest.fixture
def odd_folder(tmp_path):
    rng = np.random.default_rng(0)
    jpeg = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))  # noqa: E731
    root = write_folder(tmp_path / "images", {})
    for rel, (w, h) in {"a/dot.JPEG": (1, 1), "a/photo.JPEG": (64, 48), "b/photo.JPEG": (48, 64),
                        "b/strip.JPEG": (10000, 10), "b/wide.JPEG": (400, 40)}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        jpeg(w, h).save(root / rel, quality=90)
    return root


def test_odd_images_are_encoded_and_listed_or_rejected(tmp_path, tiny, odd_folder):
    accept = with_overrides(tiny, data={"root": str(odd_folder), "demo": None})
    summary = encode_dataset(accept, tmp_path / "accepted")  # lists read back from the done marks
    assert (summary["encoded"], summary["rejected"], summary["odd"]) == (5, 0, 3)
    assert summary["odd_images"] == [
        {"index": 0, "file": "a/dot.JPEG", "size": "1x1",
         "reason": "shorter side 1 px, under 32 px"},
        {"index": 3, "file": "b/strip.JPEG", "size": "10000x10",
         "reason": "shorter side 10 px, under 32 px; aspect ratio 1000.0:1, over 4:1"},
        {"index": 4, "file": "b/wide.JPEG", "size": "400x40",
         "reason": "aspect ratio 10.0:1, over 4:1"}]
    assert first_files(summary["odd_images"], 2) == (": a/dot.JPEG (1x1), b/strip.JPEG (10000x10) "
                                                     "and 1 more")

    reject = with_overrides(accept, encode={"odd_images": "reject"})
    summary = encode_dataset(reject, tmp_path / "rejected")
    assert (summary["encoded"], summary["rejected"], summary["odd"]) == (2, 3, 0)
    assert [(r["file"], r["reason"]) for r in summary["rejects"]][::2] == [
        ("a/dot.JPEG", "odd image 1x1: shorter side 1 px, under 32 px (encode.odd_images is "
                       "reject)"),
        ("b/wide.JPEG", "odd image 400x40: aspect ratio 10.0:1, over 4:1 (encode.odd_images is "
                        "reject)")]


def test_odd_images_name_a_store_only_when_rejected(tiny):
    """Stores encoded before encode.odd_images existed keep their folder names."""
    images = Captioned(SimpleNamespace(files=["a/1.JPEG"], labels=[0]), None)
    accept = _signature(tiny, images)
    assert "odd_images" not in accept
    reject = _signature(with_overrides(tiny, encode={"odd_images": "reject"}), images)
    assert reject == {**accept, "odd_images": "reject"}


def test_done_marks_without_an_odd_list_still_summarize():
    store = SimpleNamespace(records=lambda: [{"shard": 0, "rejects": []}])
    assert odd_images(store) == []
    records = [{"file": f"{i}.JPEG", "size": "1x1"} for i in range(7)]
    assert first_files(records) == (": 0.JPEG (1x1), 1.JPEG (1x1), 2.JPEG (1x1), 3.JPEG (1x1), "
                                    "4.JPEG (1x1) and 2 more")
