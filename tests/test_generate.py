import numpy as np
import torch
from PIL import Image

from sra2.generate import generate, read_npz_images, write_grid, write_npz
from sra2.models import build
from sra2.store import ShardedStore

from conftest import randomize, with_overrides


def export_random_sit(path, cfg, seed=0):
    model = build(cfg.model.name, input_size=4, num_classes=cfg.model.num_classes, learn_sigma=False)
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
