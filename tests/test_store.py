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
    assert again.records() == [{"shard": 2, "note": "last"}]
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
