"""The training objective: the interpolant, the SRA 2 alignment loss and how they combine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sra2.config.params import Align, resolve
from sra2.methods.align import alignment_loss, projector_for, sra2_loss
from sra2.methods.objective import Objective
from sra2.model.sit import build, patchify, unpatchify
from sra2.model.transport import from_repa_time, interpolate

from conftest import randomize, with_overrides


def training_loss(model, projector, align: Align, x1, y, t, x0, align_target=None):
    """(total, velocity, align) from the objective with SRA 2 alone (or no term without a
    projector)."""
    cfg = with_overrides(resolve({"preset": "tiny"}),
                         align={**align.model_dump(), "enabled": projector is not None})
    heads = nn.ModuleDict({"align": projector} if projector is not None else {})
    inputs = {"x1": x1, "y": y, "t": t, "x0": x0}
    if projector is not None:
        inputs["align/target"] = x1 if align_target is None else align_target
    values = Objective(model, heads, cfg)(inputs)
    return SimpleNamespace(total=values[0], velocity=values[1],
                           align=values[2] if len(values) > 2 else values.new_zeros(()))


def align_cfg(**overrides) -> Align:
    base = dict(enabled=True, layer=2, depth=2, width=None, loss="smooth_l1", beta=0.05,
                weight=1.0, t_min=0.0, t_max=1.0, target="sample")
    return Align(**{**base, **overrides})


def batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 4, 32, 32, generator=g)
    x0 = torch.randn(n, 4, 32, 32, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    return x1, x0, t, y


# --------------------------------------------------------------------------------- interpolant

def test_interpolate_is_the_linear_path_in_sit_time():
    x1, x0, t, _ = batch()
    xt, u = interpolate(x0, x1, t)
    for i in range(len(t)):
        torch.testing.assert_close(xt[i], t[i] * x1[i] + (1 - t[i]) * x0[i])
    torch.testing.assert_close(u, x1 - x0)
    # t = 0 is noise, t = 1 is data
    ends = torch.tensor([0.0, 1.0])
    xt, _ = interpolate(x0[:2], x1[:2], ends)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], x1[1])


def test_repa_reversed_time_is_the_same_path():
    x1, eps, _, _ = batch(seed=1)
    s = torch.tensor([0.0, 0.1, 0.55, 0.9])
    ss = s.view(-1, 1, 1, 1)
    x_repa = (1 - ss) * x1 + ss * eps  # REPA: s = 0 data, s = 1 noise
    v_repa = eps - x1                  # REPA's target, d x_s / d s
    t, v = from_repa_time(s, v_repa)
    torch.testing.assert_close(t, 1 - s)
    xt, u = interpolate(eps, x1, t)
    torch.testing.assert_close(xt, x_repa)
    torch.testing.assert_close(v, u)
    # and the velocity is the time derivative along the path in each convention
    h = 1e-3
    forward, _ = interpolate(eps, x1, t + h)
    torch.testing.assert_close((forward - xt) / h, u, atol=1e-2, rtol=0)


# ----------------------------------------------------------------------------- alignment loss

def hand_loss(pred_img: torch.Tensor, target_img: torch.Tensor, kind: str, beta: float = 0.05):
    """Per-sample loss written from the definitions, on 4x32x32 images."""
    d = pred_img - target_img
    if kind == "smooth_l1":
        e = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
    elif kind == "l1":
        e = d.abs()
    elif kind == "l2":
        e = d * d
    else:
        raise AssertionError(kind)
    n = e[0].numel()  # N = C*H*W
    return torch.stack([e[i].sum() / n for i in range(len(e))])


def pred_and_target(seed=2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 4, 32, 32, generator=g)
    # differences on both sides of beta = 0.05, so both branches of smooth-L1 are exercised
    pred_img = target + 0.08 * torch.randn(3, 4, 32, 32, generator=g)
    return pred_img, target


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "l2"])
def test_elementwise_alignment_losses_match_hand_formulas(kind):
    pred_img, target = pred_and_target()
    d = (pred_img - target).abs()
    assert (d < 0.05).float().mean() > 0.2 and (d >= 0.05).float().mean() > 0.2
    tokens = patchify(pred_img, 2)  # what the projector emits: (N, 256, p*p*C)
    expected = hand_loss(pred_img, target, kind)
    got = alignment_loss(tokens, patchify(target, 2), kind, 0.05)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # through sra2_loss: projector output (tokens) vs the 4x32x32 latent, mean over the batch
    loss = sra2_loss(nn.Identity(), tokens, target, torch.full((3,), 0.5), align_cfg(loss=kind), 2)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-7)


def test_smooth_l1_beta_matters():
    pred_img, target = pred_and_target()
    tokens, goal = patchify(pred_img, 2), patchify(target, 2)
    for beta in (0.01, 0.05, 1.0):
        torch.testing.assert_close(alignment_loss(tokens, goal, "smooth_l1", beta),
                                   hand_loss(pred_img, target, "smooth_l1", beta),
                                   rtol=1e-5, atol=1e-7)


def test_token_layout_of_the_projector_output_is_unpatchified_like_sit():
    # a projector output compared with its own latent is zero only if the layouts agree
    _, target = pred_and_target()
    tokens = patchify(target, 2)
    assert torch.equal(unpatchify(tokens, 2, 4), target)
    zero = sra2_loss(nn.Identity(), tokens, target, torch.full((3,), 0.5), align_cfg(), 2)
    assert zero.item() == 0.0
    # channels-first per token
    shuffled = tokens.view(3, 256, 4, 4).transpose(2, 3).reshape(3, 256, 16)
    assert sra2_loss(nn.Identity(), shuffled, target, torch.full((3,), 0.5), align_cfg(), 2) > 0.1


def test_cosine_alignment_loss_by_hand():
    pred_img, target = pred_and_target()
    pred_img = pred_img + 0.5 * torch.randn(pred_img.shape,
                                            generator=torch.Generator().manual_seed(9))
    p, q = patchify(pred_img, 2), patchify(target, 2)
    expected = torch.zeros(3)
    for i in range(3):
        per_token = []
        for j in range(p.shape[1]):
            a, b = p[i, j], q[i, j]
            per_token.append(1 - (a * b).sum() / (a.norm() * b.norm()))
        expected[i] = torch.stack(per_token).mean()
    torch.testing.assert_close(alignment_loss(p, q, "cosine", 0.05), expected, rtol=1e-5, atol=1e-6)
    # scale invariant, zero for parallel vectors
    torch.testing.assert_close(alignment_loss(3 * q, q, "cosine", 0.05), torch.zeros(3),
                               atol=1e-6, rtol=0)


def test_unknown_alignment_loss_is_an_error():
    with pytest.raises(ValueError, match="align.loss"):
        alignment_loss(torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), "huber", 0.05)


def test_alignment_loss_is_zero_outside_the_time_window():
    pred_img, target = pred_and_target()
    tokens = patchify(pred_img, 2)
    per_sample = hand_loss(pred_img, target, "smooth_l1")
    cfg = align_cfg(t_min=0.0, t_max=0.5)
    t = torch.tensor([0.2, 0.7, 0.5])  # inside, outside, on the (inclusive) edge
    got = sra2_loss(nn.Identity(), tokens, target, t, cfg, 2)
    # outside samples count as zeros in the batch mean
    torch.testing.assert_close(got, (per_sample[0] + per_sample[2]) / 3, rtol=1e-5, atol=1e-7)
    all_out = sra2_loss(nn.Identity(), tokens, target, torch.tensor([0.6, 0.8, 1.0]), cfg, 2)
    assert all_out.item() == 0.0


# ---------------------------------------------------------------------------------- total loss

def small_model():
    return randomize(build("SiT-Micro/2", learn_sigma=False), seed=0)


def test_training_loss_is_velocity_plus_weighted_alignment():
    torch.manual_seed(0)
    model = small_model()
    cfg = align_cfg(layer=2, weight=0.5)
    projector = randomize(projector_for(model, cfg), seed=1, std=0.1)
    x1, x0, t, y = batch()
    losses = training_loss(model, projector, cfg, x1, y, t, x0)
    with torch.no_grad():
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        v, hidden = model(xt, t, y, return_hidden=2)
        velocity = ((v - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
        pred_img = unpatchify(projector(hidden), 2, 4)
        align = hand_loss(pred_img, x1, "smooth_l1").mean()  # f_VAE defaults to the target latent
    torch.testing.assert_close(losses.velocity, velocity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.align, align, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.total, losses.velocity + 0.5 * losses.align,
                               rtol=1e-6, atol=0)
    assert losses.align > 0
    # an explicit alignment target (e.g. the posterior mean) is the one compared
    mean_latent = x1 + 0.3
    other = training_loss(model, projector, cfg, x1, y, t, x0, align_target=mean_latent)
    with torch.no_grad():
        expected = hand_loss(pred_img, mean_latent, "smooth_l1").mean()
    torch.testing.assert_close(other.align, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.velocity, losses.velocity)


def test_without_projector_no_hidden_state_is_requested():
    model = small_model()
    calls, run = [], model.run
    model.run = lambda *args, **kwargs: calls.append(args[3:]) or run(*args, **kwargs)
    x1, x0, t, y = batch()
    losses = training_loss(model, None, align_cfg(weight=1.0), x1, y, t, x0)
    assert calls == [((),)]
    assert losses.align.item() == 0.0
    assert torch.equal(losses.total, losses.velocity)
    # with a projector the SiT is asked for exactly the configured block
    calls.clear()
    cfg = align_cfg(layer=3)
    training_loss(model, projector_for(model, cfg), cfg, x1, y, t, x0)
    assert calls == [((3,),)]


def grads(module: nn.Module) -> dict[str, float]:
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item())
            for n, p in module.named_parameters()}


def test_alignment_gradient_reaches_blocks_up_to_k_only():
    model = small_model()  # depth 3
    cfg = align_cfg(layer=2)
    projector = randomize(projector_for(model, cfg), seed=1, std=0.1)
    x1, x0, t, y = batch()

    # the alignment term alone: projector, embedders and blocks 1..k learn; later blocks do not
    training_loss(model, projector, cfg, x1, y, t, x0).align.backward()
    g = grads(model)
    assert all(v > 0 for v in grads(projector).values())
    assert g["x_embedder.proj.weight"] > 0 and g["t_embedder.mlp.0.weight"] > 0
    assert g["y_embedder.embedding_table.weight"] > 0
    for i in (0, 1):
        assert g[f"blocks.{i}.attn.qkv.weight"] > 0 and g[f"blocks.{i}.mlp.fc2.weight"] > 0
    later = {n: v for n, v in g.items() if n.startswith(("blocks.2.", "final_layer."))}
    assert later and all(v == 0.0 for v in later.values())

    # the velocity term never reaches the projector (dropped at inference, trained only by L_align)
    model.zero_grad(set_to_none=True)
    projector.zero_grad(set_to_none=True)
    training_loss(model, projector, cfg, x1, y, t, x0).velocity.backward()
    assert all(v == 0.0 for v in grads(projector).values())
    assert grads(model)["final_layer.linear.weight"] > 0

    # outside the time window the alignment term trains nothing
    model.zero_grad(set_to_none=True)
    projector.zero_grad(set_to_none=True)
    narrow = align_cfg(layer=2, t_min=0.0, t_max=0.0)
    training_loss(model, projector, narrow, x1, y, t.clamp(min=0.1), x0).align.backward()
    assert all(v == 0.0 for v in grads(projector).values())
    assert all(v == 0.0 for v in grads(model).values())
