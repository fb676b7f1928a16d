"""MMDiT: one joint block written out by hand, REPA's parameter layout, and REPA's checkpoints."""

import math

import pytest
import torch

from sra2.model import mmdit
from sra2.model.networks import build, family, load_checkpoint
from sra2.model.sit import ReversedTime


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # default init zeroes no gate, but draw every weight anyway so no term can hide behind a zero
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _layer_norm(h):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-6)


def _linear(layer, h):
    return h @ layer.weight.T + layer.bias


def _mlp(mlp, h):
    u = _linear(mlp.fc1, h)
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    return _linear(mlp.fc2, gelu)


def test_one_joint_block_is_the_written_out_attention_over_context_and_image():
    torch.manual_seed(0)
    model = _randomised(mmdit.MMDiT(input_size=4, patch_size=2, in_channels=3, depth=1,
                                    hidden_size=8, num_heads=2, context_dim=5)).double()
    n, p, side, heads, d = 2, 2, 4, 2, 8
    x = torch.randn(n, 3, side, side, dtype=torch.float64)
    y = torch.randn(n, 6, 5, dtype=torch.float64)  # 6 context tokens
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)

    # patches in row-major order, each (row a, col b) of the patch times the conv's kernel
    grid = side // p
    w = model.x_embedder.proj.weight
    patches = [x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
               for i in range(grid) for j in range(grid)]
    tokens = torch.stack([torch.einsum("ncab,dcab->nd", q, w) for q in patches], dim=1)
    h = tokens + model.x_embedder.proj.bias + model.pos_embed
    ctx = _linear(model.context_embedder, y)
    c = model.t_embedder(t)
    silu = c * torch.sigmoid(c)
    block = model.joint_blocks[0]
    # the only block is the last: the context gives queries, keys and values, nothing more
    assert block.context_block.pre_only and not hasattr(block.context_block, "mlp")
    shift_c, scale_c = _linear(block.context_block.adaLN_modulation[1], silu).chunk(2, dim=1)
    mods = _linear(block.x_block.adaLN_modulation[1], silu).chunk(6, dim=1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None] for m in mods)
    qkv_c = _linear(block.context_block.attn.qkv,
                    _layer_norm(ctx) * (1 + scale_c[:, None]) + shift_c[:, None])
    qkv_x = _linear(block.x_block.attn.qkv, _layer_norm(h) * (1 + scale_a) + shift_a)
    joint = torch.cat([qkv_c, qkv_x], dim=1)  # context tokens first
    q, k, v = joint[..., :d], joint[..., d:2 * d], joint[..., 2 * d:]
    heads_out = []
    for head in range(heads):
        cut = slice(head * d // heads, (head + 1) * d // heads)
        scores = q[..., cut] @ k[..., cut].transpose(1, 2) / math.sqrt(d // heads)
        heads_out.append(torch.softmax(scores, dim=-1) @ v[..., cut])
    attended = torch.cat(heads_out, dim=-1)[:, ctx.shape[1]:]  # the image tokens' rows
    h = h + gate_a * _linear(block.x_block.attn.proj, attended)
    h = h + gate_m * _mlp(block.x_block.mlp, _layer_norm(h) * (1 + scale_m) + shift_m)
    shift_f, scale_f = _linear(model.final_layer.adaLN_modulation[1], silu).chunk(2, dim=1)
    out = _linear(model.final_layer.linear, _layer_norm(h) * (1 + scale_f[:, None])
                  + shift_f[:, None])
    # each token's outputs are (row in patch, column in patch, channel), channel fastest
    want = torch.zeros_like(x)
    for i in range(grid):
        for j in range(grid):
            patch = out[:, i * grid + j].view(n, p, p, 3).permute(0, 3, 1, 2)
            want[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patch

    got = model.run(x, t, y, blocks=(1,))
    torch.testing.assert_close(got.v, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.hidden[1], h, rtol=1e-10, atol=1e-10)
    # the caption steers the image: another context, another velocity
    assert (model(x, t, y + 1.0) - got.v).abs().max() > 1e-3


def _repa_keys(depth: int) -> set[str]:
    """The state_dict keys of REPA's models/mmdit.py (read off its code), projectors left out."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "context_embedder.weight", "context_embedder.bias",
            *(f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
            *(f"final_layer.{m}.{w}" for m in ("linear", "adaLN_modulation.1")
              for w in ("weight", "bias"))}
    for i in range(depth):
        for stream in ("context_block", "x_block"):
            parts = ["attn.qkv", "adaLN_modulation.1"]
            if stream == "x_block" or i < depth - 1:  # the last context stream is pre_only
                parts += ["attn.proj", "mlp.fc1", "mlp.fc2"]
            keys |= {f"joint_blocks.{i}.{stream}.{m}.{w}" for m in parts
                     for w in ("weight", "bias")}
    return keys


def test_the_layout_and_sizes_are_repas():
    with torch.device("meta"):
        model = build("MMDiT-D24/2", input_size=32, context_dim=768)
    state = model.state_dict()
    assert set(state) == _repa_keys(24)
    # width 32 x depth, one 32-wide head per block, the last context stream's adaLN of 2 chunks
    assert state["pos_embed"].shape == (1, 256, 768)
    assert model.joint_blocks[0].heads == 24
    assert state["joint_blocks.23.context_block.adaLN_modulation.1.weight"].shape == (2 * 768, 768)
    assert state["joint_blocks.0.x_block.mlp.fc1.weight"].shape == (4 * 768, 768)
    # REPA's 512,415,504 parameters less its projector's (768 -> 2048 -> 2048 -> 768); the
    # position table is a buffer there and here
    assert sum(p.numel() for p in model.parameters()) == 512_415_504 - 7_344_896
    assert family("MMDiT-D24/2") == "mmdit" and family("SiT-B/2") == "sit"
    with pytest.raises(ValueError, match="model.name 'MMDiT-X/2'.*MMDiT-D24/2"):
        family("MMDiT-X/2")


def test_the_checks_pair_captions_with_an_mmdit_and_refuse_reg_on_one():
    from sra2.config.params import resolve
    from sra2.methods import registry
    from sra2.methods.checks import model_problems

    coco = resolve({"preset": "tiny-t2i"})
    assert model_problems(coco) == [] and registry.problems(coco) == []
    (sit,) = model_problems(resolve({"preset": "tiny-t2i", "model": {"name": "SiT-Micro/2"}}))
    assert sit.startswith("model.name: data.kind coco trains an MMDiT") and "MMDiT-Micro/2" in sit
    (labels,) = model_problems(resolve({"preset": "tiny", "model": {"name": "MMDiT-Micro/2"}}))
    assert labels.startswith("model.name: data.kind imagefolder trains a SiT")
    reg = resolve({"preset": "tiny-t2i", "align": {"enabled": False},
                   "reg": {"enabled": True, "layer": 1}})
    assert registry.problems(reg) == ["reg.enabled: REG trains a SiT with a class token; "
                                      "model.name is 'MMDiT-Micro/2', an MMDiT (got True)"]


def test_a_checkpoint_in_repas_layout_loads_in_its_time(tmp_path):
    torch.manual_seed(1)
    net = _randomised(build("MMDiT-Micro/2", input_size=8, context_dim=12), seed=1).eval()
    width = net.hidden_size
    projector = {f"projectors.0.{i}.{w}": torch.randn(*((2048,) if w == "bias" else (2048, width)))
                 for i in (0,) for w in ("weight", "bias")}
    state = {**net.state_dict(), **projector}
    path = tmp_path / "0400000.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": None, "steps": 400000}, path)

    loaded = load_checkpoint("MMDiT-Micro/2", path).eval()
    assert isinstance(loaded, ReversedTime)  # REPA trains with t = 1 as noise, predicting eps - x
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 12)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), -net(x, 1 - t, y), rtol=0, atol=0)
