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
SECTIONS = ("launch", "data", "vae", "encode", "model", "align", "train", "sample", "evaluate")


class ConfigError(ValueError):
    """A parameter file that names an unknown key, a wrong type or a bad value."""


class Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Launch(Section):
    """Worker processes of the GPU stages, started by torch.distributed.run (torchrun's engine).

    Unset keys come from Slurm's environment when the stage runs inside a Slurm job, else from
    the defaults (one node). None of them changes what a stage computes, only where.
    """

    nproc_per_node: int | Literal["auto"] = "auto"  # auto: the GPUs visible, 1 without a GPU
    nnodes: int | None = None  # None: SLURM_NNODES, else 1
    node_rank: int | None = None  # None: SLURM_NODEID, else 0
    rdzv_endpoint: str | None = None  # host:port of node 0; None: first Slurm node:29500
    max_restarts: int = 0  # torchrun restarts all workers this often after a failure (they resume)


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
    # images per forward/backward on one process; None: global_batch / processes (no accumulation)
    batch_per_gpu: int | None = None
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
    workers: int = 2  # processes reading latents from the store ahead of the training step
    compile: bool = False  # torch.compile the model and its loss


class Sample(Section):
    num_samples: int
    batch_size: int  # images per network call (does not change the images)
    shard_size: int  # images per shard: the unit of resuming
    sampler: Literal["sde", "ode-euler", "ode-heun"]
    steps: int  # network evaluations for sde and ode-euler; ode-heun takes two per step
    last_step: float  # SDE only: the final deterministic step, from 1 - last_step to 1
    cfg_scale: float  # 1 means no guidance
    cfg_channels: int  # guidance on the first N latent channels (SiT: 3, REPA: 4)
    # [t_low, t_high] in SiT time (1 = data): guidance only inside. REPA's --guidance-low/-high are
    # in its reversed time, so [low, high] there is [1 - high, 1 - low] here: REPA's
    # --guidance-high 0.7 (no guidance on the noisiest 30%) is cfg_interval [0.3, 1.0]
    cfg_interval: list[float]
    # time convention of the weights: sit (t = 1 is data, predicts x1 - x0) or repa (REPA and the
    # SRA code on it: t = 1 is noise, predicts eps - x, run here as v(x, t) = -v_repa(x, 1 - t));
    # auto tells them apart by the file's layout (sra2.models.detect_convention) and stops with an
    # error where the layout cannot say (e.g. a bare state_dict of a 4-channel network)
    convention: Literal["auto", "sit", "repa"] = "auto"
    grid: int  # images in the PNG grid
    seed: int  # sample i's label and noise depend on (seed, i) only
    # class labels: uniform random in [0, num_classes) (SiT, REPA), or balanced: num_samples //
    # num_classes of each class (the rest to distinct seeded classes), in a seeded random order
    labels: Literal["uniform", "balanced"]
    precision: Literal["fp32", "bf16"]  # network compute on a GPU (the sampler's state stays fp32)
    device: Literal["auto", "cpu", "cuda"]


class Evaluate(Section):
    inception: str  # "random" (seeded, offline demo), "download", or a local .pth path
    inception_seed: int
    # an ADM reference batch (VIRTUAL_imagenet256_labeled.npz, what papers report against): mu,
    # sigma (FID), mu_s, sigma_s (sFID) and its images arr_0 (precision/recall), or None: the
    # real images of the encoded dataset for all of them (and for precision/recall without arr_0)
    reference: str | None
    num_real: int | None  # real images used where the reference is the dataset; None means all
    batch_size: int  # images per Inception call
    seed: int  # picks the num_real subset
    device: Literal["auto", "cpu", "cuda"]


class Config(Section):
    preset: str
    launch: Launch = Launch()
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
