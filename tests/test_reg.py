"""REG: the class token's path and velocity, the loss on fixed draws by hand, the joint sampler
against REG's own (reversed-time) sampler, and a checkpoint in its authors' layout."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from sra2.config.params import ConfigError, resolve
from sra2.methods import checks, registry
from sra2.methods.objective import Objective, build_heads, inputs, model_options
from sra2.model.networks import load_checkpoint
from sra2.model.sit import ReversedTime, build, unpatchify
from sra2.sample.generate import for_sampling, state_shape
from sra2.sample.joint import Joint
from sra2.sample.samplers import guided_velocity, randn, sample

from conftest import randomize, with_overrides

NAME, CLASSES, SIDE, CLS = "SiT-Micro/2", 10, 4, 768


def reg_config(**reg):
    return with_overrides(resolve({"preset": "tiny"}), align={"enabled": False},
                          reg={"enabled": True, "layer": 2, "width": 16, **reg})


def reg_sit(seed=0) -> torch.nn.Module:
    return randomize(build(NAME, input_size=SIDE, num_classes=CLASSES, learn_sigma=False,
                           cls_dim=CLS), seed, std=0.05)


def test_reg_builds_a_sit_with_a_class_token_in_front_with_a_zero_position():
    cfg = reg_config()
    assert model_options(cfg) == {"cls_dim": CLS}
    model = build(NAME, input_size=SIDE, num_classes=CLASSES, cls_dim=CLS)
    state = model.state_dict()
    assert state["cls_projectors2.weight"].shape == (32, CLS)
    assert state["final_layer.linear_cls.weight"].shape == (CLS, 32)
    assert state["pos_embed"].shape == (1, 1 + 4, 32)
    assert not state["pos_embed"][0, 0].any() and state["pos_embed"][0, 1:].abs().sum() > 0
    # zero-initialised like the patch outputs (adaLN-Zero): a fresh model predicts 0 for both
    x, c = torch.randn(2, 4, SIDE, SIDE), torch.randn(2, CLS)
    v, cls_v = model(x, torch.rand(2), torch.tensor([1, 2]), cls=c)
    assert not v.any() and not cls_v.any() and cls_v.shape == (2, CLS)


def test_reg_loss_on_fixed_draws_by_hand():
    cfg = reg_config(weight=0.5, cls_weight=0.03)
    model = reg_sit()
    torch.manual_seed(1)
    heads = randomize(build_heads(model, cfg), seed=2, std=0.1)
    g = torch.Generator().manual_seed(3)
    n, tokens = 3, 4
    x1, x0 = torch.randn(n, 4, SIDE, SIDE, generator=g), torch.randn(n, 4, SIDE, SIDE, generator=g)
    t, y = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 3, 7])
    target = torch.randn(n, 1 + tokens, CLS, generator=g)  # DINOv2: class token, then patches
    e = torch.randn(n, CLS, generator=g)
    common = {"x1": x1, "y": y, "t": t, "x0": x0}
    batch = {**common, **inputs(cfg, {"reg": lambda images: target}, {"images": None}, common,
                                {"reg/noise": e})}
    objective = Objective(model, heads, cfg)
    assert objective.names == ["loss", "loss_velocity", "loss_reg", "loss_reg_cls"]
    values = objective(batch)

    with torch.no_grad():  # by hand, from the definitions
        c = target[:, 0]
        tt = t.view(-1, 1)
        cls_t, cls_u = tt * c + (1 - tt) * e, c - e  # the latent's path and time, its own noise
        torch.testing.assert_close(batch["reg/cls_t"], cls_t)
        torch.testing.assert_close(batch["reg/cls_u"], cls_u)
        ttt = t.view(-1, 1, 1, 1)
        xt = ttt * x1 + (1 - ttt) * x0
        token = model.wg_norm(model.cls_projectors2(cls_t))
        h = torch.cat([token[:, None], model.x_embedder(xt)], dim=1) + model.pos_embed
        cond = model.t_embedder(t) + model.y_embedder(y)
        for i, block in enumerate(model.blocks, start=1):
            h = block(h, cond)
            if i == 2:
                aligned = h
        shift, scale = model.final_layer.adaLN_modulation(cond).chunk(2, dim=1)
        out = model.final_layer.norm_final(h) * (1 + scale[:, None]) + shift[:, None]
        v = unpatchify(model.final_layer.linear(out[:, 1:]), 2, 4)
        cls_v = model.final_layer.linear_cls(out[:, 0])
        velocity = (v - (x1 - x0)).square().mean(dim=(1, 2, 3)).mean()
        pred = heads["reg"](aligned)  # every token, the class token's too
        cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
        project = -cos.mean()
        cls_loss = (cls_v - cls_u).square().mean(dim=1).mean()
    # float32 sums of a few hundred terms of size ~1: a relative 1e-5 is 50x their rounding
    torch.testing.assert_close(values[1], velocity, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[2], project, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[3], cls_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[0], velocity + 0.5 * project + 0.03 * cls_loss,
                               rtol=1e-6, atol=1e-7)
    assert cls_loss > 0 and -1 < project < 1
    values[0].backward()  # the class token's modules learn from the loss
    assert model.cls_projectors2.weight.grad.abs().sum() > 0
    assert model.final_layer.linear_cls.weight.grad.abs().sum() > 0


def test_reg_with_repa_on_is_refused_by_name():
    both = with_overrides(reg_config(), repa={"enabled": True})
    with pytest.raises(ConfigError, match="reg.enabled: REG holds REPA's projection term"):
        checks.check(both, "train", 1, more=registry.problems)
    with pytest.raises(ConfigError, match=r"reg.layer: must be in \[1, 3\]"):
        checks.check(reg_config(layer=4), "train", 1, more=registry.problems)


# ------------------------------------------------------------- the authors' layout and sampler

def authors_checkpoint(net) -> dict:
    """What REG's train.py saves: model, ema, opt, args, steps; its SiT holds REPA's
    ``projectors.0.*`` beside the class token's modules."""
    g = torch.Generator().manual_seed(9)
    state = {**net.state_dict(), "projectors.0.0.weight": torch.randn(64, 32, generator=g),
             "projectors.0.0.bias": torch.randn(64, generator=g)}
    args = argparse.Namespace(model=NAME, enc_type="dinov2-vit-b", proj_coeff=0.5, cls=0.03,
                              encoder_depth=2)
    return {"model": state, "ema": state, "opt": {}, "args": args, "steps": 4_000_000}


def reg_time_euler_maruyama(net, x, c, y, noise, steps, last_step, scale):
    """REG's sampler as its authors write it, in reversed time s (noise at s = 1): the latent x and
    the class token c take the same steps, each with its drift (2 - s) v_r + x and noise
    sqrt(2 s |ds|); guidance on both drifts; the last step, to s = 0, without noise."""
    null = torch.full_like(y, net.num_classes)

    def drifts(x, c, s):
        ss = torch.full((x.shape[0],), s, dtype=x.dtype)
        v, cv = net(x, ss, y, cls=c)
        if scale != 1.0:
            vu, cvu = net(x, ss, null, cls=c)
            v, cv = vu + scale * (v - vu), cvu + scale * (cv - cvu)
        return (2.0 - s) * v + x, (2.0 - s) * cv + c

    grid = torch.linspace(1.0, last_step, steps, dtype=torch.float64).tolist()
    for k, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        ds = s_next - s
        dx, dc = drifts(x, c, s)
        ex, ec = noise(k)
        x = x + dx * ds + math.sqrt(2.0 * s * -ds) * ex
        c = c + dc * ds + math.sqrt(2.0 * s * -ds) * ec
    dx, _ = drifts(x, c, grid[-1])
    return x + dx * (0.0 - grid[-1])


def test_an_authors_checkpoint_loads_and_samples_latent_and_token_jointly(tmp_path, tiny):
    net = reg_sit(seed=1)
    path = tmp_path / "4000000.pt"
    torch.save(authors_checkpoint(net), path)
    loaded = load_checkpoint(NAME, path)
    assert isinstance(loaded, ReversedTime) and loaded.net.cls_dim == CLS  # REPA time, a token
    assert loaded.net.input_size == SIDE and not hasattr(loaded.net, "projectors")
    cfg = with_overrides(tiny, sample={"cfg_scale": 1.5, "cfg_interval": [0.0, 1.0]})
    model = for_sampling(cfg, loaded.double().eval())
    assert isinstance(model, Joint) and state_shape(model) == (4 * SIDE * SIDE + CLS,)

    steps, last, y, seeds = 12, 0.04, torch.tensor([1, 4]), [5, 6]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    start = randn((2, *state_shape(model)), gens).double()
    with torch.no_grad():
        ours = sample("sde", guided_velocity(model, y, 1.5), start, gens, steps, last)
    # REG's loop on the same numbers: each state (and each step's noise) is [latent; token]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    split = model.split

    def noise(k):
        return split(randn((2, *state_shape(model)), gens).double())

    x, c = split(randn((2, *state_shape(model)), gens).double())
    with torch.no_grad():
        ref = reg_time_euler_maruyama(net.double().eval(), x, c, y, noise, steps, last, 1.5)
    # float64, same noise and time inputs: differences are roundings (as the REPA-time check in
    # test_convention); a token left out of the latent's steps moves the latent by O(0.1)
    torch.testing.assert_close(split(ours)[0], ref, rtol=0, atol=1e-9)
    with torch.no_grad():
        frozen = reg_time_euler_maruyama(net.double().eval(), x, c, y,
                                         lambda k: (noise(k)[0], torch.zeros_like(c)), steps,
                                         last, 1.5)
    assert (frozen - ref).abs().max() > 1e-3


def test_sampling_settings_a_class_token_cannot_take_are_named(tiny):
    model = reg_sit()
    with pytest.raises(ValueError, match="sample.cfg_channels"):
        for_sampling(with_overrides(tiny, sample={"cfg_channels": 3}), model)
    with pytest.raises(ValueError, match="sample.sampler: ralu"):
        for_sampling(with_overrides(tiny, sample={"sampler": "ralu"}), model)
