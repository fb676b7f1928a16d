"""Checkpoint time conventions (SiT's and REPA's, README) and safe checkpoint reading.

SiT time: t = 0 noise, t = 1 data, the network predicts x1 - x0. REPA time (REPA and the SRA code
built on it): s = 1 - t, s = 1 noise, the network predicts eps - x. The layouts below copy what the
public train.py scripts save (see the comment above ``sra2.model.sit.Convention``)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sra2.data.store import ShardedStore
from sra2.model.networks import load_checkpoint
from sra2.model.sit import (
    CheckpointError,
    ReversedTime,
    SiT,
    build,
    detect_convention,
    read_checkpoint,
)
from sra2.sample.generate import generate
from sra2.sample.samplers import guided_velocity, randn, sample

from conftest import randomize, with_overrides

NAME, CLASSES, SIDE = "SiT-Micro/2", 10, 16


def micro(seed: int = 0, learn_sigma: bool = False, **kwargs) -> SiT:
    kwargs = {"input_size": SIDE, "num_classes": CLASSES, **kwargs}
    return randomize(build(NAME, learn_sigma=learn_sigma, **kwargs), seed)


def outputs(model: torch.nn.Module, t: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, model.input_size, model.input_size, generator=g)
    with torch.no_grad():
        return model.eval()(x, torch.full((2,), t), torch.tensor([1, 2]))


def adamw_state() -> dict:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.999))
    p.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


def with_heads(state: dict, prefix: str) -> dict:
    """A REPA-family state_dict: the SiT weights plus a training head (REPA ``projectors.0.*``,
    SRA ``ap_head.*``) that inference drops."""
    g = torch.Generator().manual_seed(9)
    return {**state, f"{prefix}0.weight": torch.randn(64, 32, generator=g),
            f"{prefix}0.bias": torch.randn(64, generator=g)}


def repa_training_checkpoint(net: SiT) -> dict:
    """What REPA's train.py saves: model, ema, opt, args (its argparse.Namespace), steps."""
    state = with_heads(net.state_dict(), "projectors.0.")
    args = argparse.Namespace(model=NAME, enc_type="dinov2-vit-b", proj_coeff=0.5, encoder_depth=2,
                              path_type="linear", legacy=False, resume_step=0, seed=None)
    return {"model": state, "ema": state, "opt": adamw_state(), "args": args, "steps": 400_000}


def save(obj, path, **kwargs):
    torch.save(obj, path, **kwargs)
    return path


# ------------------------------------------------------------------- the REPA-time SDE reference

def repa_time_euler_maruyama(net, x, y, gens, steps, last_step, scale, guidance_high):
    """The SDE sampler rewritten in REPA time s = 1 - t (noise at s = 1), the way REPA integrates:
    s = linspace(1, last_step, steps). With v_r = net(x, s) = -v and ds = -dt < 0, the SiT step
    ((1 + t) v - x) dt becomes ((2 - s) v_r + x) ds, and the noise sqrt(2 w(t) dt) eps with
    w = 1 - t becomes sqrt(2 s |ds|) eps; the last step, from last_step to 0, has no noise.
    Guidance on all channels wherever s <= guidance_high (REPA's --guidance-high)."""
    null = torch.full_like(y, net.num_classes)

    def v_repa(x, s):
        ss = torch.full((x.shape[0],), s, dtype=x.dtype)
        cond = net(x, ss, y)
        if scale == 1.0 or s > guidance_high:
            return cond
        uncond = net(x, ss, null)
        return uncond + scale * (cond - uncond)

    def drift(x, s):
        return (2.0 - s) * v_repa(x, s) + x

    grid = torch.linspace(1.0, last_step, steps, dtype=torch.float64).tolist()
    for s, s_next in zip(grid[:-1], grid[1:]):
        ds = s_next - s
        eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.dtype)
        x = x + drift(x, s) * ds + math.sqrt(2.0 * s * -ds) * eps
    return x + drift(x, grid[-1]) * (0.0 - grid[-1])


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample_stage(model, y, seeds, kind, steps, last_step, scale, interval):
    """The sample stage's calls (sra2.sample.generate): per-row noise, guided_velocity, sample."""
    gens = generators(seeds)
    x = randn((len(seeds), 4, SIDE, SIDE), gens).double()
    velocity = guided_velocity(model, y, scale, None, interval)
    with torch.no_grad():
        return sample(kind, velocity, x, gens, steps, last_step)


@pytest.mark.parametrize("convention", ["auto", "repa"])
def test_repa_checkpoint_samples_as_repa_time_euler_maruyama(tmp_path, convention):
    net = micro(seed=1)
    path = save(repa_training_checkpoint(net), tmp_path / "0400000.pt")
    model = load_checkpoint(NAME, path, convention=convention).double().eval()
    assert isinstance(model, ReversedTime)
    steps, last, scale = 20, 0.04, 1.8
    # the network takes its time sinusoid in float32: both grids must give it the same inputs,
    # so that the runs below differ by float64 rounding of the updates only
    t_sit = torch.linspace(0.0, 1.0 - last, steps, dtype=torch.float64)
    s_repa = torch.linspace(1.0, last, steps, dtype=torch.float64)
    assert torch.equal((1.0 - t_sit).float(), s_repa.float())

    y, seeds = torch.tensor([1, 4, 9]), [11, 12, 13]
    # REPA's --guidance-high 0.7 is cfg_interval [0.3, 1.0] in SiT time
    ours = sample_stage(model, y, seeds, "sde", steps, last, scale, (0.3, 1.0))
    gens = generators(seeds)
    x = torch.stack([torch.randn(4, SIDE, SIDE, generator=g) for g in gens]).double()
    with torch.no_grad():
        ref = repa_time_euler_maruyama(net.double().eval(), x, y, gens, steps, last, scale, 0.7)

    # Tolerance from the arithmetic: float64 throughout (u = 2^-53 = 1.1e-16), same noise, same
    # time inputs, so each step differs by a few dozen roundings of values of size B (|x|, |v|;
    # about 10 here, asserted < 50) plus the network's rounding of inputs that differ that much:
    # at most 20 steps * 50 u * 50 = 5.5e-12, times the run's amplification of a perturbation
    # (< 20, checked in the next test): 1.1e-10 < 1e-9. (Measured: 9e-15.) A wrong convention
    # or time mapping moves samples by O(1).
    big = max(ref.abs().max().item(), ours.abs().max().item())
    assert big < 50
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)
    wrong = sample_stage(load_checkpoint(NAME, path, convention="sit").double(), y, seeds, "sde",
                         steps, last, scale, (0.3, 1.0))
    assert (wrong - ref).abs().max() > 0.1


def test_the_sde_reference_amplifies_perturbations_little():
    # backs the tolerance above: a 1e-9 nudge of the start moves the end by less than 20x (7x)
    net = micro(seed=1).double().eval()
    y, seeds = torch.tensor([1, 4, 9]), [11, 12, 13]
    x = torch.stack([torch.randn(4, SIDE, SIDE, generator=g) for g in generators(seeds)]).double()
    with torch.no_grad():
        a = repa_time_euler_maruyama(net, x, y, generators(seeds), 20, 0.04, 1.8, 0.7)
        b = repa_time_euler_maruyama(net, x + 1e-9, y, generators(seeds), 20, 0.04, 1.8, 0.7)
    assert (a - b).abs().max().item() < 20 * 1e-9


def test_repa_checkpoint_ode_euler_matches_repa_time_euler(tmp_path):
    # REPA's deterministic sampler: s = linspace(1, 0, N + 1), x += (s' - s) v_r(x, s)
    net = micro(seed=2)
    model = load_checkpoint(NAME, save(repa_training_checkpoint(net), tmp_path / "r.pt"))
    model, net = model.double().eval(), net.double().eval()
    steps, y, seeds = 12, torch.tensor([0, 5]), [3, 4]
    ours = sample_stage(model, y, seeds, "ode-euler", steps, 0.0, 1.0, (0.0, 1.0))
    x = torch.stack([torch.randn(4, SIDE, SIDE, generator=g) for g in generators(seeds)]).double()
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    assert torch.equal((1.0 - torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)).float(),
                       grid.float())
    with torch.no_grad():
        for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
            x = x + (s_next - s) * net(x, torch.full((2,), s, dtype=x.dtype), y)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


def test_reversed_time_is_the_negated_network_at_one_minus_t():
    net = micro(seed=4)
    wrapped = ReversedTime(net)
    assert (wrapped.num_classes, wrapped.in_channels, wrapped.input_size) == (CLASSES, 4, SIDE)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 4, SIDE, SIDE, generator=g), torch.tensor([0, 1, 2])
    t = torch.tensor([0.0, 0.25, 0.9])
    with torch.no_grad():  # the time embedding sees 1 - t, computed in t's dtype
        assert torch.equal(wrapped(x, t, y), -net(x, 1 - t, y))
    # where 1 - t is exact in float32 the wrapper equals the network at the mirrored time
    torch.testing.assert_close(outputs(wrapped, 0.75), -outputs(net, 0.25), rtol=0, atol=0)


def test_sample_stage_reads_the_convention_off_a_repa_file(tmp_path, tiny):
    net = randomize(build(tiny.model.name, input_size=4, num_classes=tiny.model.num_classes,
                          learn_sigma=False), 0, std=0.05)
    path = save(repa_training_checkpoint(net), tmp_path / "repa.pt")
    cfg = with_overrides(tiny, sample={"num_samples": 2, "steps": 4})
    images = {c: ShardedStore(generate(with_overrides(cfg, sample={"convention": c}), path,
                                       tmp_path / c)).array("images")[:]
              for c in ("auto", "repa", "sit")}
    np.testing.assert_array_equal(images["auto"], images["repa"])
    assert not np.array_equal(images["auto"], images["sit"])


def test_sample_convention_is_validated(tiny):
    assert tiny.sample.convention == "auto"
    with pytest.raises(ValidationError):
        with_overrides(tiny, sample={"convention": "edm"})


# ------------------------------------------------------------------------------------ detection

def sit_state(seed: int = 0, learn_sigma: bool = False) -> dict:
    return micro(seed, learn_sigma).state_dict()


@pytest.mark.parametrize("layout, expected", [
    # ours: the export and the training checkpoint
    (lambda: {"name": NAME, "model_config": {"name": NAME}, "step": 40, "ema": sit_state()}, "sit"),
    (lambda: {"step": 20, "model": sit_state(), "ema": sit_state(), "opt": adamw_state(),
              "heads": {}}, "sit"),
    # official SiT: the release (bare, 8 output channels) and its train.py dict
    (lambda: sit_state(learn_sigma=True), "sit"),
    (lambda: {"model": sit_state(), "ema": sit_state(), "opt": adamw_state(),
              "args": argparse.Namespace(model=NAME, path_type="Linear")}, "sit"),
    # REPA: train.py dict, the bare release with its projectors, a DDP-prefixed model only
    (lambda: repa_training_checkpoint(micro()), "repa"),
    (lambda: with_heads(sit_state(), "projectors.0."), "repa"),
    (lambda: {"model": {f"module.{k}": v for k, v in
                        with_heads(sit_state(), "projectors.0.").items()}}, "repa"),
    # SRA: its train.py dict, with the ap_head
    (lambda: {"model": with_heads(sit_state(), "ap_head.linear1."),
              "ema": with_heads(sit_state(), "ap_head.linear1."), "opt": adamw_state(),
              "args": argparse.Namespace(model=NAME), "epoch": 3, "steps": 50_000}, "repa"),
])
def test_detection_rules(tmp_path, layout, expected):
    path = save(layout(), tmp_path / "ckpt.pt")
    assert detect_convention(read_checkpoint(path)) == expected
    model = load_checkpoint(NAME, path)
    assert isinstance(model, ReversedTime if expected == "repa" else SiT)


def test_undetectable_layout_names_the_file_and_the_setting(tmp_path):
    # a bare 4-channel state_dict: a SiT trained without learn_sigma, or REPA weights stripped of
    # their projectors; nothing in the file tells which
    net = micro(seed=5)
    path = save(net.state_dict(), tmp_path / "stripped.pt")
    with pytest.raises(CheckpointError, match=r"stripped\.pt.*sample\.convention"):
        load_checkpoint(NAME, path)
    torch.testing.assert_close(outputs(load_checkpoint(NAME, path, convention="sit")), outputs(net))
    torch.testing.assert_close(outputs(load_checkpoint(NAME, path, convention="repa"), 0.2),
                               -outputs(net, 0.8))


def test_our_export_and_the_official_release_still_load(tmp_path):
    ours = micro(seed=6)
    export = {"name": NAME, "model_config": {"name": NAME, "num_classes": CLASSES}, "step": 40,
              "ema": ours.state_dict()}
    loaded = load_checkpoint(NAME, save(export, tmp_path / "ema.pt"))
    assert isinstance(loaded, SiT) and not loaded.learn_sigma
    torch.testing.assert_close(outputs(loaded), outputs(ours), rtol=0, atol=0)
    official = micro(seed=7, learn_sigma=True)
    loaded = load_checkpoint(NAME, save(official.state_dict(), tmp_path / "SiT-XL-2-256x256.pt"))
    assert isinstance(loaded, SiT) and loaded.learn_sigma
    torch.testing.assert_close(outputs(loaded), outputs(official), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- safe reading

UNPICKLED: list[str] = []


def record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling it calls a function: what a hostile checkpoint would use to run code."""

    def __reduce__(self):
        return record_unpickling, ("ran",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_foreign_object_is_refused_by_name(tmp_path, zip_format):
    path = save({"ema": sit_state(), "extra": Payload()}, tmp_path / "hostile.pt",
                _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert str(path) in message
    assert "unsupported global" in message and "record_unpickling" in message
    with pytest.raises(CheckpointError, match=r"hostile\.pt"):
        load_checkpoint(NAME, path)
    assert UNPICKLED == []  # refused before anything ran


def test_the_namespace_allow_list_opens_no_hole(tmp_path):
    # REPA's args Namespace is allowed, but not whatever someone puts inside it
    path = save({"ema": sit_state(), "args": argparse.Namespace(x=Payload())}, tmp_path / "ns.pt")
    with pytest.raises(CheckpointError, match="record_unpickling"):
        read_checkpoint(path)
    assert UNPICKLED == []
    args = read_checkpoint(save(repa_training_checkpoint(micro()), tmp_path / "repa.pt"))["args"]
    assert isinstance(args, argparse.Namespace) and args.enc_type == "dinov2-vit-b"


def test_a_file_that_is_no_dict_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"list\.pt.*list"):
        read_checkpoint(save([torch.ones(2)], tmp_path / "list.pt"))
