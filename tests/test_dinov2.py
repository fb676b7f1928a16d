"""REPA's target encoder: REPA's preprocessing, DINOv2's forward on weights in the original
checkpoint format, the patch tokens' shape, and no gradients into the encoder."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sra2.config.params import Repa
from sra2.data.images import center_crop_arr
from sra2.model import dinov2

SEED = 3


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photographs, ADM-cropped to 256 px: uint8 (2, 256, 256, 3)."""
    from skimage import data

    return torch.from_numpy(np.stack([center_crop_arr(Image.fromarray(im), 256)
                                      for im in (data.astronaut(), data.chelsea())]))


@pytest.fixture(scope="module")
def encoder():
    return dinov2.load_encoder(Repa(encoder="random", encoder_seed=SEED))


def test_preprocessing_is_repas_formula(photos):
    """/ 255, ImageNet mean and std, then bicubic resize to 224, in float32: the same operations
    on the same float32 values, so the same bits."""
    x = photos.numpy().astype(np.float32) / np.float32(255)
    x = (x - np.array(dinov2.MEAN, np.float32)) / np.array(dinov2.STD, np.float32)
    expected = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=(224, 224),
                             mode="bicubic", align_corners=False)
    got = dinov2.preprocess(photos)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 224, 224)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="uint8"):
        dinov2.preprocess(photos.permute(0, 3, 1, 2))  # channels first is refused, not misread


def reference_tokens(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's forward written out from its original parameter names, with REPA's position
    embedding: the 37 x 37 grid resampled once to 16 x 16 (bicubic, antialiased)."""
    dim, heads = dinov2.DIM, 12
    grid = weights["pos_embed"][:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    pos = torch.cat([weights["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, dim)], 1)
    t = F.conv2d(x, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=14)
    t = torch.cat([weights["cls_token"].expand(len(x), 1, dim), t.flatten(2).transpose(1, 2)], 1)
    t = t + pos

    def norm(h, name):
        return F.layer_norm(h, (dim,), weights[f"{name}.weight"], weights[f"{name}.bias"], eps=1e-6)

    def linear(h, name):
        return F.linear(h, weights[f"{name}.weight"], weights[f"{name}.bias"])

    n, tokens = t.shape[:2]
    for i in range(12):
        b = f"blocks.{i}."
        q, k, v = linear(norm(t, b + "norm1"), b + "attn.qkv").reshape(
            n, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(n, tokens, dim)
        t = t + weights[b + "ls1.gamma"] * linear(mixed, b + "attn.proj")
        h = linear(F.gelu(linear(norm(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
        t = t + weights[b + "ls2.gamma"] * h
    return norm(t, "norm")[:, 1:]


def test_a_weights_file_gives_dinov2s_patch_tokens(tmp_path, photos, encoder):
    """Seeded weights saved as an original DINOv2 checkpoint and loaded from the file give the
    tokens of the same weights drawn directly, and those of DINOv2's forward written out here."""
    weights = dinov2.random_weights(SEED)
    torch.save(weights, tmp_path / "dinov2_vitb14_pretrain.pth")
    from_file = dinov2.load_encoder(Repa(encoder=str(tmp_path / "dinov2_vitb14_pretrain.pth")))
    astronaut = photos[:1]
    tokens = dinov2.features(encoder, astronaut)
    assert torch.equal(dinov2.features(from_file, astronaut), tokens)
    with torch.no_grad():
        expected = reference_tokens(weights, dinov2.preprocess(astronaut))
    # the same float32 operations summed in other orders (fused attention, other matmul blocking):
    # a dot product of n <= 3072 terms moves by ~sqrt(n) * 2^-24 ~ 3e-6 of its scale per layer;
    # through 12 residual blocks and a final LayerNorm (unit-scale tokens), 1e-4 leaves room
    # (measured: 2.7e-6)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)


def test_tokens_shape_and_no_gradient_into_the_encoder(photos, encoder):
    tokens = dinov2.features(encoder, photos)
    assert tokens.shape == (2, dinov2.TOKENS, dinov2.DIM) and tokens.dtype == torch.float32
    assert not tokens.requires_grad and not any(p.requires_grad for p in encoder.parameters())
    projection = torch.ones(dinov2.DIM, requires_grad=True)
    (tokens * projection).sum().backward()
    assert projection.grad is not None and all(p.grad is None for p in encoder.parameters())
    # any image size is resized to the encoder's 224 px: 32 px images give 256 tokens too
    small = photos[:, ::8, ::8].contiguous()
    assert dinov2.features(encoder, small).shape == (2, dinov2.TOKENS, dinov2.DIM)


def test_a_smaller_grid_gives_one_token_per_sit_token(photos):
    """The tiny preset's SiT-Micro/2 on 4 x 4 latents has 2 x 2 tokens: 28 px inputs, 4 tokens."""
    encoder = dinov2.load_encoder(Repa(encoder="random", encoder_seed=SEED), grid=2)
    assert (tuple(encoder.patch_embed.img_size) == (28, 28)
            and encoder.pos_embed.shape == (1, 5, 768))
    assert dinov2.features(encoder, photos).shape == (2, 4, dinov2.DIM)


@pytest.mark.parametrize("grid", [16, 2])
def test_forward_flops_are_the_vits_multiply_adds(grid):
    """Per block and token: qkv, proj, fc1, fc2 (768 x 9216 multiply-adds); per block: q k^T and
    attention @ v over the patches and the class token; once: the 14 x 14 x 3 patch projection."""
    patches, dim = grid * grid, dinov2.DIM
    tokens = patches + 1
    macs = 12 * (tokens * dim * 9216 + 2 * tokens * tokens * dim) + patches * 588 * dim
    assert dinov2.forward_flops(grid) == 2 * macs  # grid 16: ~46.3 GFLOPs


def test_unknown_weights_are_named():
    with pytest.raises(FileNotFoundError, match="repa.encoder"):
        dinov2.load_encoder(Repa(encoder="/nowhere/dinov2.pth"))


def test_under_autocast_the_blocks_run_in_bf16_and_the_tokens_stay_float32(photos):
    """The path a GPU takes (sra2.runtime.dist.autocast is bf16 there), taken on the CPU as the
    smoke run of bench/gpu.py does: the blocks' matmuls in bf16, the normalisation before them and
    the tokens after in float32."""
    from unittest import mock

    from sra2.runtime import dist

    encoder = dinov2.load_encoder(Repa(encoder="random", encoder_seed=SEED), grid=2)
    seen = {}
    encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].dtype))
    encoder.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: seen.update(block=out.dtype))
    exact = dinov2.features(encoder, photos)
    assert seen == {"input": torch.float32, "block": torch.float32}
    cpu_bf16 = lambda device, precision: torch.autocast(device.type, torch.bfloat16)  # noqa: E731
    with mock.patch.object(dist, "autocast", cpu_bf16):
        tokens = dinov2.features(encoder, photos)
    assert seen == {"input": torch.float32, "block": torch.bfloat16}
    assert tokens.dtype == torch.float32 and tokens.shape == exact.shape
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation): through 12 blocks the
    # unit-scale tokens move by a few percent, their direction by far less
    assert F.cosine_similarity(tokens, exact, dim=-1).min() > 0.99
