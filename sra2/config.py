"""Every knob of the pipeline, validated before any heavy work starts.

The effective configuration is a preset (``sra2/presets/<name>.yaml``, complete) with the sections
of ``params.yaml`` laid over it key by key. ``params.yaml`` names the preset (``preset: demo``) and
holds only what a run changes, so ``dvc exp run -S preset=sit-b2 -S +train.lr=2e-4`` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

PRESETS_DIR = Path(__file__).parent / "presets"
SECTIONS = ("data", "vae", "encode", "model", "align", "train", "sample", "evaluate")


class ConfigError(ValueError):
    """A parameter file that names an unknown key, a wrong type or a bad value."""


class Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DemoData(Section):
    classes: int
    per_class: int
    min_side: int
    max_side: int
    seed: int


class Data(Section):
    root: str  # ImageFolder: root/<class>/<image>; class index = rank of the folder name
    image_size: int
    demo: DemoData | None = None  # when set, the demo stage draws this dataset into `root`


class RandomVAE(Section):
    block_out_channels: list[int]
    layers_per_block: int
    norm_num_groups: int
    seed: int


class VAE(Section):
    source: str  # hub id, local directory, or "random" (seeded weights, offline demo)
    random: RandomVAE | None = None
    scale: float = 0.18215

    @model_validator(mode="after")
    def _random_needs_shape(self):
        if self.source == "random" and self.random is None:
            raise ValueError("vae.source is 'random' but vae.random (the architecture) is not set")
        return self


class Encode(Section):
    batch_size: int
    shard_size: int  # images per shard: the unit of writing and of resuming
    chunk_size: int  # images per chunk: the unit of random reads
    workers: int
    dtype: Literal["float32", "float16"]
    precision: Literal["fp32", "bf16", "fp16"]  # VAE compute dtype on a GPU; CPU runs fp32
    flip: bool  # also store the latents of the horizontally flipped image
    strict: bool  # stop at the first undecodable file instead of listing it as rejected
    device: Literal["auto", "cpu", "cuda"]

    @model_validator(mode="after")
    def _aligned(self):
        if self.shard_size % self.chunk_size:
            raise ValueError(f"encode.shard_size ({self.shard_size}) must be a multiple of "
                             f"encode.chunk_size ({self.chunk_size})")
        return self


class Model(Section):
    name: str  # a key of sra2.models.SiT_models, e.g. "SiT-B/2"
    num_classes: int
    learn_sigma: bool
    class_dropout: float


class Align(Section):
    enabled: bool
    layer: int  # 1-based block whose output the projector reads
    depth: int  # Linear layers in the projector
    width: int | None  # hidden width; None means 2 * hidden size
    loss: Literal["smooth_l1", "l1", "l2", "cosine"]
    beta: float  # smooth-L1 transition point
    weight: float  # lambda
    t_min: float  # alignment loss is zero outside [t_min, t_max] (SiT time, 1 = data)
    t_max: float
    target: Literal["sample", "mean"]


class Train(Section):
    steps: int
    global_batch: int
    lr: float
    weight_decay: float
    betas: list[float]
    ema_decay: float
    grad_clip: float
    precision: Literal["fp32", "bf16"]
    ckpt_every: int
    log_every: int
    seed: int
    device: Literal["auto", "cpu", "cuda"]


class Sample(Section):
    num_samples: int
    batch_size: int
    shard_size: int
    sampler: Literal["sde", "ode-euler", "ode-heun"]
    steps: int
    last_step: float  # SDE only: the final deterministic step, from 1 - last_step to 1
    cfg_scale: float
    cfg_channels: int  # guidance on the first N latent channels (SiT: 3, REPA: 4)
    cfg_interval: list[float]  # [t_low, t_high] in SiT time: guidance only inside
    grid: int  # images in the PNG grid
    seed: int
    device: Literal["auto", "cpu", "cuda"]


class Evaluate(Section):
    inception: str  # "random" (seeded, offline demo), "download", or a local .pth path
    inception_seed: int
    num_real: int | None  # real images for FID; None means all of data.root
    batch_size: int
    seed: int
    device: Literal["auto", "cpu", "cuda"]


class Config(Section):
    preset: str
    data: Data
    vae: VAE
    encode: Encode
    model: Model
    align: Align
    train: Train
    sample: Sample
    evaluate: Evaluate


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"parameter file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _overlay(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _overlay(base.get(key), value) if key in base else value
        return merged
    return over


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e['input']!r})")
    return ConfigError(f"invalid parameters in {source}:\n" + "\n".join(lines))


def resolve(params: dict[str, Any], source: str = "params") -> Config:
    """Lay ``params`` over the preset it names and validate the result."""
    params = dict(params)
    name = params.pop("preset", None)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: 'preset' must name one of {available_presets()}, got {name!r}")
    if name not in available_presets():
        raise ConfigError(f"{source}: unknown preset {name!r}; choose one of {available_presets()}")
    for section, value in params.items():
        if section not in SECTIONS:
            raise ConfigError(f"invalid parameters in {source}:\n  {section}: unknown key "
                              f"(sections are: preset, {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"invalid parameters in {source}:\n  {section}: expected a mapping "
                              f"of keys, got {value!r}")
    merged = _overlay(_read_yaml(PRESETS_DIR / f"{name}.yaml"), params)
    try:
        return Config.model_validate({"preset": name, **merged})
    except ValidationError as e:
        raise _explain(e, source) from None


def load(path: str | Path = "params.yaml") -> Config:
    return resolve(_read_yaml(Path(path)), str(path))
