"""SiT architecture: sizes, initialisation, the alignment hook, embeddings and checkpoint loading.

The reference numbers come from the DiT and SiT papers and the official code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sra2.config.params import Align
from sra2.methods.align import build_projector, projector_for
from sra2.model.networks import load_checkpoint
from sra2.model.sit import (
    ReversedTime,
    TimestepEmbedder,
    build,
    patchify,
    unpatchify,
)

from conftest import randomize


def align_cfg(**overrides) -> Align:
    base = dict(enabled=True, layer=2, depth=5, width=None, loss="smooth_l1", beta=0.05,
                weight=1.0, t_min=0.0, t_max=1.0, target="sample")
    return Align(**{**base, **overrides})


def count(module: nn.Module) -> int:
    # every parameter, the frozen pos_embed included, as the official code counts them
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, **kwargs):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build(name, **kwargs)


def inputs(n: int = 2, size: int = 32, num_classes: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name, millions", [("SiT-B/2", 130.5), ("SiT-L/2", 458.1),
                                            ("SiT-XL/2", 675.1)])
def test_parameter_counts_match_the_papers(name, millions):
    model = meta_model(name, input_size=32, num_classes=1000, learn_sigma=False)
    assert abs(count(model) / 1e6 - millions) <= 0.1


@pytest.mark.parametrize("name, depth, width, millions, tol", [
    ("SiT-B/2", 5, None, 8.29, 0.01),   # the paper's "5-layer MLP, 8M"
    ("SiT-B/2", 2, None, 1.21, 0.01),   # the paper's "2-layer MLP, 1M"
    ("SiT-XL/2", 5, None, 18.6, 0.05),  # the SRA 2 paper: 18.6M, ~4% of XL/2 forward FLOPs
])
def test_projector_parameter_counts(name, depth, width, millions, tol):
    model = meta_model(name, learn_sigma=False)
    with torch.device("meta"):
        projector = projector_for(model, align_cfg(depth=depth, width=width))
    assert abs(count(projector) / 1e6 - millions) <= tol
    # the same through the low-level builder: width 2*D, 16 = p*p*C outputs per token
    D = model.hidden_size
    with torch.device("meta"):
        direct = build_projector(D, 16, depth, 2 * D)
    assert count(direct) == count(projector)
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    assert (linears[0].in_features, linears[-1].out_features) == (D, 16)
    assert all(m.out_features == 2 * D for m in linears[:-1])
    assert sum(isinstance(m, nn.SiLU) for m in projector) == depth - 1


def test_projector_width_and_layer_are_configurable():
    model = meta_model("SiT-B/2", learn_sigma=False)
    with torch.device("meta"):
        narrow = projector_for(model, align_cfg(depth=3, width=256))
    assert count(narrow) == (768 * 256 + 256) + (256 * 256 + 256) + (256 * 16 + 16)


# ------------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("learn_sigma", [False, True])
def test_fresh_model_outputs_exactly_zero(learn_sigma):
    torch.manual_seed(0)
    model = build("SiT-Micro/2", learn_sigma=learn_sigma).eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    # the interpolant uses 4 channels whether or not the checkpoint learns sigma
    assert out.shape == (2, 4, 32, 32)
    assert torch.count_nonzero(out) == 0
    assert not model.pos_embed.requires_grad  # fixed sin-cos table, not trained


# ------------------------------------------------------------------------------ alignment hook

@pytest.mark.parametrize("k", [1, 2, 3])
def test_return_hidden_is_the_residual_stream_after_block_k(k):
    model = randomize(build("SiT-Micro/2", learn_sigma=False))
    x, t, y = inputs()
    with torch.no_grad():
        out, hidden = model(x, t, y, return_hidden=k)
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        before = h.clone()
        for block in model.blocks[:k]:
            h = block(h, c)
        plain = model(x, t, y)
    assert hidden.shape == (2, 256, model.hidden_size)  # 16x16 tokens for 32x32 latents, p=2
    torch.testing.assert_close(hidden, h, rtol=0, atol=0)
    # the blocks really do something (otherwise the check above would be vacuous)
    assert (hidden - before).abs().max() > 1e-2
    # asking for the hidden state does not change the prediction
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- embeddings

def hand_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT/SiT table written from the definition: token n = row*grid + col; with
    q = dim/4 and omega_j = 10000^(-j/q): [sin(col w), cos(col w), sin(row w), cos(row w)]."""
    q = dim // 4
    omega = 10000.0 ** (-np.arange(q) / q)
    table = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            table[row * grid + col] = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                                      np.sin(row * omega), np.cos(row * omega)])
    return table


def test_position_embedding_layout_matches_mae():
    model = build("SiT-Micro/2", input_size=32)  # D = 32, 16x16 grid
    pe = model.pos_embed.detach()[0].double().numpy()
    D, G = 32, 16
    assert pe.shape == (G * G, D)
    # a few entries by hand: token (row 0, col 1) is index 1, token (row 1, col 0) is index 16
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)      # column sin, lowest freq j=0
    assert pe[1, D // 4] == pytest.approx(math.cos(1.0), abs=1e-6)  # column cos
    assert pe[1, D // 2] == pytest.approx(0.0, abs=1e-6)            # row 0: sin(0)
    assert pe[1, 3 * D // 4] == pytest.approx(1.0, abs=1e-6)        # row 0: cos(0)
    assert pe[16, 0] == pytest.approx(0.0, abs=1e-6)                # col 0
    assert pe[16, D // 2] == pytest.approx(math.sin(1.0), abs=1e-6)  # row 1
    # token (row 3, col 5), frequency j = 2 of q = 8: omega = 10000^(-2/8) = 0.1
    n = 3 * G + 5
    assert pe[n, 2] == pytest.approx(math.sin(0.5), abs=1e-6)
    assert pe[n, D // 2 + 2] == pytest.approx(math.sin(0.3), abs=1e-6)
    np.testing.assert_allclose(pe, hand_pos_embed(D, G), atol=1e-6)
    # a wider table (B/2 width) too
    big = meta_model("SiT-B/2")  # meta: pos_embed values are not materialised there
    assert tuple(big.pos_embed.shape) == (1, 256, 768)
    demo = build("SiT-Demo/2", input_size=16)  # D = 96, 8x8 grid
    np.testing.assert_allclose(demo.pos_embed.detach()[0].double().numpy(),
                               hand_pos_embed(96, 8), atol=1e-6)


def test_timestep_embedding_is_cos_sin_of_raw_t():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    i = np.arange(128)
    freqs = np.exp(-math.log(10000.0) * i / 128)
    expected = np.concatenate([np.cos(t.numpy()[:, None] * freqs),
                               np.sin(t.numpy()[:, None] * freqs)],
                              axis=1)
    got = TimestepEmbedder.frequencies(t, 256)
    assert got.shape == (4, 256)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert torch.equal(got[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # t = 0
    # the embedder feeds exactly that sinusoid to Linear-SiLU-Linear
    model = randomize(build("SiT-Micro/2"))
    mlp = model.t_embedder.mlp
    with torch.no_grad():
        by_hand = mlp[2](torch.nn.functional.silu(mlp[0](torch.from_numpy(expected).float())))
        torch.testing.assert_close(model.t_embedder(t), by_hand, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- patchify/unpatchify

def test_patchify_unpatchify_round_trip():
    x = torch.randn(3, 4, 32, 32)
    tokens = patchify(x, 2)
    assert tokens.shape == (3, 256, 16)
    assert torch.equal(unpatchify(tokens, 2, 4), x)
    x8 = torch.randn(1, 4, 16, 16)
    assert torch.equal(unpatchify(patchify(x8, 4), 4, 4), x8)


def test_unpatchify_layout_matches_sit():
    # SiT: x.reshape(n, h, w, p, q, c); einsum("nhwpqc->nchpwq"); reshape(n, c, h*p, w*q).
    # Element by element: image[n, c, h*p + i, w*p + j] = tokens[n, h*W + w, (i*p + j)*C + c].
    n, C, G, p = 2, 3, 3, 2
    tokens = torch.arange(n * G * G * p * p * C, dtype=torch.float32).reshape(n, G * G, p * p * C)
    image = unpatchify(tokens, p, C)
    assert image.shape == (n, C, G * p, G * p)
    for b in range(n):
        for c in range(C):
            for h in range(G):
                for w in range(G):
                    for i in range(p):
                        for j in range(p):
                            assert (image[b, c, h * p + i, w * p + j]
                                    == tokens[b, h * G + w, (i * p + j) * C + c])
    # the patch embedding sees the same patches: token (h, w) covers image rows h*p.., cols w*p..
    x = torch.randn(1, C, G * p, G * p)
    assert torch.equal(patchify(x, p)[0, 1 * G + 2].reshape(p, p, C).permute(2, 0, 1),
                       x[0, :, 2:4, 4:6])


# ---------------------------------------------------------------------------------- checkpoints

OFFICIAL_KEYS = ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                 "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
                 "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.weight", "pos_embed"]


def test_official_key_names():
    keys = set(meta_model("SiT-XL/2").state_dict())
    missing = [k for k in OFFICIAL_KEYS if k not in keys]
    assert not missing
    assert "blocks.27.adaLN_modulation.1.bias" in keys and "blocks.28.attn.qkv.weight" not in keys
    # class 1000 is the null class: 1001 rows
    assert meta_model("SiT-XL/2").y_embedder.embedding_table.weight.shape[0] == 1001


def same_outputs(a: nn.Module, b: nn.Module, num_classes: int = 1000) -> bool:
    x, t, y = inputs(num_classes=num_classes, seed=3)
    with torch.no_grad():
        return torch.equal(a.eval()(x, t, y), b.eval()(x, t, y))


def test_load_training_checkpoint_prefers_ema(tmp_path):
    ema = randomize(build("SiT-Micro/2", learn_sigma=False), seed=1)
    raw = randomize(build("SiT-Micro/2", learn_sigma=False), seed=2)
    path = tmp_path / "0050000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {},
                "steps": 50000}, path)
    # a "steps" count is REPA's layout (auto would wrap it in REPA time): this test is about EMA
    loaded = load_checkpoint("SiT-Micro/2", path, convention="sit")
    assert loaded.learn_sigma is False and loaded.out_channels == 4
    assert same_outputs(loaded, ema)
    assert not same_outputs(loaded, raw)


def test_load_bare_official_state_dict(tmp_path):
    # the official SiT release: a bare state_dict, learn_sigma=True (8 output channels)
    source = randomize(build("SiT-Micro/2", learn_sigma=True), seed=4)
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(source.state_dict(), path)
    loaded = load_checkpoint("SiT-Micro/2", path)
    assert loaded.learn_sigma is True
    assert loaded.final_layer.linear.out_features == 2 * 2 * 8
    assert same_outputs(loaded, source)
    # a state held in memory loads the same way
    assert same_outputs(load_checkpoint("SiT-Micro/2", source.state_dict()), source)


def test_load_repa_like_checkpoint(tmp_path):
    # REPA keeps its projectors inside the model: extra "projectors.*" keys, maybe saved from DDP
    source = randomize(build("SiT-Micro/2", learn_sigma=True, num_classes=10), seed=5)
    state = dict(source.state_dict())
    state["projectors.0.0.weight"] = torch.randn(64, 32)
    state["projectors.0.0.bias"] = torch.randn(64)
    state["projectors.0.2.weight"] = torch.randn(48, 64)
    ddp = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "repa.pt"
    torch.save({"model": ddp, "ema": state, "opt": {}, "args": {"enc_type": "dinov2-vit-b"}}, path)
    wrapped = load_checkpoint("SiT-Micro/2", path)
    assert isinstance(wrapped, ReversedTime)  # projectors mark REPA's time convention
    loaded = wrapped.net
    assert loaded.learn_sigma is True and loaded.num_classes == 10
    assert not any(k.startswith("projectors") for k in loaded.state_dict())
    assert same_outputs(loaded, source, num_classes=10)
    # an architecture mismatch fails loudly instead of loading half the weights
    with pytest.raises(RuntimeError):
        load_checkpoint("SiT-Demo/2", path)
