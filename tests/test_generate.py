from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sra2.data.store import ShardedStore
from sra2.model.sit import build
from sra2.sample.generate import generate, sample_labels, sample_stage, signature
from sra2.sample.outputs import npz_damage, read_npz_images, write_grid, write_npz

from conftest import randomize, with_overrides


def export_random_sit(path, cfg, seed=0):
    model = build(cfg.model.name, input_size=4, num_classes=cfg.model.num_classes,
                  learn_sigma=False)
    randomize(model, seed, std=0.05)  # a non-trivial velocity field (a fresh SiT outputs zero)
    torch.save({"name": cfg.model.name, "ema": model.state_dict()}, path)
    return path


def test_samples_do_not_depend_on_batch_size_and_assemble_to_an_adm_npz(tmp_path, tiny):
    ema = export_random_sit(tmp_path / "ema.pt", tiny)
    cfg = with_overrides(tiny, sample={"num_samples": 6, "shard_size": 4, "steps": 8})
    a = ShardedStore(generate(with_overrides(cfg, sample={"batch_size": 4}), ema, tmp_path / "a"))
    b = ShardedStore(generate(with_overrides(cfg, sample={"batch_size": 3}), ema, tmp_path / "b"))
    images = a.array("images")[:]
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(images, b.array("images")[:])
    assert len(np.unique(images.reshape(6, -1), axis=0)) == 6  # every sample has its own noise
    write_npz(a, tmp_path / "samples.npz")
    with np.load(tmp_path / "samples.npz") as npz:
        assert list(npz.keys()) == ["arr_0"]
        np.testing.assert_array_equal(npz["arr_0"], images)
    np.testing.assert_array_equal(read_npz_images(tmp_path / "samples.npz"), images)


def test_sets_of_other_seeds_follow_the_first_set_which_is_the_one_set_run(tmp_path, tiny):
    """sample.seeds = 3: 3 x num_samples images; the first set is a one-set run's images and labels
    (and its folder: one set keeps the signature of runs made before sets), the others differ."""
    ema = export_random_sit(tmp_path / "ema.pt", tiny)
    # shards of 3: every set is drawn in batches of the one-set run's (another batch size may
    # round the network's sums otherwise, a grey level here and there)
    one = with_overrides(tiny, sample={"num_samples": 3, "shard_size": 3, "steps": 4})
    three = with_overrides(one, sample={"seeds": 3})
    assert signature(one, "x") == signature(with_overrides(one, sample={"seeds": 1}), "x")
    assert "seeds" not in signature(one, "x")["sample"] and signature(three, "x") != \
        signature(one, "x")
    a, b = (ShardedStore(generate(c, ema, tmp_path / n)) for c, n in ((one, "one"),
                                                                       (three, "three")))
    first, every = a.array("images")[:], b.array("images")[:]
    assert every.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(every[:3], first)
    np.testing.assert_array_equal(b.array("labels")[:3], a.array("labels")[:])
    assert not np.array_equal(every[3:6], first) and not np.array_equal(every[6:], every[3:6])


def test_new_weights_sample_beside_the_old_samples(tmp_path, tiny):
    cfg = with_overrides(tiny, sample={"num_samples": 2, "steps": 4})
    first = generate(cfg, export_random_sit(tmp_path / "a.pt", tiny, seed=0), tmp_path / "shards")
    second = generate(cfg, export_random_sit(tmp_path / "b.pt", tiny, seed=1), tmp_path / "shards")
    assert first != second and ShardedStore(first).complete and ShardedStore(second).complete


def test_grid_is_a_png_with_its_caption(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    write_grid(images, tmp_path / "grid.png", caption="random weights")
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.size == (48, 2 * 16 + 14)


def test_uniform_labels_are_the_seeded_draws_stores_were_made_with():
    expected = np.random.default_rng([7, 50]).integers(0, 10, 50, dtype=np.int64)
    np.testing.assert_array_equal(sample_labels(7, 50, 10, "uniform"), expected)
    np.testing.assert_array_equal(sample_labels(7, 50, 10), expected)


def test_balanced_labels_hold_n_over_classes_of_each_in_a_seeded_order():
    labels = sample_labels(0, 50_000, 1000, "balanced")
    assert labels.dtype == np.int64 and (np.bincount(labels, minlength=1000) == 50).all()
    # shuffled: ADM's Inception Score splits (contiguous 5000) each see most classes, not 100
    assert len(np.unique(labels[:5000])) > 900
    np.testing.assert_array_equal(labels, sample_labels(0, 50_000, 1000, "balanced"))
    assert not np.array_equal(labels, sample_labels(1, 50_000, 1000, "balanced"))
    # 2500 over 1000 classes: 2 of each, and 3 of 500 distinct classes
    counts = np.bincount(sample_labels(0, 2500, 1000, "balanced"), minlength=1000)
    assert set(counts) == {2, 3} and (counts == 3).sum() == 500
    # fewer than the classes
    counts = np.bincount(sample_labels(0, 7, 10, "balanced"), minlength=10)
    assert set(counts) == {0, 1} and counts.sum() == 7


def test_unknown_label_kind_is_refused():
    with pytest.raises(ValueError, match="sample.labels"):
        sample_labels(0, 10, 10, "sorted")


def test_the_sample_stage_stores_its_images_once_and_links_them_again_on_a_rerun(tmp_path, tiny):
    """The shards are assembled into one .npz in their folder and removed; the stage's
    samples.npz is that file. A rerun finds it intact and draws nothing; a damaged one is moved
    aside and the samples drawn again, to the same bytes."""
    ema = export_random_sit(tmp_path / "ema.pt", tiny)
    cfg = with_overrides(tiny, sample={"num_samples": 5, "shard_size": 2, "steps": 4, "grid": 4})
    out = tmp_path / "samples"
    first = sample_stage(cfg, ema, out)
    kept, npz = Path(first["kept"]), out / "samples.npz"
    assert sorted(p.name for p in kept.parent.iterdir()) == ["samples.npz"]
    assert npz.stat().st_ino == kept.stat().st_ino and npz.stat().st_nlink == 2
    images = np.array(read_npz_images(npz))
    assert images.shape == (5, 32, 32, 3) and npz_damage(npz) is None

    npz.unlink()  # as DVC does before it reruns the stage
    (out / "grid.png").unlink()
    calls = []
    sample_stage(cfg, ema, out, lambda done, todo: calls.append((done, todo)))
    assert calls == [(0, 0)] and npz.stat().st_ino == kept.stat().st_ino
    assert (out / "grid.png").is_file()

    data = bytearray(kept.read_bytes())
    data[-200] ^= 0xFF  # a pixel of the last image: the zip still opens
    kept.chmod(0o644)
    kept.write_bytes(bytes(data))
    assert "CRC32" in npz_damage(npz)
    calls.clear()
    sample_stage(cfg, ema, out, lambda done, todo: calls.append((done, todo)))
    assert calls[-1] == (5, 5)
    np.testing.assert_array_equal(read_npz_images(npz), images)
    [moved] = (out / "shards" / ".quarantine").rglob("samples.npz")
    assert npz_damage(moved) is not None
