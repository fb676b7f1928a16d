"""The demo's VAE: trained on the demo images, saved in diffusers' layout, loaded by load_vae."""

import json

import numpy as np
import pytest
import torch

from sra2.config.params import DemoVAE
from sra2.data import demo
from sra2.data.images import load_crops
from sra2.model import vae as vae_lib

from conftest import with_overrides

KNOBS = DemoVAE(steps=25, batch_size=4, crop=16, whole_steps=5, lr=2e-3, kl_weight=1e-4)


def knobs(**changes) -> DemoVAE:
    """KNOBS with some values changed, validated again."""
    return DemoVAE(**{**KNOBS.model_dump(), **changes})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 demo images (3 classes), 32 px: the tiny preset's VAE makes 4x4 latents of them."""
    root = tmp_path_factory.mktemp("demo") / "train"
    demo.write_demo_dataset(root, classes=3, per_class=4, min_side=40, max_side=100, seed=0)
    return load_crops(root, 32)


def test_training_lowers_the_reconstruction_error(images, tiny):
    before = demo.latent_statistics(vae_lib.load_vae(tiny.vae), images)
    after = demo.latent_statistics(demo.train_demo_vae(images, tiny.vae, KNOBS), images)
    assert after["l1_grey_levels"] < 0.9 * before["l1_grey_levels"], (before, after)
    assert after["latent_std"] > 0 and after["posterior_std"] > 0
    assert after["suggested_scale"] == pytest.approx(1 / after["latent_std"])


def test_training_is_deterministic(images, tiny):
    a, b = (demo.train_demo_vae(images, tiny.vae, knobs(steps=3, whole_steps=1))
            for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    other_seed = with_overrides(tiny, vae={"random": {**tiny.vae.random.model_dump(), "seed": 1}})
    c = demo.train_demo_vae(images, other_seed.vae, knobs(steps=3, whole_steps=1))
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)


def test_saved_vae_loads_back_through_load_vae_with_identical_outputs(images, tiny, tmp_path):
    trained = demo.train_demo_vae(images, tiny.vae, knobs(steps=3, whole_steps=1))
    folder = tmp_path / "demo" / "vae"
    demo.save_trained_vae(trained, folder, 0.25, {"description": "VAE trained 3 steps"})
    cfg = with_overrides(tiny, vae={"source": str(folder), "random": None}).vae
    loaded = vae_lib.load_vae(cfg)
    x = torch.from_numpy(images[:4].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    for got, want in zip(vae_lib.encode(loaded, x), vae_lib.encode(trained, x)):
        assert torch.equal(got, want)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae_lib.decode(loaded, z, 0.25), vae_lib.decode(trained, z, 0.25))
    assert loaded.config.scaling_factor == 0.25
    assert vae_lib.describe(cfg) == "VAE trained 3 steps"
    info = json.loads((folder / "training.json").read_text())
    assert info["description"] == "VAE trained 3 steps"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["vae"]  # no temporary left


def test_a_crop_off_the_latent_grid_and_too_many_whole_steps_are_refused(images, tiny):
    with pytest.raises(ValueError, match="data.demo.vae.crop"):
        demo.train_demo_vae(images, tiny.vae, knobs(crop=12))
    with pytest.raises(ValueError, match="at most data.demo.vae.steps"):
        knobs(whole_steps=26)


def test_reconstruction_grid_puts_each_real_image_above_its_decoding(images, tiny):
    vae = vae_lib.load_vae(tiny.vae)
    grid = demo.reconstruction_grid(vae, images[:5], columns=4)
    assert grid.shape == (4 * 32, 4 * 32, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:32, 32:64], images[1])
    np.testing.assert_array_equal(grid[64:96, :32], images[4])
    x = torch.from_numpy(images[4:5].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    back = vae_lib.decode(vae, vae_lib.encode(vae, x)[0], 1.0)[0].numpy()
    np.testing.assert_array_equal(grid[96:, :32], back)
    assert (grid[64:, 32:] == 255).all()  # the short last row is white


def test_weights_digest_tells_a_retrained_vae_at_the_same_path(images, tiny, tmp_path):
    folder = tmp_path / "vae"
    cfg = with_overrides(tiny, vae={"source": str(folder), "random": None}).vae
    digests = []
    for steps in (1, 1, 2):
        trained = demo.train_demo_vae(images, tiny.vae, knobs(steps=steps, whole_steps=1))
        demo.save_trained_vae(trained, folder, 0.25, {"description": f"{steps} steps"})
        digests.append(vae_lib.weights_digest(cfg))
    assert digests[0] == digests[1] != digests[2]
    assert vae_lib.weights_digest(tiny.vae) is None
