"""The node-local copy that training reads: the store's batches bit for bit, rebuilt when stale or
partial, damage caught by its checksums, one builder at a time, and the store as a fallback."""

import shutil
import tempfile
import threading

import numpy as np
import pytest
import torch

from sra2.data import latent_copy
from sra2.data.latent_copy import CopyDamaged, LatentCopy, copy_root, ensure, verify
from sra2.data.latents import StepBatches, open_batches, write_synthetic_store
from sra2.data.store import ShardedStore
from sra2.train.loop import warn_reading_the_store

from conftest import with_overrides

REJECTED = (3, 17, 40)


def synthetic(path, items=50, dtype="float32", seed=0):
    return write_synthetic_store(path, items, (2, 4, 4), 5, chunk_size=4, shard_size=16,
                                 dtype=dtype, rejected=REJECTED, seed=seed)


def assert_same_batches(store, copy, steps=range(0, 5), batch=32, world=2):
    """Every rank's batches through the copy equal those read from the zarr store."""
    for rank in range(world):
        from_store = StepBatches(store.path, batch, seed=1, rank=rank, world=world)
        from_copy = StepBatches(store.path, batch, seed=1, rank=rank, world=world, copy=copy)
        for step in steps:
            a, b = from_store[step], from_copy[step]
            for k in ("mean", "std", "labels"):
                assert a[k].dtype == b[k].dtype
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=f"{k} {step}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_copy_gives_the_stores_batches_bit_for_bit(tmp_path, dtype):
    # 47 accepted latents, batches of 32: steps 1 and 2 span two epochs, so an item can come twice
    store = synthetic(tmp_path / "s", dtype=dtype)
    copy = ensure(store.path, tmp_path / "copies")
    assert copy is not None and copy.check() is None
    assert copy.open("mean").dtype == np.dtype(dtype)  # stored as the store stores it
    assert_same_batches(store, copy)


def test_a_truncated_copy_is_found_at_start_and_rebuilt(tmp_path):
    store = synthetic(tmp_path / "s")
    copy = ensure(store.path, tmp_path / "copies")
    size = copy.file("std").stat().st_size
    with open(copy.file("std"), "r+b") as f:
        f.truncate(size - 100)
    copy.close()  # the run that read it has ended
    with LatentCopy(store, tmp_path / "copies") as found:
        assert "truncated" in found.check()
    logged = []
    again = ensure(store.path, tmp_path / "copies", logged.append)
    assert any("building" in line for line in logged)
    assert again.check() is None and again.file("std").stat().st_size == size
    assert_same_batches(store, again)


def test_a_store_encoded_again_gets_a_new_copy_and_the_old_one_goes(tmp_path):
    store = synthetic(tmp_path / "s", seed=0)
    old = ensure(store.path, tmp_path / "copies")
    old.close()  # the run that read it has ended
    shutil.rmtree(store.path)
    store = synthetic(tmp_path / "s", seed=1)  # other settings: other latents at the same path
    new = ensure(store.path, tmp_path / "copies")
    assert new.folder != old.folder and not old.folder.exists()
    assert_same_batches(store, new)


def test_a_copy_in_use_is_not_deleted(tmp_path):
    store = synthetic(tmp_path / "s")
    old = ensure(store.path, tmp_path / "copies")  # still held: a run reads it
    (store.path / "done" / "shard-000000.json").touch()  # the shard was written again
    new = ensure(store.path, tmp_path / "copies")
    assert new.folder != old.folder and old.folder.exists()


def test_one_changed_byte_is_found_by_verify_and_repaired(tmp_path):
    store = synthetic(tmp_path / "s")
    copy = ensure(store.path, tmp_path / "copies")
    data = copy.open("mean")
    offset = copy.file("mean").stat().st_size - data.nbytes + 20 * data[0].nbytes + 5  # item 20
    with open(copy.file("mean"), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    assert copy.check() is None  # sizes cannot see it: the start stays cheap
    assert verify(store.path, tmp_path / "copies", repair=False) == [("mean", 1)]  # items 16-31
    copy.close()  # repairs wait for the runs that read the copy
    logged = []
    assert verify(store.path, tmp_path / "copies", log=logged.append) == [("mean", 1)]
    assert "copied again" in logged[-1]
    assert verify(store.path, tmp_path / "copies") == []
    assert_same_batches(store, ensure(store.path, tmp_path / "copies"))


def test_a_build_cut_off_part_way_resumes(tmp_path, monkeypatch):
    store = synthetic(tmp_path / "s", items=100)  # 7 shards: copied here, one by one
    copied = []
    real = latent_copy.copy_shard

    def dies_after_three(store, folder, shard):
        if len(copied) == 3:
            raise KeyboardInterrupt  # killed between two shards
        copied.append(shard)
        return real(store, folder, shard)

    monkeypatch.setattr(latent_copy, "copy_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        ensure(store.path, tmp_path / "copies")
    with LatentCopy(store, tmp_path / "copies") as found:
        assert found.check() == "no complete copy"
    monkeypatch.setattr(latent_copy, "copy_shard", lambda store, folder, shard: (
        copied.append(shard), real(store, folder, shard))[1])
    copy = ensure(store.path, tmp_path / "copies")
    assert copied == [0, 1, 2, 3, 4, 5, 6]  # each shard copied once
    assert verify(store.path, tmp_path / "copies") == []
    assert_same_batches(store, copy)
    copy.close()


def test_processes_that_start_together_build_once(tmp_path):
    store = synthetic(tmp_path / "s", items=400)
    logged, copies = [], []
    threads = [threading.Thread(target=lambda: copies.append(
        ensure(store.path, tmp_path / "copies", logged.append))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("building" in line for line in logged) == 1
    assert len({c.folder for c in copies}) == 1 and all(c.check() is None for c in copies)


def test_a_damaged_build_is_never_trained_on(tmp_path, monkeypatch):
    store = synthetic(tmp_path / "s")
    real = latent_copy.copy_shard

    def flips_a_bit(store, folder, shard):
        result = real(store, folder, shard)
        if shard == 2:  # the disk gives back other bytes than were written
            std = np.load(folder / "std.npy", mmap_mode="r+")
            std[35, 0, 0, 0] += 1.0
            std.flush()
        return result

    monkeypatch.setattr(latent_copy, "copy_shard", flips_a_bit)
    with pytest.raises(CopyDamaged, match=r"\('std', 2\)"):
        ensure(store.path, tmp_path / "copies")
    with LatentCopy(store, tmp_path / "copies") as found:
        assert found.check() == "no complete copy"


def test_no_room_falls_back_to_the_store_and_says_how_many_readers(tmp_path, tiny, monkeypatch):
    store = synthetic(tmp_path / "s")
    monkeypatch.setattr(latent_copy, "HEADROOM", 1 << 62)
    logged = []
    cfg = with_overrides(tiny, train={"global_batch": 32, "copy_dir": str(tmp_path / "copies")})
    batches = open_batches(cfg, store.path, log=logged.append)
    assert batches.files is None and batches.copy is None  # reads the zarr store
    warn_reading_the_store(cfg, batches, logged.append)  # as training then does
    assert "free" in logged[0] and "set train.workers to at least" in logged[-1]
    assert not any(p.suffix == ".npy" for p in (tmp_path / "copies").rglob("*"))


def test_read_from_store_makes_no_copy(tmp_path, tiny):
    store = synthetic(tmp_path / "s")
    cfg = with_overrides(tiny, train={"global_batch": 32, "read_from": "store",
                                      "copy_dir": str(tmp_path / "copies")})
    assert open_batches(cfg, store.path).files is None
    assert not (tmp_path / "copies").exists()


def test_copies_go_to_the_configured_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SRA2_COPY_DIR", str(tmp_path / "env"))
    assert copy_root(None) == tmp_path / "env" and copy_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("SRA2_COPY_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert copy_root(None) == tmp_path / "sra2-latents"


def test_an_incomplete_store_is_refused(tmp_path):
    store = synthetic(tmp_path / "s")
    (store.path / "done" / "shard-000001.json").unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        ensure(ShardedStore(store.path).path, tmp_path / "copies")


def test_a_disk_that_fills_up_while_copying_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    store = synthetic(tmp_path / "s")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    logged = []
    assert ensure(store.path, tmp_path / "copies", logged.append) is None
    assert "filled up" in logged[-1]
    assert not any(p.is_dir() for p in (tmp_path / "copies").iterdir())


def test_images_come_through_their_own_copy_row_for_row(tmp_path):
    """A run that needs the images gets a copy with them, named apart from the latents-only copy
    (neither replaces the other), and their rows are the store's."""
    store = write_synthetic_store(tmp_path / "s", 50, (2, 4, 4), 5, chunk_size=4, shard_size=16,
                                  rejected=REJECTED, image_size=8)
    plain = ensure(store.path, tmp_path / "copies")
    with_images = ensure(store.path, tmp_path / "copies", images=True)
    assert with_images.folder != plain.folder and plain.check() is None
    assert ("images" in with_images.manifest()["arrays"]
            and "images" not in plain.manifest()["arrays"])
    assert verify(store.path, tmp_path / "copies", images=True) == []
    from_store = StepBatches(store.path, 32, seed=1, images=True)
    from_copy = StepBatches(store.path, 32, seed=1, copy=with_images, images=True)
    for step in range(3):
        a, b = from_store[step], from_copy[step]
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (32, 8, 8, 3)
        for k in ("images", "mean", "labels"):
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=f"{k} {step}")
    assert "images" not in StepBatches(store.path, 32, seed=1, copy=plain)[0]


def test_repa_on_a_store_without_pixels_says_what_to_encode(tmp_path, tiny):
    store = synthetic(tmp_path / "s")
    cfg = with_overrides(tiny, repa={"enabled": True},
                         train={"global_batch": 32, "copy_dir": str(tmp_path / "copies")})
    with pytest.raises(ValueError, match=r"encoded without pixels: set encode.pixels: true and "
                                         r"run the encode stage \(dvc repro encode\)"):
        open_batches(cfg, store.path, images_for=["repa.enabled"])
    assert not (tmp_path / "copies").exists()  # failed before any copying
