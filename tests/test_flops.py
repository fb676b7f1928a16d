"""Forward FLOPs of SiT and of the SRA 2 projector, against the DiT, SiT and SRA 2 papers'
figures."""

from __future__ import annotations

import pytest
import torch

from sra2.train.cost import main, report


def test_sit_b2_forward_flops_match_the_paper():
    r = report("SiT-B/2", align_layer=2)
    # DiT/SiT report 23.0 GMACs for B/2; FlopCounterMode counts a multiply-add as 2 FLOPs
    assert r.flops / 1e9 == pytest.approx(2 * 23.0, rel=0.03)
    assert r.params / 1e6 == pytest.approx(130.5, abs=0.1)
    assert r.projector_params / 1e6 == pytest.approx(8.29, abs=0.01)
    assert r.flops_with_projector == r.flops + r.projector_flops
    assert r.params_with_projector == r.params + r.projector_params
    # the projector is a per-token MLP: 2 FLOPs per weight per token (256 tokens), biases aside
    weights = 768 * 1536 + 3 * 1536 * 1536 + 1536 * 16
    assert r.projector_flops == 2 * 256 * weights


def test_sit_xl2_projector_costs_about_four_percent():
    r = report("SiT-XL/2", align_layer=8)
    assert r.flops / 1e9 == pytest.approx(2 * 118.6, rel=0.03)
    assert 3.0 <= r.extra_percent <= 5.0  # the paper's "+4% GFLOPs"
    assert r.projector_params / 1e6 == pytest.approx(18.6, abs=0.05)


def test_projector_size_options_and_cli(capsys):
    small = report("SiT-B/2", depth=2)
    assert small.projector_params / 1e6 == pytest.approx(1.21, abs=0.01)
    assert small.extra_percent < report("SiT-B/2", depth=5).extra_percent
    assert report("SiT-B/2", width=512).width == 512
    reports = main(["--model", "SiT-B/2", "--depth", "2"])
    assert [r.name for r in reports] == ["SiT-B/2"] and reports[0].align_layer == 2
    out = capsys.readouterr().out
    assert "SiT-B/2" in out and "1.21M" in out and "46.0" in out
    with pytest.raises(SystemExit):
        main(["--model", "SiT-B/2", "--layer", "13"])  # B/2 has 12 blocks


def test_a_token_set_costs_what_the_forward_pass_costs_at_the_same_count():
    """The RALU sampler's cost is counted per token set (SiT.tokens); at the full grid that is the
    forward pass's count. A quarter of the tokens costs less than a quarter (attention is
    quadratic in tokens) and more than a sixteenth (the per-token layers are linear)."""
    from sra2.model.flops import token_flops
    from sra2.model.sit import build

    with torch.device("meta"):
        model = build("SiT-B/2", input_size=32, num_classes=1000, learn_sigma=False)
    full = token_flops(model, 256)
    assert full == report("SiT-B/2").flops
    assert full / 16 < token_flops(model, 64) < full / 4
