import numpy as np
import torch

from sra2.model import vae as vae_lib

from conftest import with_overrides


def test_random_vae_is_seeded_and_loads_back_from_a_local_directory(tmp_path, tiny):
    a, b = vae_lib.load_vae(tiny.vae), vae_lib.load_vae(tiny.vae)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    a.save_pretrained(tmp_path / "vae")  # the layout of a downloaded stabilityai/sd-vae-ft-ema
    local = vae_lib.load_vae(with_overrides(tiny, vae={"source": str(tmp_path / "vae"),
                                                       "random": None}).vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for got, want in zip(vae_lib.encode(local, x), vae_lib.encode(a, x)):
        torch.testing.assert_close(got, want)
    assert vae_lib.downsampling(local) == 8


def test_decode_gives_adm_uint8_images(tiny):
    vae = vae_lib.load_vae(tiny.vae)
    images = vae_lib.decode(vae, torch.randn(3, 4, 4, 4), tiny.vae.scale)
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    x = vae.decode(torch.randn(1, 4, 4, 4,
                               generator=torch.Generator().manual_seed(0)) / tiny.vae.scale).sample
    want = np.clip(127.5 * x.detach().numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    got = vae_lib.decode(vae, torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
                         tiny.vae.scale)
    np.testing.assert_array_equal(got.numpy(), want)
