"""``train.compile``: one SRA 2 training step through torch.compile (the CPU's inductor) gives the
losses, gradients and weights of the same step in eager mode, in fp32 and under bf16 autocast, to
within rounding. The GPU's compiled runs rely on it; a CPU can check it."""

import pytest
import torch
from torch._dynamo.utils import counters

from sra2.config.params import resolve
from sra2.runtime import dist
from sra2.train.loop import build_trainer, draws, step_inputs, train_step

SHAPE = (4, 8, 8)  # the demo's 64 px latents: 16 tokens of SiT-Micro/2 (3 blocks, width 32)
BATCH = 4
# Relative tolerances, from the unit roundoff u of each precision. Where compiled and eager differ:
# - fp32 (u = 2^-24): only in the order fused kernels sum in. A reordered sum of K terms moves by
#   at most K roundings of its terms' size; the longest sums are the losses' means over
#   BATCH x 4 x 8 x 8 = 2^10 values: 2^10 u = 2^-14, for losses and gradients alike.
# - bf16 (8 significant bits, u = 2^-8): eager rounds every op's output to bf16, a fused kernel
#   only its last; the roundings it skips perturb a gradient by about u each, independently, so
#   the ~30 of them along the longest path (3 blocks, forward and backward) add up to about
#   sqrt(30) u < 2^-5. A loss is an fp32 mean of 2^10 such values, which averages their
#   independent errors down by sqrt(2^10) = 2^5, to 2^-10: tolerance u = 2^-8.
TOLERANCE = {"fp32": {"loss": 2**-14, "grad": 2**-14}, "bf16": {"loss": 2**-8, "grad": 2**-5}}


def step(precision: str, compiled: bool) -> dict:
    """One training step of SiT-Micro/2 + SRA 2 from seeded weights: losses, gradients, update."""
    cfg = resolve({"preset": "demo", "model": {"name": "SiT-Micro/2"},
                   "train": {"global_batch": BATCH, "device": "cpu", "precision": precision,
                             "compile": compiled}})
    tr = build_trainer(cfg, SHAPE, torch.device("cpu"), world=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-Zero zeroes most gradients at init: every weight random instead
        for p in tr.params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in tr.params]
    batch = {"mean": torch.randn((BATCH, *SHAPE), generator=g),
             "std": 0.5 * torch.rand((BATCH, *SHAPE), generator=g),
             "labels": torch.randint(0, cfg.model.num_classes, (BATCH,), generator=g)}
    values, _ = train_step(tr, step_inputs(tr, batch, draws(cfg, 0, SHAPE, 0, 1, tr.device)))
    return {"values": values, "names": tr.names, "lr": cfg.train.lr,
            "grads": [p.grad.clone() for p in tr.params],  # as clipped and applied
            "update": torch.cat([(p.detach() - b).flatten() for p, b in zip(tr.params, before)])}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_compiled_sra2_step_matches_the_eager_one(precision, monkeypatch):
    if precision == "bf16":  # as on a GPU: sra2.runtime.dist.autocast is a no-op on the CPU
        monkeypatch.setattr(dist, "autocast",
                            lambda device, _: torch.autocast(device.type, torch.bfloat16))
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = step(precision, False), step(precision, True)
    # the objective compiled, as one graph: a break would cost the GPU its fusions
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert eager["names"] == ["loss", "loss_velocity", "loss_align"]
    tol = TOLERANCE[precision]
    # the losses, then the gradient norm
    torch.testing.assert_close(compiled["values"][:-1], eager["values"][:-1], rtol=tol["loss"],
                               atol=0)
    torch.testing.assert_close(compiled["values"][-1], eager["values"][-1], rtol=tol["grad"],
                               atol=0)
    for mine, theirs in zip(compiled["grads"], eager["grads"]):
        assert (mine - theirs).norm() <= tol["grad"] * theirs.norm()
    # AdamW's first update is -lr (g / (|g| + 1e-8) + weight_decay w): +-lr wherever |g| >> 1e-8,
    # whatever g's size, plus a term both share. The two updates differ only where compile's error
    # in g, at most tol x g's scale, flips g's sign: by 2 lr there, on a share ~tol of the elements
    # (gradients no more crowded at 0 than a normal's). Their RMS difference is <= 2 sqrt(tol) lr.
    lr, update = eager["lr"], eager["update"]
    assert (update.abs() > 0.5 * lr).float().mean() > 0.9  # the step moved the weights
    rms = (compiled["update"] - update).square().mean().sqrt()
    assert rms <= 2 * tol["grad"] ** 0.5 * lr
