"""The objective's named terms: SRA v1 (EMA teacher), REPA, and their combinations with SRA 2,
checked on small tensors against hand computations."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sra2.config.params import ConfigError, resolve
from sra2.methods import checks, registry
from sra2.methods.objective import Objective, build_heads, weights
from sra2.methods.repa import repa_loss
from sra2.methods.sra import sra_loss, teacher_time
from sra2.model.sit import build
from sra2.model.transport import interpolate
from sra2.train.loop import term_weights

from conftest import randomize, with_overrides


def config(**sections):
    return with_overrides(resolve({"preset": "tiny"}), **sections)


def inputs(n=4, seed=0, tokens=16):
    g = torch.Generator().manual_seed(seed)
    x1, x0 = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.85, 0.3])[:n]
    y = torch.randint(0, 3, (n,), generator=g)
    return {"x1": x1, "y": y, "t": t, "x0": x0, "align/target": x1,
            "repa/target": torch.randn(n, tokens, 768, generator=g)}


def micro_sit(seed=0):
    return randomize(build("SiT-Micro/2", input_size=8, num_classes=3, learn_sigma=False),
                     seed=seed)


def test_the_teacher_time_moves_toward_the_data_and_stops_at_one():
    t, shift = torch.tensor([0.1, 0.9, 0.5, 0.0]), torch.tensor([0.5, 1.0, 0.0, 1.0])
    torch.testing.assert_close(teacher_time(t, shift, 0.2), torch.tensor([0.2, 1.0, 0.5, 0.2]))


def test_sra_term_is_the_heads_distance_to_the_teachers_later_block():
    cfg = config(align={"enabled": False},
                 sra={"enabled": True, "student_block": 1, "teacher_block": 2, "weight": 0.2})
    model, teacher = micro_sit(0), micro_sit(5).requires_grad_(False)
    torch.manual_seed(1)
    heads = randomize(build_heads(model, cfg), seed=2, std=0.1)
    batch = inputs()
    batch["sra/shift"] = torch.tensor([0.5, 0.25, 1.0, 0.0])
    ran = []  # the teacher's blocks after its block never run
    teacher.blocks[2].register_forward_hook(lambda *_: ran.append(2))
    objective = Objective(model, heads, cfg, {"sra": teacher})
    values = objective(batch)
    assert objective.names == ["loss", "loss_velocity", "loss_sra"] and not ran

    with torch.no_grad():  # by hand: the teacher at t_T = t + 0.2 u (0.85 + 0.2 is clamped to 1)
        t_teacher = torch.tensor([0.2, 0.55, 1.0, 0.3])
        torch.testing.assert_close(teacher_time(batch["t"], batch["sra/shift"], 0.2), t_teacher)
        xt_t, _ = interpolate(batch["x0"], batch["x1"], t_teacher)
        c = teacher.t_embedder(t_teacher) + teacher.y_embedder(batch["y"])
        h = teacher.x_embedder(xt_t) + teacher.pos_embed
        for block in teacher.blocks[:2]:
            h = block(h, c)
        xt, _ = interpolate(batch["x0"], batch["x1"], batch["t"])
        _, student = model(xt, batch["t"], batch["y"], return_hidden=1)
        expected = F.smooth_l1_loss(heads["sra"](student), h, beta=0.05)
    torch.testing.assert_close(values[2], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[0], values[1] + 0.2 * values[2], rtol=1e-6, atol=0)

    values[0].backward()  # the student and its head learn; the teacher gets no gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert heads["sra"][0].weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_sra_cosine_is_over_the_feature_axis():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    by_hand = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # per token, over D
    torch.testing.assert_close(sra_loss(a, b, "cosine", 0.05), by_hand.mean())
    # the reference code's default axis (tokens) gives another number: not what is computed
    token_axis = (1 - F.cosine_similarity(a, b, dim=1)).mean()
    assert not torch.allclose(sra_loss(a, b, "cosine", 0.05), token_axis)


def test_sra_cosine_tokens_is_the_repositorys_cosine_over_the_token_axis():
    """sra.loss: cosine_tokens on a (2, 3, 4) tensor, by hand: for each sample and feature, the
    cosine of the 3-vectors of that feature over the tokens."""
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 11.5
    b = torch.flip(a, dims=[1]) + torch.linspace(-1, 1, 4)
    expected = torch.zeros(2, 4)
    for n in range(2):
        for d in range(4):
            u, v = a[n, :, d].tolist(), b[n, :, d].tolist()
            dot = sum(x * y for x, y in zip(u, v))
            expected[n, d] = 1 - dot / (sum(x * x for x in u) ** 0.5 * sum(y * y for y in v) ** 0.5)
    torch.testing.assert_close(sra_loss(a, b, "cosine_tokens", 0.05), expected.mean())
    assert not torch.allclose(sra_loss(a, b, "cosine_tokens", 0.05), sra_loss(a, b, "cosine", 0.05))


def test_repa_term_is_minus_the_mean_token_cosine():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 768, generator=g), torch.randn(3, 4, 768, generator=g)
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
    torch.testing.assert_close(repa_loss(pred, target), -cos.mean())
    assert repa_loss(target * 3, target).item() == pytest.approx(-1.0, abs=1e-6)


def objective_values(cfg, batch, weights=None):
    model = micro_sit(0)
    torch.manual_seed(1)  # the heads: align first, then repa, drawn in that order
    heads = build_heads(model, cfg)
    return Objective(model, heads, cfg, {"sra": copy.deepcopy(model)})(batch, weights)


def test_sra2_plus_repa_adds_each_weighted_term_and_turning_one_off_leaves_the_rest():
    both = config(align={"enabled": True, "layer": 2, "weight": 1.0},
                  repa={"enabled": True, "layer": 1, "weight": 0.5})
    batch = inputs()
    velocity, align, repa = objective_values(both, batch)[1:]
    total = objective_values(both, batch)[0]
    torch.testing.assert_close(total, velocity + 1.0 * align + 0.5 * repa, rtol=1e-6, atol=0)
    sra2_only = objective_values(config(align={"enabled": True, "layer": 2}), batch)
    assert torch.equal(sra2_only[1], velocity) and torch.equal(sra2_only[2], align)
    vanilla = objective_values(config(align={"enabled": False}), batch)
    assert (len(vanilla) == 2 and torch.equal(vanilla[1], velocity)
            and torch.equal(vanilla[0], velocity))


def test_a_block_beyond_the_model_is_named():
    cfg = config(sra={"enabled": True, "student_block": 1, "teacher_block": 7})
    with pytest.raises(ConfigError, match=r"sra.teacher_block: must be in \[1, 3\], the blocks "
                                          r"of SiT-Micro/2 \(got 7\)"):
        checks.check(cfg, "train", 1, more=registry.problems)


def test_sras_repository_schedule_weighs_by_whole_epochs_seen():
    """x 0.1^((e - 149) / 1000 + 1) once e, the whole epochs seen, passes 149; by hand."""
    cfg = config(align={"enabled": False},
                 sra={"enabled": True, "weight": 0.5, "weight_schedule": "repository"})
    assert weights(cfg, 0) == weights(cfg, 149) == [0.5]
    assert weights(cfg, 150) == pytest.approx([0.5 * 0.1 ** 1.001], rel=1e-12)
    assert weights(cfg, 1149) == pytest.approx([0.5 * 0.01], rel=1e-12)
    assert weights(config(sra={"enabled": True}), 500) is None  # constant: the objective's own
    # the loop's epoch: images seen // dataset size, the weights on the device made once a change
    tr = SimpleNamespace(cfg=cfg, weights=None, device=torch.device("cpu"))
    before, first = term_weights(tr, 149 * 3 + 2, 24), tr.weights
    assert before.tolist() == [0.5] and term_weights(tr, 0, 24) is before  # 8 a step, 3 an epoch
    after = term_weights(tr, 150 * 3, 24)
    assert after.item() == pytest.approx(0.5 * 0.1 ** 1.001, rel=1e-6) and tr.weights != first
    # in the total: the scheduled weight, the term's column unscaled
    batch = {k: v for k, v in inputs().items() if not k.startswith(("align", "repa"))}
    batch["sra/shift"] = torch.tensor([0.5, 0.25, 1.0, 0.0])
    values = objective_values(cfg, batch, after)
    torch.testing.assert_close(values[0], values[1] + after[0] * values[2], rtol=1e-6, atol=0)
