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
    classes: int  # one drawn shape or texture per class (at most 10)
    per_class: int  # JPEG files per class
    min_side: int  # image sides are drawn from [min_side, max_side] pixels
    max_side: int
    seed: int


class Data(Section):
    root: str  # ImageFolder: root/<class>/<image>; class index = rank of the folder name
    image_size: int  # side of the ADM centre crop the VAE sees (latents are 1/8 of it)
    demo: DemoData | None = None  # when set, the demo stage draws this dataset into `root`


class RandomVAE(Section):
    """An AutoencoderKL of this shape with seeded weights; SD-VAE is [128, 256, 512, 512], 2, 32."""

    block_out_channels: list[int]
    layers_per_block: int
    norm_num_groups: int
    seed: int


class VAE(Section):
    source: str  # hub id, local directory, or "random" (seeded weights, offline demo)
    random: RandomVAE | None = None
    scale: float = 0.18215  # latents are multiplied by this before diffusion

    @model_validator(mode="after")
    def _random_needs_shape(self):
        if self.source == "random" and self.random is None:
            raise ValueError("vae.source is 'random' but vae.random (the architecture) is not set")
        return self


class Encode(Section):
    batch_size: int  # images per VAE call
    shard_size: int  # images per shard: the unit of writing and of resuming
    chunk_size: int  # images per chunk: the unit of random reads
    workers: int  # processes decoding and cropping JPEGs
    dtype: Literal["float32", "float16"]
    precision: Literal["fp32", "bf16", "fp16"]  # VAE compute dtype on a GPU; CPU runs fp32
    flip: bool  # also store the latents of the horizontally flipped image
    strict: bool  # stop at the first undecodable file instead of listing it as rejected
    device: Literal["auto", "cpu", "cuda"]  # auto: this rank's GPU if there is one

    @model_validator(mode="after")
    def _aligned(self):
        if self.shard_size % self.chunk_size:
            raise ValueError(f"encode.shard_size ({self.shard_size}) must be a multiple of "
                             f"encode.chunk_size ({self.chunk_size})")
        return self


class Model(Section):
    name: str  # a key of sra2.models.SiT_models, e.g. "SiT-B/2"
    num_classes: int  # label num_classes is the null class of classifier-free guidance
    learn_sigma: bool  # 8 output channels as in the official SiT (the second half is unused)
    class_dropout: float  # probability of training on the null label


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
    steps: int  # optimizer steps in total; raising it resumes a finished run
    global_batch: int  # images per step over all processes
    lr: float  # AdamW, constant
    weight_decay: float
    betas: list[float]
    ema_decay: float  # EMA of the SiT weights, updated every step
    grad_clip: float  # max global gradient norm
    precision: Literal["fp32", "bf16"]  # bf16 autocast on a GPU; losses are computed in fp32
    ckpt_every: int  # steps between checkpoints (the unit of resuming)
    log_every: int  # steps averaged into one row of metrics.csv
    seed: int
    device: Literal["auto", "cpu", "cuda"]


class Sample(Section):
    num_samples: int
    batch_size: int  # images per network call (does not change the images)
    shard_size: int  # images per shard: the unit of resuming
    sampler: Literal["sde", "ode-euler", "ode-heun"]
    steps: int  # network evaluations for sde and ode-euler; ode-heun takes two per step
    last_step: float  # SDE only: the final deterministic step, from 1 - last_step to 1
    cfg_scale: float  # 1 means no guidance
    cfg_channels: int  # guidance on the first N latent channels (SiT: 3, REPA: 4)
    cfg_interval: list[float]  # [t_low, t_high] in SiT time: guidance only inside
    grid: int  # images in the PNG grid
    seed: int  # sample i's label and noise depend on (seed, i) only
    precision: Literal["fp32", "bf16"]  # network compute on a GPU (the sampler's state stays fp32)
    device: Literal["auto", "cpu", "cuda"]


class Evaluate(Section):
    inception: str  # "random" (seeded, offline demo), "download", or a local .pth path
    inception_seed: int
    # FID reference: an ADM-format .npz with mu and sigma (e.g. VIRTUAL_imagenet256_labeled.npz,
    # the statistics papers report against), or None: the real images of the encoded dataset
    reference: str | None
    num_real: int | None  # real images for FID without a reference file; None means all
    batch_size: int  # images per Inception call
    seed: int  # picks the num_real subset
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
