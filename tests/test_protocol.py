"""When our numbers can sit beside the paper's: every reason on its own, none with the paper's
protocol, and the one-line warning of a paper preset without ADM's reference batch."""

import pytest
import yaml

from sra2.config.params import resolve
from sra2.evaluate.protocol import not_comparable, reference_missing

from conftest import with_overrides

PAPER = with_overrides(resolve({"preset": "sit-b2"}),
                       evaluate={"reference": "VIRTUAL_imagenet256_labeled.npz"})

# one change each, and the key its reason must name
ALONE = [
    ({"evaluate": {"reference": None}}, "evaluate.reference"),
    ({"evaluate": {"inception": "random"}}, "evaluate.inception"),
    ({"sample": {"num_samples": 10_000}}, "sample.num_samples"),
    ({"sample": {"labels": "balanced"}}, "sample.labels"),
    ({"sample": {"sampler": "ode-heun"}}, "sample.sampler"),
    ({"sample": {"steps": 50}}, "sample.steps"),
    ({"sample": {"cfg_scale": 1.5}}, "sample.cfg_scale"),
    ({"vae": {"source": "random", "random": {"block_out_channels": [16, 32],
                                             "layers_per_block": 1, "norm_num_groups": 8,
                                             "seed": 0}}}, "vae.source"),
    ({"data": {"image_size": 512}}, "data.image_size"),
]


def test_the_papers_protocol_is_comparable():
    assert not_comparable(PAPER) == []
    # a guided row is compared with guided numbers only
    guided = with_overrides(PAPER, sample={"cfg_scale": 1.8})
    assert not_comparable(guided, guided=True) == []
    assert len(not_comparable(PAPER, guided=True)) == 1


@pytest.mark.parametrize("change, key", ALONE, ids=[key for _, key in ALONE])
def test_each_reason_on_its_own(change, key):
    (why,) = not_comparable(with_overrides(PAPER, **change))
    assert key in why


def test_a_paper_preset_without_the_reference_warns_in_one_line_at_the_stage_start(tmp_path,
                                                                                   capsys):
    from flows.harness.common import parse

    assert reference_missing(PAPER) is None
    assert reference_missing(resolve({"preset": "tiny"})) is None  # not a paper preset
    line = reference_missing(resolve({"preset": "sit-b2"}))
    assert "\n" not in line and "evaluate.reference" in line and "download" in line
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "sit-b2"}))
    parse("sample", "", {}, ["--params", str(params)])
    assert capsys.readouterr().err == f"WARNING: {line}\n"


T2I_PAPER = resolve({"preset": "mmdit-coco"})
T2I_ALONE = [
    ({"evaluate": {"num_real": 10_000}}, "evaluate.num_real"),
    ({"evaluate": {"inception": "random"}}, "evaluate.inception"),
    ({"sample": {"num_samples": 30_000}}, "sample.num_samples"),
    ({"sample": {"sampler": "sde"}}, "sample.sampler"),
    ({"sample": {"cfg_scale": 1.0}}, "sample.cfg_scale"),
    ({"sample": {"cfg_interval": [0.3, 1.0]}}, "cfg_interval"),
    ({"text": {"source": "some/other-clip"}}, "text.source"),
    ({"evaluate": {"pickscore": "data/demo/clip"}}, "evaluate.pickscore"),
    ({"data": {"image_size": 512}}, "data.image_size"),
]


@pytest.mark.parametrize("change, key", T2I_ALONE, ids=[key for _, key in T2I_ALONE])
def test_text_to_image_follows_repas_protocol_each_reason_on_its_own(change, key):
    assert not_comparable(T2I_PAPER) == []  # mmdit-coco as it is: REPA's protocol
    (why,) = not_comparable(with_overrides(T2I_PAPER, **change))
    assert key in why
