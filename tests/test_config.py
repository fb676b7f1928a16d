import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sra2.config import ConfigError, available_presets, load, resolve

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_is_valid_and_params_yaml_selects_demo():
    assert {"demo", "tiny", "sit-b2", "sit-l2", "sit-xl2"} <= set(available_presets())
    for name in available_presets():
        resolve({"preset": name})
    assert load(REPO / "params.yaml").preset == "demo"


def test_paper_presets_follow_the_paper():
    for name, model, layer in [("sit-b2", "SiT-B/2", 2), ("sit-l2", "SiT-L/2", 8), ("sit-xl2", "SiT-XL/2", 8)]:
        cfg = resolve({"preset": name})
        assert (cfg.model.name, cfg.align.layer, cfg.align.depth) == (model, layer, 5)
        assert (cfg.align.loss, cfg.align.beta, cfg.align.weight) == ("smooth_l1", 0.05, 1.0)
        assert (cfg.train.global_batch, cfg.train.lr, cfg.train.ema_decay) == (256, 1e-4, 0.9999)
        assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.num_samples) == ("sde", 250, 50000)
        assert cfg.data.image_size == 256 and cfg.vae.source == "stabilityai/sd-vae-ft-ema"


def test_overrides_lay_over_the_preset():
    cfg = resolve({"preset": "sit-b2", "align": {"layer": 6}, "train": {"lr": 2e-4}})
    assert cfg.align.layer == 6 and cfg.train.lr == 2e-4 and cfg.align.depth == 5


@pytest.mark.parametrize("params, named", [
    ({"train": {"lrr": 1e-4}}, "train.lrr: unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"sample": {"steps": "250"}}, "sample.steps"),
    ({"trian": {}}, "trian: unknown key"),
    ({"align": {"loss": "huber"}}, "align.loss"),
    ({"encode": {"shard_size": 100, "chunk_size": 16}}, "encode.shard_size"),
])
def test_bad_parameters_are_named(params, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve({"preset": "demo", **params})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="sit-b2"):
        resolve({"preset": "sit-b3"})


def test_a_typo_fails_the_stage_at_once(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"preset": "demo", "train": {"lr": "1e-4x"}}))
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "flows.train", "--params", str(bad)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0
    assert "train.lr" in run.stderr and "1e-4x" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - start < 30  # no Prefect server was started
