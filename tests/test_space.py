"""The preflight: each stage knows the bytes it is about to write and refuses, before any heavy
work, when their file system cannot hold them; a rerun with room completes."""

import contextlib
import shutil
import subprocess

import pytest
from test_store import snapshot

from sra2.data import space
from sra2.data.encode import encode_dataset, latent_arrays
from sra2.data.store import ShardedStore

from conftest import encoded_tiny


@contextlib.contextmanager
def small_disk(folder, megabytes: int):
    """A tmpfs of ``megabytes`` at ``folder`` (needs root; skipped where mounting is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def grow(folder, megabytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(folder)], check=True)


def test_encode_refuses_a_disk_too_small_naming_it_and_a_rerun_with_room_ends_as_one_run(
        tmp_path, one_thread):
    cfg, reference = encoded_tiny(tmp_path / "reference")
    with small_disk(tmp_path / "small", 16) as small:
        with pytest.raises(space.NoSpace) as refused:
            encode_dataset(cfg, small / "latents")
        line = str(refused.value)
        assert len(line.splitlines()) == 1
        assert f"not enough disk in {small}: needs" in line and "MiB free" in line
        assert "encode.dtype: float16" in line  # what to do besides freeing space
        assert ShardedStore(small / "latents").done_shards() == set()  # before any encoding
        grow(small, 256)
        encode_dataset(cfg, small / "latents")
        assert snapshot(small / "latents") == snapshot(reference)


def test_the_check_is_the_bytes_needed_plus_the_margin_against_the_bytes_free(tmp_path):
    with small_disk(tmp_path / "small", 256) as small:
        free = shutil.disk_usage(small).free
        fits = space.Need(small / "a", "a", free - space.MARGIN_MIN, 0)
        assert space.shortfalls([fits]) == []
        # two folders on one file system add up, and the margin grows with the need
        halves = [space.Need(small / n, n, (free - space.MARGIN_MIN) // 2 + 1, 0) for n in "ab"]
        [line] = space.shortfalls(halves)
        assert f"{small / 'a'}, {small / 'b'}" in line
        assert space.shortfalls([space.Need(small, "x", free, 0)])  # no room for the margin


def test_a_resumed_store_counts_only_its_pending_shards(tmp_path, tiny):
    cfg, latents = encoded_tiny(tmp_path)
    store = ShardedStore(latents)
    shard = store.shard_files(1)
    actual = sum(p.stat().st_size for p in shard.values()) + store._mark(1).stat().st_size
    arrays = latent_arrays(cfg, space.latent_shape(cfg))
    [left] = space.encode_needs(cfg, arrays, latents, store.num_items, pending=[1])
    # shard 1's compression is estimated from shard 0's bytes (the same images' statistics)
    assert abs(left.end - actual) <= 0.05 * actual
    [whole] = space.encode_needs(cfg, arrays, latents, store.num_items)
    assert left.end < whole.end / 2
