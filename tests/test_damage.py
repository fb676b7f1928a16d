"""Damaged stage outputs: changed bytes fail the read that meets them, naming the file; rerunning
the stage that wrote them moves the damaged shard aside, computes it again and ends with the bytes
of an undisturbed run."""

import shutil

import pytest
from test_generate import export_random_sit
from test_store import flip_bytes, snapshot

from sra2.data import latent_copy
from sra2.data.encode import encode_dataset
from sra2.data.store import DamagedStore, ShardedStore
from sra2.sample.generate import generate
from sra2.sample.outputs import write_npz

from conftest import encoded_tiny, with_overrides


def test_a_changed_latent_chunk_fails_training_and_an_encode_rerun_repairs_it(tmp_path, one_thread):
    cfg, latents = encoded_tiny(tmp_path)
    shutil.copytree(latents, tmp_path / "reference")
    changed = ShardedStore(latents).shard_files(1)["mean"]
    flip_bytes(changed, at=10)
    with pytest.raises(DamagedStore, match=rf"reading 'mean': shard 1: {changed}: .*checksum"):
        latent_copy.ensure(latents, str(tmp_path / "copies"))
    encode_dataset(cfg, latents)
    assert snapshot(latents) == snapshot(tmp_path / "reference")
    assert (tmp_path / ".quarantine" / "latents").is_dir()
    assert latent_copy.ensure(latents, str(tmp_path / "copies")) is not None


def test_a_changed_sample_chunk_fails_the_npz_and_a_sample_rerun_repairs_it(tmp_path, tiny):
    cfg = with_overrides(tiny, sample={"num_samples": 6, "shard_size": 2, "steps": 4})
    ema = export_random_sit(tmp_path / "ema.pt", tiny)
    path = generate(cfg, ema, tmp_path / "shards")
    reference = snapshot(path)
    store = ShardedStore(path)
    changed, deleted = store.shard_files(1)["images"], store.shard_files(2)["images"]
    flip_bytes(changed, at=10)
    with pytest.raises(DamagedStore, match=rf"reading 'images': shard 1: {changed}"):
        write_npz(store, tmp_path / "samples.npz")
    assert not (tmp_path / "samples.npz").exists()
    deleted.unlink()
    with pytest.raises(DamagedStore, match=rf"shard 2: {deleted}: missing"):
        ShardedStore(path)
    assert generate(cfg, ema, tmp_path / "shards") == path
    assert snapshot(path) == reference
