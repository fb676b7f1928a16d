import numpy as np
import pytest

from sra2.data.store import QUARANTINE, DamagedStore, ShardedStore, StoreMismatch


def make(path, signature=None):
    return ShardedStore.open_or_create(path, 10, 4, 2, {"x": ((3,), "float32")},
                                       fixed={"labels": np.arange(10)},
                                       signature=signature or {"v": 1})


def test_shards_are_written_marked_and_reopened(tmp_path):
    store = make(tmp_path / "s")
    assert store.num_shards == 3 and store.pending_shards() == [0, 1, 2]
    assert store.shard_range(2) == (8, 10)
    store.write_shard(2, {"x": np.ones((2, 3), np.float32)}, {"note": "last"})
    again = make(tmp_path / "s")
    assert again.pending_shards() == [0, 1] and not again.complete
    assert again.pending_shards(rank=1, world=2) == [1]
    [record] = again.records()
    assert record["shard"] == 2 and record["note"] == "last"
    assert record["files"]["x"]["file"] == "x/c/2/0" and record["files"]["x"]["bytes"] > 0
    np.testing.assert_array_equal(again.array("x")[8:], 1)
    np.testing.assert_array_equal(again.array("labels")[:], np.arange(10))


def test_a_shard_of_the_wrong_length_is_refused(tmp_path):
    store = make(tmp_path / "s")
    with pytest.raises(ValueError, match="needs 4 items"):
        store.write_shard(0, {"x": np.ones((3, 3), np.float32)}, {})
    assert store.pending_shards() == [0, 1, 2]


def test_reopening_with_other_settings_fails(tmp_path):
    make(tmp_path / "s")
    with pytest.raises(StoreMismatch, match="other settings"):
        make(tmp_path / "s", signature={"v": 2})


def test_pointer_names_the_store_relative_to_itself(tmp_path):
    from sra2.data.store import digest, pointed_store, write_pointer

    store = make(tmp_path / "data/latents/abc")
    record = write_pointer(tmp_path / "data/latents.json", store.path)
    assert record["store"] == "latents/abc" and record["num_items"] == 10
    assert record["digest"] == digest(store.attrs) and record["signature"] == {"v": 1}
    first = (tmp_path / "data/latents.json").read_bytes()
    write_pointer(tmp_path / "data/latents.json", store.path)  # the same store: the same bytes
    assert (tmp_path / "data/latents.json").read_bytes() == first
    moved = tmp_path / "elsewhere"
    (tmp_path / "data").rename(moved)  # the pair moves together
    assert pointed_store(moved / "latents.json") == moved / "latents/abc"
    assert pointed_store(moved / "latents/abc") == moved / "latents/abc"  # a store names itself


def test_a_missing_pointer_or_store_is_named(tmp_path):
    from sra2.data.store import pointed_store

    with pytest.raises(FileNotFoundError, match="latents.json.*encode stage"):
        pointed_store(tmp_path / "latents.json")
    (tmp_path / "latents.json").write_text('{"store": "latents/gone"}')
    with pytest.raises(FileNotFoundError, match="latents/gone"):
        pointed_store(tmp_path / "latents.json")
    (tmp_path / "latents.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a latent store pointer"):
        pointed_store(tmp_path / "latents.json")


# --- checks: every stored byte is verified, damage is named and repaired by a rerun

def written(path, shards=(0, 1, 2)):
    """A store with ``shards`` written from seeded values; returns it and those values."""
    store = make(path)
    values = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    for s in shards:
        store.write_shard(s, {"x": values[slice(*store.shard_range(s))]}, {})
    return store, values


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def flip_bytes(path, at=-30, count=4):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_bytes_fail_the_read_naming_store_array_shard_and_file(tmp_path):
    store, _ = written(tmp_path / "s")
    chunk = store.shard_files(1)["x"]
    flip_bytes(chunk, at=10)  # inside the first chunk's compressed bytes, not the index
    again = ShardedStore(tmp_path / "s")  # a stat finds nothing: the size is the same
    np.testing.assert_array_equal(again.array("x")[:4].shape, (4, 3))  # other shards still read
    with pytest.raises(DamagedStore) as e:
        again.array("x")[np.array([1, 5, 9])]
    message = str(e.value)
    assert f"{tmp_path / 's'}: reading 'x'" in message and "shard 1" in message
    assert str(chunk) in message and "checksum" in message and "--repair" in message


def test_a_deleted_or_resized_chunk_file_is_found_at_open_without_reading(tmp_path):
    store, _ = written(tmp_path / "s")
    gone = store.shard_files(2)["x"]
    gone.unlink()
    with pytest.raises(DamagedStore, match=rf"shard 2: {gone}: missing"):
        ShardedStore(tmp_path / "s")
    store, _ = written(tmp_path / "t")
    cut = store.shard_files(0)["x"]
    cut.write_bytes(cut.read_bytes()[:-5])
    with pytest.raises(DamagedStore, match=r"shard 0: .*x/c/0/0: \d+ bytes where its done mark"):
        ShardedStore(tmp_path / "t")


def test_a_rerun_quarantines_damaged_shards_and_ends_with_the_undisturbed_bytes(tmp_path, capsys):
    _, values = written(tmp_path / "ref")
    reference = snapshot(tmp_path / "ref")
    store, _ = written(tmp_path / "s")
    flip_bytes(store.shard_files(1)["x"], at=10)
    store.shard_files(2)["x"].unlink()
    (tmp_path / "s" / "done" / "shard-000000.json").write_text("{cut")
    again = make(tmp_path / "s")  # what a stage does when it starts
    assert again.pending_shards() == [0, 1, 2]
    log = capsys.readouterr().out
    assert "moved 3 damaged shard(s) [0, 1, 2]" in log and "differs" in log and "missing" in log
    kept = list((tmp_path / QUARANTINE / "s").glob("*/x/c/1/0"))
    assert len(kept) == 1  # the damaged bytes are kept for inspection, out of the store
    for s in again.pending_shards():
        again.write_shard(s, {"x": values[slice(*again.shard_range(s))]}, {})
    assert snapshot(tmp_path / "s") == reference


def test_a_shard_of_zeros_has_a_file_too(tmp_path):
    store = make(tmp_path / "s")
    store.write_shard(0, {"x": np.zeros((4, 3), np.float32)}, {})
    assert store.shard_files(0)["x"].is_file()
    store.shard_files(0)["x"].unlink()
    with pytest.raises(DamagedStore, match="missing"):
        ShardedStore(tmp_path / "s")


def test_verify_reports_clean_and_damaged_and_repairs(tmp_path, capsys):
    from sra2.tools import verify

    written(tmp_path / "stores" / "a")
    store, _ = written(tmp_path / "stores" / "b")
    assert verify.main([str(tmp_path / "stores")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'stores' / 'a'}: 3 of 3 shards done" in out and out.count(": clean\n") == 2
    chunk = store.shard_files(1)["x"]
    flip_bytes(chunk, at=10)
    assert verify.main([str(tmp_path / "stores")]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED shard 1: {chunk}: its CRC32C differs" in out and "1 damaged file(s)" in out
    assert verify.main([str(tmp_path / "stores"), "--repair"]) == 0
    assert ShardedStore(store.path).pending_shards() == [1]
    assert verify.main([str(tmp_path / "stores")]) == 0


def test_a_full_disk_while_writing_a_shard_names_its_file_and_loses_nothing(tmp_path, monkeypatch):
    import errno

    import zarr

    store, values = written(tmp_path / "s", shards=(0,))
    before = snapshot(tmp_path / "s")

    def full(self, selection, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(zarr.Array, "__setitem__", full)
        with pytest.raises(OSError) as e:
            store.write_shard(1, {"x": values[4:8]}, {})
    assert str(e.value) == (f"no space left on device writing {store.shard_files(1)['x']}; "
                            "free space and rerun: nothing was lost")
    assert snapshot(tmp_path / "s") == before and make(tmp_path / "s").pending_shards() == [1, 2]
    store.write_shard(1, {"x": values[4:8]}, {})  # space is back: the rerun writes it
    assert make(tmp_path / "s").pending_shards() == [2]


def test_a_file_where_the_store_or_its_folder_should_be_is_named(tmp_path):
    (tmp_path / "latents").write_text("")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'latents'} exists and is not a folder"):
        make(tmp_path / "latents" / "abc")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'latents'} exists and is not a folder"):
        make(tmp_path / "latents")
