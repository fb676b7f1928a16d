import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sra2.config.params import ConfigError, available_presets, load, resolve

from conftest import with_overrides

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_is_valid_and_params_yaml_selects_demo():
    assert {"demo", "tiny", "sit-b2", "sit-l2", "sit-xl2"} <= set(available_presets())
    for name in available_presets():
        resolve({"preset": name})
    assert load(REPO / "params.yaml").preset == "demo"


def test_paper_presets_follow_the_paper():
    for name, model, layer in [("sit-b2", "SiT-B/2", 2), ("sit-l2", "SiT-L/2", 8),
                               ("sit-xl2", "SiT-XL/2", 8)]:
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
    run = subprocess.run([sys.executable, "-m", "flows.stages.train", "--params", str(bad)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0
    assert "train.lr" in run.stderr and "1e-4x" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - start < 30  # no Prefect server was started


# ------------------------------------------------------------------ values checked before any work
#
# Each case: the stage, the overrides of the tiny preset, the key the error must name and the
# value it must show. parse() is what every stage's main() runs first.

MISSING = "/nonexistent/sra2-images"
BAD_VALUES = [
    ("train", {"train": {"steps": -5}}, "train.steps", -5),
    ("train", {"train": {"steps": 0}}, "train.steps", 0),
    ("train", {"train": {"global_batch": 0}}, "train.global_batch", 0),
    ("train", {"train": {"batch_per_gpu": 0}}, "train.batch_per_gpu", 0),
    ("train", {"train": {"lr": -1.0}}, "train.lr", -1.0),
    ("train", {"train": {"lr": float("nan")}}, "train.lr", float("nan")),
    ("train", {"train": {"ema_decay": 1.5}}, "train.ema_decay", 1.5),
    ("train", {"train": {"ema_decay": 0.0}}, "train.ema_decay", 0.0),
    ("train", {"train": {"betas": [0.9, 1.0]}}, "train.betas.1", 1.0),
    ("train", {"train": {"betas": [0.9]}}, "train.betas", [0.9]),
    ("train", {"train": {"grad_clip": 0.0}}, "train.grad_clip", 0.0),
    ("train", {"train": {"log_every": 0}}, "train.log_every", 0),
    ("train", {"train": {"ckpt_every": -1}}, "train.ckpt_every", -1),
    ("train", {"train": {"workers": -1}}, "train.workers", -1),
    ("train", {"train": {"seed": -1}}, "train.seed", -1),
    ("train", {"model": {"class_dropout": 1.0}}, "model.class_dropout", 1.0),
    ("train", {"model": {"name": "SiT-Q/2"}}, "model.name", "SiT-Q/2"),
    ("train", {"align": {"layer": 99}}, "align.layer", 99),
    ("train", {"align": {"layer": 0}}, "align.layer", 0),
    ("train", {"align": {"t_min": 0.8, "t_max": 0.2}}, "align.t_max", 0.2),
    ("train", {"align": {"t_max": 1.5}}, "align.t_max", 1.5),
    ("train", {"align": {"t_min": -0.1}}, "align.t_min", -0.1),
    ("train", {"data": {"image_size": 40}}, "data.image_size", 40),
    # tiny's global batch of 8 split over 3 processes, or into micro-batches of 3
    ("train", {"launch": {"nproc_per_node": 3}}, "train.global_batch", 8),
    ("train", {"train": {"batch_per_gpu": 3}}, "train.global_batch", 8),
    ("sample", {"sample": {"cfg_interval": [0.7, 0.3]}}, "sample.cfg_interval", [0.7, 0.3]),
    ("sample", {"sample": {"cfg_interval": [0.3]}}, "sample.cfg_interval", [0.3]),
    ("sample", {"sample": {"cfg_interval": [0.3, 1.5]}}, "sample.cfg_interval.1", 1.5),
    ("sample", {"sample": {"num_samples": -3}}, "sample.num_samples", -3),
    ("sample", {"sample": {"batch_size": 0}}, "sample.batch_size", 0),
    ("sample", {"sample": {"shard_size": 0}}, "sample.shard_size", 0),
    ("sample", {"sample": {"steps": 0}}, "sample.steps", 0),
    ("sample", {"sample": {"grid": 0}}, "sample.grid", 0),
    ("sample", {"sample": {"last_step": 0.0}}, "sample.last_step", 0.0),
    ("sample", {"sample": {"cfg_channels": 5}}, "sample.cfg_channels", 5),
    ("sample", {"sample": {"cfg_channels": 0}}, "sample.cfg_channels", 0),
    ("sample", {"sample": {"cfg_scale": float("inf")}}, "sample.cfg_scale", float("inf")),
    # 48 px: 3 tokens per side, which RALU cannot halve
    ("sample", {"data": {"image_size": 48}, "sample": {"sampler": "ralu"}}, "sample.sampler",
     "ralu"),
    ("sample", {"sample": {"ralu": {"ends": [0.5, 0.3]}}}, "sample.ralu.ends", [0.5, 0.3]),
    ("sample", {"sample": {"ralu": {"c": 0.3}}}, "sample.ralu.c", 0.3),
    ("sample", {"sample": {"ralu": {"steps": [4, 4, 0]}}}, "sample.ralu.steps", [4, 4, 0]),
    ("sample", {"sample": {"ralu": {"steps": [0, 5, 5], "top_k": 0.2}}}, "sample.ralu.top_k", 0.2),
    ("encode", {"data": {"root": MISSING, "demo": None}}, "data.root", MISSING),
    ("encode", {"encode": {"batch_size": 0}}, "encode.batch_size", 0),
    ("encode", {"encode": {"chunk_size": 0}}, "encode.chunk_size", 0),
    ("encode", {"encode": {"shard_size": -16}}, "encode.shard_size", -16),
    ("encode", {"encode": {"workers": -1}}, "encode.workers", -1),
    ("encode", {"vae": {"scale": 0.0}}, "vae.scale", 0.0),
    ("encode", {"vae": {"random": {"block_out_channels": [16, 12], "layers_per_block": 1,
                                   "norm_num_groups": 8, "seed": 0}}},
     "vae.random.norm_num_groups", 8),
    ("demo_data", {"data": {"demo": {"classes": 11, "per_class": 8, "min_side": 40,
                                     "max_side": 140, "seed": 0}}}, "data.demo.classes", 11),
    ("demo_data", {"data": {"demo": {"classes": 3, "per_class": 0, "min_side": 40,
                                     "max_side": 140, "seed": 0}}}, "data.demo.per_class", 0),
    ("demo_data", {"data": {"demo": {"classes": 3, "per_class": 8, "min_side": 40,
                                     "max_side": 30, "seed": 0}}}, "data.demo.max_side", 30),
    ("demo_data", {"model": {"num_classes": 2}}, "data.demo.classes", 3),
    ("evaluate", {"evaluate": {"batch_size": 0}}, "evaluate.batch_size", 0),
    ("evaluate", {"evaluate": {"num_real": 0}}, "evaluate.num_real", 0),
    ("evaluate", {"evaluate": {"reference": MISSING + ".npz"}}, "evaluate.reference",
     MISSING + ".npz"),
    ("evaluate", {"evaluate": {"inception": MISSING + ".pth"}}, "evaluate.inception",
     MISSING + ".pth"),
]


def params_file(tmp_path: Path, overrides: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", **overrides}))
    return path


@pytest.mark.parametrize("stage, overrides, key, value", BAD_VALUES,
                         ids=[f"{c[0]}-{c[2]}={c[3]}" for c in BAD_VALUES])
def test_bad_values_stop_the_stage_naming_key_and_value(tmp_path, stage, overrides, key, value):
    from flows.harness.common import parse
    from flows.stages.train import method_problems

    more = method_problems if stage == "train" else None  # what the train stage passes
    with pytest.raises(SystemExit) as stop:
        parse(stage, "", {}, ["--params", str(params_file(tmp_path, overrides))], more)
    message = str(stop.value.code)
    assert message.startswith("error: invalid parameters in ")
    assert f"\n  {key}: " in message and f"(got {value!r})" in message, message


@pytest.mark.parametrize("name", ["demo", "tiny", "sit-b2", "sit-l2", "sit-xl2"])
def test_every_preset_passes_the_stage_checks(name):
    from sra2.methods import checks, registry

    cfg = resolve({"preset": name})
    for stage in ("demo_data", "train", "sample"):
        checks.check(cfg, stage, world=1, more=registry.problems)
    # the most processes the global batch splits into
    checks.check(cfg, "train", world=cfg.train.global_batch // (cfg.train.batch_per_gpu or 1))
    if cfg.data.demo is not None:  # the demo-data stage draws data.root before encode reads it
        checks.check(with_overrides(cfg, data={"root": MISSING}), "encode", world=1)


def test_intervals_may_be_a_single_time():
    cfg = resolve({"preset": "tiny", "sample": {"cfg_interval": [0.5, 0.5]},
                   "align": {"t_min": 0.3, "t_max": 0.3}})
    assert cfg.sample.cfg_interval == [0.5, 0.5] and cfg.align.t_max == 0.3


# A few of the cases run as the stage's own command: they must stop in seconds with the key named,
# before Prefect starts a server or a flow run (the subprocess has no PREFECT_API_URL, so reaching
# Prefect would start a temporary server and print it).
COMMANDS = [
    ("train", {"train": {"steps": -5}}, "train.steps"),
    ("train", {"align": {"layer": 99}}, "align.layer"),
    ("train", {"launch": {"nproc_per_node": 3}}, "train.global_batch"),
    ("sample", {"sample": {"cfg_interval": [0.7, 0.3]}}, "sample.cfg_interval"),
    ("encode", {"data": {"root": MISSING, "demo": None}}, "data.root"),
]


@pytest.mark.parametrize("stage, overrides, key", COMMANDS, ids=[c[2] for c in COMMANDS])
def test_the_stage_command_fails_before_prefect_starts(tmp_path, stage, overrides, key):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", f"flows.stages.{stage}", "--params",
                          str(params_file(tmp_path, overrides))], cwd=REPO, capture_output=True,
                         text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=60)
    took = time.monotonic() - start
    output = (run.stdout + run.stderr).lower()
    assert run.returncode != 0 and key in run.stderr, run.stderr
    assert "temporary server" not in output and "flow run" not in output, output
    assert "traceback" not in output, output
    assert took < 10, f"{took:.1f} s"


# --- presets built from a base ---------------------------------------------------------------

def _overlay(base: dict, over: dict) -> dict:
    return {**base, **{k: _overlay(base[k], v) if isinstance(v, dict) and k in base else v
                       for k, v in over.items()}}


# sra2/config/presets/sit-b2.yaml as it was written out in full before the paper presets shared a
# base (chunk_size then 32: one latent a chunk since streaming training reads random rows; workers
# then 16: derived from the node's cores since, sra2.data.encode.decode_workers)
PAPER = {
    "data": {"root": "data/imagenet/train", "image_size": 256},
    "vae": {"source": "stabilityai/sd-vae-ft-ema", "scale": 0.18215},
    "encode": {"batch_size": 256, "shard_size": 1024, "chunk_size": 1, "workers": "auto",
               "dtype": "float32", "precision": "fp32", "flip": False, "strict": False,
               "device": "auto"},
    "model": {"name": "SiT-B/2", "num_classes": 1000, "learn_sigma": False, "class_dropout": 0.1},
    "align": {"enabled": True, "layer": 2, "depth": 5, "width": None, "loss": "smooth_l1",
              "beta": 0.05, "weight": 1.0, "t_min": 0.0, "t_max": 1.0, "target": "sample"},
    "train": {"steps": 400000, "global_batch": 256, "lr": 1.0e-4, "weight_decay": 0.0,
              "betas": [0.9, 0.999], "ema_decay": 0.9999, "grad_clip": 1.0, "precision": "bf16",
              "ckpt_every": 50000, "log_every": 100, "seed": 0, "device": "auto"},
    "sample": {"num_samples": 50000, "batch_size": 250, "shard_size": 1000, "sampler": "sde",
               "steps": 250, "last_step": 0.04, "cfg_scale": 1.0, "cfg_channels": 4,
               "cfg_interval": [0.0, 1.0], "convention": "auto", "grid": 64, "seed": 0,
               "labels": "uniform", "precision": "fp32", "device": "auto"},
    "evaluate": {"inception": "download", "inception_seed": 0, "reference": None,
                 "num_real": 50000, "batch_size": 250, "seed": 0, "device": "auto"},
}
# each preset's settings as its file listed them in full (demo.yaml still does: compared with
# itself)
# the baselines' blocks (REPA, SRA, REG: off) as each paper preset sets them
BASELINES = {"sit-b2": {"repa": {"layer": 4}, "sra": {"student_block": 3, "teacher_block": 8},
                        "reg": {"layer": 4}},
             "sit-l2": {"repa": {"layer": 8}, "sra": {"student_block": 8, "teacher_block": 20},
                        "reg": {"layer": 8}}}
BASELINES["sit-xl2"] = BASELINES["sit-l2"]
COMPLETE = {
    "sit-b2": _overlay(PAPER, BASELINES["sit-b2"]),
    "sit-l2": _overlay(PAPER, {"model": {"name": "SiT-L/2"}, "align": {"layer": 8},
                               **BASELINES["sit-l2"]}),
    "sit-xl2": _overlay(PAPER, {"model": {"name": "SiT-XL/2"}, "align": {"layer": 8},
                                "train": {"steps": 4000000}, **BASELINES["sit-xl2"]}),
    "tiny": {
        "data": {"root": "data/demo/train", "image_size": 32,
                 "demo": {"classes": 3, "per_class": 8, "min_side": 40, "max_side": 140,
                          "seed": 0}},
        "vae": {"source": "random", "scale": 0.18215,
                "random": {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1,
                           "norm_num_groups": 8, "seed": 0}},
        "encode": {"batch_size": 8, "shard_size": 16, "chunk_size": 4, "workers": 0,
                   "dtype": "float32", "precision": "fp32", "flip": False, "strict": False,
                   "device": "auto"},
        "model": {"name": "SiT-Micro/2", "num_classes": 3, "learn_sigma": False,
                  "class_dropout": 0.1},
        "align": PAPER["align"],
        "repa": {"enabled": False, "layer": 2, "weight": 0.5, "width": 2048, "encoder": "random",
                 "encoder_seed": 0},
        "sra": {"enabled": False, "student_block": 1, "teacher_block": 2, "t_max": 0.2,
                "loss": "smooth_l1", "beta": 0.05, "weight": 0.2},
        "reg": {"enabled": False, "layer": 2, "weight": 0.5, "cls_weight": 0.03, "width": 64,
                "encoder": "random", "encoder_seed": 0},
        "train": {"steps": 40, "global_batch": 8, "batch_per_gpu": 4, "lr": 5.0e-4,
                  "weight_decay": 0.0, "betas": [0.9, 0.999], "ema_decay": 0.995, "grad_clip": 1.0,
                  "precision": "fp32", "ckpt_every": 20, "log_every": 5, "seed": 0,
                  "device": "auto", "workers": 1},
        "sample": {**PAPER["sample"], "num_samples": 12, "batch_size": 4, "shard_size": 8,
                   "steps": 20, "grid": 9},
        "evaluate": {"inception": "random", "inception_seed": 0, "reference": None,
                     "num_real": None, "batch_size": 12, "seed": 0, "device": "auto",
                     "bootstrap": 0},
    },
}


@pytest.mark.parametrize("name", ["demo", "tiny", "sit-b2", "sit-l2", "sit-xl2"])
def test_presets_resolve_to_their_complete_settings(name):
    from sra2.config.params import PRESETS_DIR, Config

    complete = COMPLETE.get(name) or yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    assert resolve({"preset": name}).model_dump() == Config.model_validate(
        {"preset": name, **complete}).model_dump()


def test_paper_presets_list_only_what_differs_from_their_base():
    from sra2.config.params import PRESETS_DIR, preset_chain

    def keys(tree, prefix=""):
        return {k for key, v in tree.items() if key != "base"
                for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict) else {prefix + key})}

    blocks = {"repa.layer", "sra.student_block", "sra.teacher_block", "reg.layer"}  # (off)
    for name, listed in [("sit-b2", {"model.name", "align.layer", *blocks}),
                         ("sit-l2", {"model.name", "align.layer", *blocks}),
                         ("sit-xl2", {"model.name", "align.layer", "train.steps", *blocks})]:
        assert preset_chain(name) == ["_imagenet", name]
        assert keys(yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())) == listed


def test_bases_are_not_presets():
    assert not [p for p in available_presets() if p.startswith("_")]
    with pytest.raises(ConfigError, match="unknown preset '_imagenet'; choose one of"):
        resolve({"preset": "_imagenet"})


@pytest.mark.parametrize("files, message", [
    ({"a": "base: _nowhere\n"}, r"a\.yaml: base must name a file of .*got '_nowhere'"),
    ({"a": "base: [1]\n"}, r"a\.yaml: base must name a file"),
    ({"a": "base: _b\n", "_b": "base: a\n"}, r"_b\.yaml: base 'a' makes a cycle: a -> _b -> a"),
])
def test_a_bad_base_is_named(tmp_path, monkeypatch, files, message):
    import sra2.config.params

    for stem, text in files.items():
        (tmp_path / f"{stem}.yaml").write_text(text)
    monkeypatch.setattr(sra2.config.params, "PRESETS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=message):
        resolve({"preset": "a"})


def test_a_preset_overrides_its_base_key_by_key(tmp_path, monkeypatch):
    import sra2.config.params
    from sra2.config.params import read_preset

    (tmp_path / "_base.yaml").write_text("train: {lr: 1.0, seed: 3}\nsample: {grid: 4}\n")
    (tmp_path / "mid.yaml").write_text("base: _base\ntrain: {lr: 2.0}\n")
    (tmp_path / "top.yaml").write_text("base: mid\ntrain: {seed: 5}\nevaluate: {seed: 1}\n")
    monkeypatch.setattr(sra2.config.params, "PRESETS_DIR", tmp_path)
    assert read_preset("top") == {"train": {"lr": 2.0, "seed": 5}, "sample": {"grid": 4},
                                  "evaluate": {"seed": 1}}


def test_dvc_tracks_every_file_a_preset_is_made_of():
    """A stage that tracks sections of ${preset}.yaml tracks the same sections of its bases."""
    from sra2.config.params import preset_chain

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    bases = {b for p in available_presets() for b in preset_chain(p)[:-1]}
    assert bases == {"_imagenet"}
    for name, stage in stages.items():
        files = {k: v for p in stage["params"] if isinstance(p, dict) for k, v in p.items()}
        sections = files["sra2/config/presets/${preset}.yaml"]
        for base in bases:
            assert files.get(f"sra2/config/presets/{base}.yaml") == sections, name


# --- Table 1 as experiments ------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["sit-b2", "sit-l2", "sit-xl2"])
def test_every_table1_row_is_a_valid_run_of_the_paper_presets(preset):
    from flows.tables import check_row, queue_command
    from sra2.evaluate.paper import TABLE1

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = set()
    for row in TABLE1:
        check_row(params, row, preset, ["train.steps=1000"])
        command = queue_command(row, preset, "table1", ["train.steps=1000"])
        assert command[:6] == ["dvc", "exp", "run", "--queue", "-n", f"table1-{row.name}"]
        assert f"preset={preset}" in command and "++train.steps=1000" in command
        names.add(command[5])
    assert len(names) == len(TABLE1) == 10


@pytest.mark.parametrize("preset", ["sit-b2", "sit-xl2"])
def test_every_table3_row_is_a_valid_run_with_its_terms(preset):
    from flows.tables import check_row, row_overrides
    from sra2.config.params import apply_overrides
    from sra2.evaluate.paper import TABLE3
    from sra2.methods.registry import active

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = {"vanilla": [], "sra": ["sra"], "repa": ["repa"], "sra2": ["align"],
                "sra2-repa": ["align", "repa"], "reg": ["reg"]}
    for row in TABLE3:
        check_row(params, row, preset, [])
        cfg = resolve(apply_overrides(params, row_overrides(row, preset)))
        assert [m.name for m in active(cfg)] == expected[row.name]
        assert cfg.encode.pixels  # one store, with the images REPA needs, for every row


def test_table3_shows_each_rows_fid_and_cost_beside_vanillas():
    from flows.tables import collect, render
    from sra2.evaluate.paper import TABLES
    from sra2.train import cost

    def experiment(name, fid, changes, why, sd):
        params = {"preset": "sit-b2", **changes}
        metrics = {"data/metrics.json": {"data": {"fid": fid, "inception_score": 1.5,
                                                  "fid_noise": {"sd": sd},
                                                  "comparable": not why, "why": why}}}
        return {"name": name, "executor": None,
                "revs": [{"rev": "abcdef0123", "data": {"timestamp": "2026-11-28T10:00:00",
                                                       "params": {"params.yaml": {"data": params}},
                                                       "metrics": metrics}}]}

    shown = [{"rev": "HEAD", "experiments": [
        experiment("table3-vanilla", 40.0, {"align": {"enabled": False}}, "10,000 samples; x",
                   0.5),
        experiment("table3-repa", 35.5, {"align": {"enabled": False}, "repa": {"enabled": True}},
                   "", 0.5),
        experiment("table3-sra", 39.0, {"align": {"enabled": False}, "sra": {"enabled": True}},
                   "", 0.5)]}]
    table = render(collect(shown, "table3"), TABLES["3"])
    vanilla = cost.train_flops(resolve({"preset": "sit-b2", "align": {"enabled": False}})) / 1e9
    repa = cost.train_flops(resolve({"preset": "sit-b2", "align": {"enabled": False},
                                      "repa": {"enabled": True}})) / 1e9
    assert (f"| vanilla SiT | encode.pixels=true, align.enabled=false | 33.02 | 40.00 ± 0.98 | - | "
            f"1.50 | no [1] | {vanilla:.4g} | 1.00 |") in table
    # 4.5 apart with noises of 0.5 each: beyond 1.96 x 0.71 = 1.39; 1.0 apart: within
    assert (f"| 24.40 | 35.50 ± 0.98 | beyond noise | 1.50 | yes | {repa:.4g} | "
            f"{repa / vanilla:.2f} |") in table, table
    assert "| 39.00 ± 0.98 | within noise |" in table
    assert table.endswith("\n[1] vanilla: 10,000 samples; x")
    assert 1.3 < repa / vanilla < 1.5  # DINOv2's forward (~46 GFLOPs) on SiT-B/2's ~138
    assert re.search(r"\| SRA 2 \+ REPA \| .* \| - \| - \| - \| - \| - \| - \| - \| - \| "
                     r"not run \|", table), table


def test_table1_refuses_a_row_the_model_cannot_run():
    from flows.tables import check_row
    from sra2.evaluate.paper import row

    with pytest.raises(ConfigError, match=r"row layer6:\n  align\.layer: must be in \[1, 3\]"):
        check_row({"preset": "demo"}, row("layer6"), "tiny", [])


def test_table1_rows_change_one_thing_each():
    from flows.tables import row_overrides
    from sra2.config.params import apply_overrides
    from sra2.evaluate.paper import TABLE1

    base = resolve({"preset": "sit-b2"}).model_dump()
    for r in TABLE1:
        cfg = resolve(apply_overrides({"preset": "demo"}, row_overrides(r, "sit-b2"))).model_dump()
        changed = {f"{s}.{k}" for s in base for k in base[s] or {}
                   if isinstance(base[s], dict) and cfg[s][k] != base[s][k]}
        # the recipe row changes nothing: it is sit-b2 itself
        assert changed == ({k for k, v in r.changes.items()
                            if base[k.split(".")[0]][k.split(".")[1]] != v}), r.name


def test_settings_not_in_result_leave_the_folders_of_results_alone(tiny):
    """Each stage's signature names its folder of results by a hash: settings marked NotInResult
    change none, a setting that changes results changes its stage's, and today's hashes stay
    (a new one would start every existing run afresh)."""
    from types import SimpleNamespace

    from sra2.data import encode
    from sra2.data.captions import Captioned
    from sra2.data.store import digest
    from sra2.sample import generate
    from sra2.train import loop as train

    images = Captioned(SimpleNamespace(files=["a/1.JPEG"], labels=[0]), None)

    def digests(cfg):
        return (digest(train.signature(cfg, {})), digest(encode._signature(cfg, images)),
                digest(generate.signature(cfg, "weights")))

    assert digests(tiny) == ("43353c290216", "d4dfad670561", "66718e979007")  # as before the marks
    free = with_overrides(
        tiny, train={"steps": 7, "log_every": 7, "workers": 0, "read_from": "store",
                     "copy_dir": "x"},
        encode={"batch_size": 3, "workers": 0, "strict": True}, sample={"batch_size": 3, "grid": 1})
    assert digests(free) == digests(tiny)
    changed = with_overrides(tiny, train={"lr": 0.5}, encode={"flip": not tiny.encode.flip},
                             sample={"seed": 9})
    assert all(a != b for a, b in zip(digests(changed), digests(tiny)))


def test_every_preset_file_holds_every_section_dvc_tracks_of_it():
    """DVC refuses to run a stage whose tracked section a preset's file lacks (even where the
    preset's base has it)."""
    from sra2.config.params import PRESETS_DIR

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    tracked: dict[str, set] = {}
    for stage in stages.values():
        for p in stage["params"]:
            if isinstance(p, dict):
                for file, sections in p.items():
                    tracked.setdefault(file, set()).update(sections)
    for name in ["_imagenet", *available_presets()]:
        file = f"sra2/config/presets/{name}.yaml"
        held = set(yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()))
        wanted = tracked.get(file, tracked["sra2/config/presets/${preset}.yaml"])
        assert wanted <= held, f"{file} lacks {sorted(wanted - held)}"


def test_the_t2i_table_shows_fid_pickscore_and_clip_score_beside_the_papers():
    from flows.tables import collect, render
    from sra2.evaluate.paper import TABLES

    def experiment(name, enabled, fid, pick):
        metrics = {"fid": fid, "fid_noise": {"sd": 0.1}, "pickscore": pick, "clip_score": 31.0,
                   "comparable": True, "why": ""}
        return {"name": name, "executor": None, "revs": [{"rev": "abcdef0123", "data": {
            "timestamp": "2026-12-06T10:00:00",
            "params": {"params.yaml": {"data": {"preset": "mmdit-coco",
                                                "align": {"enabled": enabled}}}},
            "metrics": {"data/metrics.json": {"data": metrics}}}}]}

    table = TABLES["t2i"]
    shown = [{"rev": "HEAD", "experiments": [experiment("t2i-vanilla", False, 6.0, 20.1),
                                             experiment("t2i-sra2", True, 5.5, 20.6)]}]
    text = render(collect(shown, table.prefix), table)
    assert table.prefix == "t2i" and "REPA's protocol" in text
    assert ("| paper FID | our FID | vs vanilla | paper PickScore | our PickScore | "
            "our CLIP score | comparable |") in text
    # 0.5 apart with noises of 0.1 each: beyond 1.96 x 0.14 = 0.28
    assert re.search(r"\| MMDiT \+ SRA 2 \| align.enabled=true \| 4.67 \| 5.50 ± 0.20 \| "
                     r"beyond noise \| 20.92 \| 20.60 \| 31.00 \| yes \| [\d.]+ \| 1.0\d \| "
                     r"MMDiT-D24/2, 400000 steps \(mmdit-coco\)", text), text
