from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sra2.data.captions import Captioned, listing
from sra2.data.demo import write_demo_dataset
from sra2.data.encode import encode_dataset, settings_store
from sra2.data.images import BadImage, list_images, load_cropped
from sra2.data.store import ShardedStore
from sra2.model import vae as vae_lib

from conftest import jpeg_bytes, with_overrides, write_folder


@pytest.fixture
def awkward(tmp_path, photo):
    """Real photographs, some in awkward encodings, and three files that cannot be decoded."""
    crops = [photo[:300, :200], photo[100:, 50:], photo[::3, ::2], photo[200:400, 100:500]]
    files = {f"a/{i}.JPEG": jpeg_bytes(c) for i, c in enumerate(crops)}
    files["b/cmyk.JPEG"] = jpeg_bytes(crops[0], "CMYK")
    files["b/gray.JPEG"] = jpeg_bytes(crops[1], "L")
    files["b/truncated.JPEG"] = jpeg_bytes(crops[2])[:400]
    files["c/empty.JPEG"] = b""
    files["c/text.JPEG"] = b"hello, not a JPEG"
    root = write_folder(tmp_path / "images", files)
    Image.fromarray(crops[3]).save(root / "c" / "png.JPEG", format="PNG")
    return root


def test_encode_counts_rejects_and_matches_the_vae(tmp_path, tiny, awkward):
    cfg = with_overrides(tiny, data={"root": str(awkward), "demo": None})
    out = tmp_path / "latents"
    summary = encode_dataset(cfg, out)
    assert summary["files"] == 10 and summary["encoded"] == 7 and summary["rejected"] == 3
    assert summary["encoded"] + summary["rejected"] == summary["files"]
    reasons = {r["file"]: r["reason"] for r in summary["rejects"]}
    assert set(reasons) == {"b/truncated.JPEG", "c/empty.JPEG", "c/text.JPEG"}
    assert reasons["c/empty.JPEG"] == "empty file"

    store = ShardedStore(out)
    files = list(store.array("files")[:])
    i = files.index("b/cmyk.JPEG")
    pixels = torch.from_numpy(load_cropped(awkward / files[i], 32).copy()).permute(2, 0, 1)[None]
    mean, std = vae_lib.encode(vae_lib.load_vae(cfg.vae), pixels.float() / 127.5 - 1)
    np.testing.assert_allclose(store.array("mean")[i], mean[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.array("std")[i], std[0].numpy(), rtol=1e-4, atol=1e-5)
    assert store.array("labels")[i] == 1 and store.array("mean").shape == (10, 4, 4, 4)


def test_rerun_skips_finished_work_and_keeps_the_bytes(tmp_path, tiny, awkward):
    cfg = with_overrides(tiny, data={"root": str(awkward), "demo": None})
    encode_dataset(cfg, tmp_path / "latents")
    before = {p: p.read_bytes() for p in (tmp_path / "latents").rglob("*") if p.is_file()}
    again = encode_dataset(cfg, tmp_path / "latents")
    after = {p: p.read_bytes() for p in (tmp_path / "latents").rglob("*") if p.is_file()}
    assert again["complete"] and again["images_per_s"] == 0.0 and before == after


def test_strict_mode_names_the_bad_file(tmp_path, tiny, awkward):
    cfg = with_overrides(tiny, data={"root": str(awkward), "demo": None}, encode={"strict": True})
    with pytest.raises(BadImage, match="truncated.JPEG"):
        encode_dataset(cfg, tmp_path / "latents")


def test_flip_option_stores_the_mirrored_images_latents(tmp_path, tiny, awkward):
    cfg = with_overrides(tiny, data={"root": str(awkward), "demo": None}, encode={"flip": True})
    encode_dataset(cfg, tmp_path / "latents")
    store = ShardedStore(tmp_path / "latents")
    pixels = torch.from_numpy(load_cropped(awkward / "a/0.JPEG", 32).copy()).permute(2, 0, 1)[None]
    mean, _ = vae_lib.encode(vae_lib.load_vae(cfg.vae), (pixels.float() / 127.5 - 1).flip(3))
    np.testing.assert_allclose(store.array("mean_flip")[0], mean[0].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(store.array("mean_flip")[0], store.array("mean")[0])


def test_each_setting_gets_its_own_store_and_going_back_reuses_it(tmp_path, tiny, awkward):
    cfg = with_overrides(tiny, data={"root": str(awkward), "demo": None})
    first = encode_dataset(cfg, tmp_path / "latents", per_settings=True)
    store = Path(first["store"])
    assert store == settings_store(cfg, tmp_path / "latents", listing(cfg))
    assert store.parent == tmp_path / "latents" and first["encoded_now"] == 10
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file()}

    # another dtype: a store of its own beside the first (no StoreMismatch)
    half = encode_dataset(with_overrides(cfg, encode={"dtype": "float16"}), tmp_path / "latents",
                          per_settings=True)
    assert Path(half["store"]).parent == store.parent and half["store"] != first["store"]
    assert (half["encoded_now"] == 10
            and ShardedStore(half["store"]).array("mean").dtype == np.float16)
    # back to the first settings (and a batch size, which does not change the bytes): the first
    # store, finished, untouched
    again = encode_dataset(with_overrides(cfg, encode={"batch_size": 2}), tmp_path / "latents",
                           per_settings=True)
    assert again["store"] == first["store"] and again["encoded_now"] == 0 and again["complete"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes())
            for p in store.rglob("*") if p.is_file()} == files
    assert {p.name for p in store.parent.iterdir()} == {store.name, Path(half["store"]).name}


def test_other_drawn_images_or_vae_weights_name_another_store(tmp_path, tiny):
    """Same file names, other pixels (another demo seed) or a retrained VAE at the same path:
    another store, never the old latents."""
    from sra2.data.encode import _signature

    d = tiny.data.demo
    write_demo_dataset(tmp_path / "images", d.classes, d.per_class, d.min_side, d.max_side, d.seed)
    images = Captioned(list_images(tmp_path / "images"), None)
    other_seed = with_overrides(tiny, data={"demo": {**d.model_dump(), "seed": 1}})
    assert _signature(tiny, images) != _signature(other_seed, images)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights 1")
    local = with_overrides(tiny, vae={"source": str(folder)})
    before = _signature(local, images)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights 2")
    assert _signature(local, images) != before


def test_pixels_store_the_crops_the_vae_saw_and_reach_the_batches(tmp_path):
    """encode.pixels: the ADM crops of the demo JPEGs, bit for bit, in the store beside the
    latents (sharded and chunked as they are), and in REPA's batches through the node-local copy."""
    from sra2.data.latents import batch_indices, open_batches

    from conftest import encoded_tiny

    cfg, latents = encoded_tiny(tmp_path, encode={"pixels": True})
    store = ShardedStore(latents)
    files = store.array("files")[:]
    crops = np.stack([load_cropped(Path(cfg.data.root) / f, cfg.data.image_size) for f in files])
    images, mean = store.array("images"), store.array("mean")
    assert images.dtype == np.uint8 and images.shape == (len(files), 32, 32, 3)
    z = store.group
    assert ((z["images"].chunks[0], z["images"].shards[0])
            == (z["mean"].chunks[0], z["mean"].shards[0]))
    np.testing.assert_array_equal(images[:], crops)

    repa = with_overrides(cfg, repa={"enabled": True}, train={"copy_dir": str(tmp_path / "copies")})
    batches = open_batches(repa, latents, log=lambda _: None, images_for=["repa.enabled"])
    assert batches.files is not None and "images" in batches.files  # read from the copy
    for step in (0, 3):
        batch, rows = batches[step], batch_indices(step, 8, len(files), cfg.train.seed)
        assert batch["images"].dtype == torch.uint8
        np.testing.assert_array_equal(batch["images"].numpy(), crops[rows])
        np.testing.assert_array_equal(batch["mean"].numpy(), mean[:][rows])


def test_pixels_name_a_store_only_when_on(tiny):
    """Stores encoded before encode.pixels existed keep their folder names."""
    from types import SimpleNamespace

    from sra2.data.encode import _signature

    images = Captioned(SimpleNamespace(files=["a/1.JPEG"], labels=[0]), None)
    off = _signature(tiny, images)
    assert "pixels" not in off
    assert (_signature(with_overrides(tiny, encode={"pixels": True}), images)
            == {**off, "pixels": True})
