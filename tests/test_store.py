import numpy as np
import pytest

from sra2.store import ShardedStore, StoreMismatch


def make(path, signature=None):
    return ShardedStore.open_or_create(path, 10, 4, 2, {"x": ((3,), "float32")},
                                       fixed={"labels": np.arange(10)}, signature=signature or {"v": 1})


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
    from sra2.store import digest, pointed_store, write_pointer

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
    from sra2.store import pointed_store

    with pytest.raises(FileNotFoundError, match="latents.json.*encode stage"):
        pointed_store(tmp_path / "latents.json")
    (tmp_path / "latents.json").write_text('{"store": "latents/gone"}')
    with pytest.raises(FileNotFoundError, match="latents/gone"):
        pointed_store(tmp_path / "latents.json")
    (tmp_path / "latents.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a latent store pointer"):
        pointed_store(tmp_path / "latents.json")
