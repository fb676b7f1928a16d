"""Every knob of the pipeline, validated before any heavy work starts.

The effective configuration is a preset (``sra2/config/presets/<name>.yaml``) with the sections of
``params.yaml`` laid over it key by key. A preset may name a base (``base: _imagenet``) that it is
laid over the same way, so that presets list only what differs; files whose name starts with ``_``
are bases, not presets. ``params.yaml`` names the preset (``preset: demo``) and
holds only what a run changes, so ``dvc exp run -S preset=sit-b2 -S +train.lr=2e-4`` works.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PRESETS_DIR = Path(__file__).parent / "presets"
SECTIONS = ("launch", "data", "vae", "text", "encode", "model", "align", "repa", "sra", "reg",
            "train", "sample", "evaluate")


class ConfigError(ValueError):
    """A parameter file that names an unknown key, a wrong type or a bad value."""


# Value ranges, so that a bad number stops the stage with its key named before any work starts
Seed = NonNegativeInt  # numpy's generators refuse negative seeds
Time = Annotated[float, Field(ge=0, le=1)]  # SiT time: 0 = noise, 1 = data
# a closed interval of SiT time, [low, high]
Interval = Annotated[list[Time], Field(min_length=2, max_length=2)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam moment decay


def _at_least(value: float, info: ValidationInfo, low: str, key: str) -> float:
    """``value`` must not be below the section's earlier field ``low`` (named ``key`` in the
    message); unchecked when ``low`` itself was invalid, whose own error is reported."""
    if low in info.data and value < info.data[low]:
        raise ValueError(f"must be at least {key} ({info.data[low]!r})")
    return value


class Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion
    # allow_inf_nan: an inf or nan learning rate, decay or scale is always a typo
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class NotInResult:
    """Marks a setting that never changes the bytes a stage computes, only how long, how often,
    how fast or where it runs (``Annotated[int, NotInResult()]``): :func:`result_settings` leaves
    it out of the signatures whose hash names the folders of results."""


def result_settings(section: Section, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``section`` as a dict without its :class:`NotInResult` settings, nor ``exclude`` (a stage's
    own cases, explained where it passes them): what a stage's signature records."""
    marked = {name for name, field in type(section).model_fields.items()
              if any(isinstance(m, NotInResult) for m in field.metadata)}
    return section.model_dump(exclude=marked | set(exclude))


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


class DemoVAE(Section):
    """Training of the demo's VAE on the demo images, by the demo-data stage: the AutoencoderKL of
    vae.random, from its seeded weights, saved where vae.source points (random weights decode
    noise, and SD-VAE cannot be downloaded offline)."""

    steps: PositiveInt  # AdamW steps, the learning rate decaying to zero over them (cosine)
    batch_size: PositiveInt  # crops per step
    # side of the random square crops (a multiple of the downsampling): smaller crops are more
    # images per second, so the first steps learn faster on them
    crop: PositiveInt
    # the last steps see whole images (as many pixels per step as the crops): GroupNorm and the
    # attention then meet whole-image statistics, which crops alone leave blurred and off-colour
    whole_steps: NonNegativeInt
    lr: PositiveFloat  # peak learning rate
    # weight of the KL to N(0, 1) per latent value against the squared error per pixel value:
    # enough to give the posterior std a meaning, too little to blur the reconstructions
    kl_weight: NonNegativeFloat

    @field_validator("whole_steps")
    @classmethod
    def _within_steps(cls, value: int, info: ValidationInfo) -> int:
        if "steps" in info.data and value > info.data["steps"]:
            raise ValueError(f"must be at most data.demo.vae.steps ({info.data['steps']})")
        return value


class DemoText(Section):
    hidden_size: PositiveInt
    layers: PositiveInt
    heads: PositiveInt
    seed: Seed
    # where the demo stage also writes a whole CLIP of this shape (random weights), which
    # evaluate.clip and evaluate.pickscore may name
    clip: Annotated[str, Field(min_length=1)]


class DemoData(Section):
    # one drawn shape or texture per class; data.kind coco: shapes of named colours, at most 6
    classes: Annotated[int, Field(ge=1, le=10)]
    per_class: PositiveInt  # JPEG files per class (coco: per shape)
    min_side: PositiveInt  # image sides are drawn from [min_side, max_side] pixels
    max_side: PositiveInt
    seed: Seed
    vae: DemoVAE | None = None  # when set, the demo stage also trains the demo's VAE on the images
    val_per_class: NonNegativeInt = 0  # data.kind coco: the val split's images per shape
    # data.kind coco: the demo stage writes a CLIP text tower of this shape with seeded RANDOM
    # weights, and a tokenizer of the demo's words, at text.source
    text: DemoText | None = None

    @field_validator("max_side")
    @classmethod
    def _sides_ordered(cls, value: int, info: ValidationInfo) -> int:
        return _at_least(value, info, "min_side", "data.demo.min_side")


class Data(Section):
    # imagefolder: root/<class>/<image>, class index = rank of the folder name (class-conditional,
    # SiT). coco: MS-COCO's layout, root the folder of images and `captions` its captions file
    # (text-to-image, MMDiT); `val_root` and `val_captions` the val split (the captions sampled,
    # the images FID compares with). root must exist for encode unless `demo` is set
    kind: Literal["imagefolder", "coco"] = "imagefolder"
    root: Annotated[str, Field(min_length=1)]
    captions: str | None = None
    val_root: str | None = None
    val_captions: str | None = None
    image_size: PositiveInt  # side of the ADM centre crop the VAE sees (latents are 1/8 of it)
    demo: DemoData | None = None  # when set, the demo stage draws this dataset into `root`

    @model_validator(mode="after")
    def _captions_for_coco(self):
        missing = [k for k in ("captions", "val_root", "val_captions")
                   if self.kind == "coco" and getattr(self, k) is None]
        if missing:
            raise ValueError(f"data.kind coco needs data.{', data.'.join(missing)}")
        return self


class RandomVAE(Section):
    """An AutoencoderKL of this shape with seeded weights; SD-VAE is [128, 256, 512, 512], 2, 32."""

    block_out_channels: Annotated[list[PositiveInt], Field(min_length=1)]
    layers_per_block: PositiveInt
    norm_num_groups: PositiveInt
    seed: Seed

    @field_validator("norm_num_groups")
    @classmethod
    def _groups_divide(cls, value: int, info: ValidationInfo) -> int:
        # GroupNorm splits every block's channels into this many groups
        channels = info.data.get("block_out_channels", [])
        if any(c % value for c in channels):
            raise ValueError(f"must divide every vae.random.block_out_channels ({channels})")
        return value


class VAE(Section):
    source: str  # hub id, local directory, or "random" (seeded weights, offline demo)
    random: RandomVAE | None = None
    scale: PositiveFloat = 0.18215  # latents are multiplied by this before diffusion

    @model_validator(mode="after")
    def _random_needs_shape(self):
        if self.source == "random" and self.random is None:
            raise ValueError("vae.source is 'random' but vae.random (the architecture) is not set")
        return self


class Text(Section):
    """The text encoder of captioned data (data.kind coco): its last hidden state over
    ``max_length`` tokens is a caption's context (U-ViT's and REPA's: CLIP ViT-L/14, 77 x 768)."""

    source: str = "openai/clip-vit-large-patch14"  # hub id or local folder (save_pretrained's)
    max_length: PositiveInt = 77
    captions_per_image: PositiveInt = 5  # the first ones of each image (COCO has 5 to 7)
    # of the stored features; training computes in fp32 (float16 keeps each feature to 2^-11 of
    # its size: tests/test_t2i.py; the samplers round their contexts the same way)
    dtype: Literal["float32", "float16"] = "float16"


class Encode(Section):
    batch_size: Annotated[PositiveInt, NotInResult()]  # images per VAE call
    shard_size: PositiveInt  # images per shard: the unit of writing and of resuming
    chunk_size: PositiveInt  # images per chunk: the unit of random reads
    # processes decoding and cropping JPEGs per rank (0: in the rank itself); auto: the rank's
    # share of the node's cores less one for the rank (sra2.data.encode.decode_workers)
    workers: Annotated[NonNegativeInt | Literal["auto"], NotInResult()]
    dtype: Literal["float32", "float16"]
    precision: Literal["fp32", "bf16", "fp16"]  # VAE compute dtype on a GPU; CPU runs fp32
    flip: bool  # also store the latents of the horizontally flipped image
    pixels: bool = False  # also store the ADM crops as uint8 (what repa needs at training time)
    # stop at the first undecodable file instead of listing it as rejected
    strict: Annotated[bool, NotInResult()]
    # images whose crop shows little of them (sra2.data.images.oddity: shorter side under 32 px,
    # aspect over 4:1): accept encodes them and lists them as warnings (the papers train on every
    # ImageNet image); reject lists them as rejected files, which training skips
    odd_images: Literal["accept", "reject"] = "accept"
    device: Annotated[Literal["auto", "cpu", "cuda"], NotInResult()]  # auto: this rank's GPU if any

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        # one message for any bad value, not one per member of the union
        if value != "auto" and (type(value) is not int or value < 0):
            raise ValueError("must be a number of processes >= 0 or 'auto'")
        return value

    @model_validator(mode="after")
    def _aligned(self):
        if self.shard_size % self.chunk_size:
            raise ValueError(f"encode.shard_size ({self.shard_size}) must be a multiple of "
                             f"encode.chunk_size ({self.chunk_size})")
        return self


class Model(Section):
    # a key of sra2.model.sit.SiT_models ("SiT-B/2", class labels) or of
    # sra2.model.mmdit.MMDiT_models ("MMDiT-D24/2", caption contexts): the family goes with the
    # data
    name: str
    num_classes: PositiveInt  # label num_classes is the null class of classifier-free guidance
    learn_sigma: bool  # 8 output channels as in the official SiT (the second half is unused)
    # probability of training on the null label (MMDiT: on the empty caption's context)
    class_dropout: Annotated[float, Field(ge=0, lt=1)]


class Align(Section):
    enabled: bool
    # 1-based block whose output the projector reads; its range [1, depth of model.name] is checked
    # in one place, sra2.methods.checks (sra2.methods.align keeps its own check for a bare Align)
    layer: int
    depth: PositiveInt  # Linear layers in the projector
    width: PositiveInt | None  # hidden width; None means 2 * hidden size
    loss: Literal["smooth_l1", "l1", "l2", "cosine"]
    beta: NonNegativeFloat  # smooth-L1 transition point (0 is L1)
    weight: NonNegativeFloat  # lambda
    t_min: Time  # alignment loss is zero outside [t_min, t_max] (SiT time, 1 = data)
    t_max: Time
    target: Literal["sample", "mean"]

    @field_validator("t_max")
    @classmethod
    def _interval(cls, value: float, info: ValidationInfo) -> float:
        return _at_least(value, info, "t_min", "align.t_min")


class Repa(Section):
    """REPA (README, "The methods the paper compares with"): the hidden state after block
    ``layer`` (REPA's encoder_depth) through Linear(D, width), SiLU, Linear(width, width), SiLU,
    Linear(width, 768) must match the DINOv2 ViT-B/14 patch tokens of the training image (minus
    the cosine per token). It needs the images: the store must be encoded with encode.pixels."""

    enabled: bool = False
    layer: PositiveInt = 8  # 1-based block; REPA's maintainer used 4 for SiT-B/2
    weight: NonNegativeFloat = 0.5
    width: PositiveInt = 2048  # the projector's hidden width
    # torch.hub's facebookresearch/dinov2 model, a local file of its weights, or "random" (seeded
    # weights of the same architecture: tests and offline demos only)
    encoder: str = "dinov2_vitb14"
    encoder_seed: Seed = 0  # encoder "random" only


class Sra(Section):
    """SRA v1 (README, "The methods the paper compares with"): the EMA model, without gradients,
    sees the same noise and labels at a time moved toward the data by up to t_max x U(0, 1); its
    hidden state after block ``teacher_block`` is the target of the student's after
    ``student_block`` through a head Linear(D, 2D), SiLU, Linear(2D, D)."""

    enabled: bool = False
    student_block: PositiveInt = 3  # SiT-B/2: 3 -> 8; SiT-XL/2: 8 -> 20 (the SRA paper's pairs)
    teacher_block: PositiveInt = 8
    t_max: Time = 0.2
    # the SRA paper's smooth-L1 (beta 0.05, weight 0.2); its repository's later default is a
    # cosine with weight 0.5 over the token axis (cosine_tokens); cosine: over the feature axis
    loss: Literal["smooth_l1", "cosine", "cosine_tokens"] = "smooth_l1"
    beta: NonNegativeFloat = 0.05
    weight: NonNegativeFloat = 0.2
    # constant, or as the SRA repository trains at 256 px: the weight x 0.1^((e - 149) / 1000 + 1)
    # once e, the whole epochs seen (images seen // dataset size), passes 149
    weight_schedule: Literal["constant", "repository"] = "constant"


class Reg(Repa):
    """REG (sra2/methods/reg.py): DINOv2's class token, noised on the latent's path at the same
    time with its own noise, enters the SiT as one more token; the SiT learns its velocity too
    (weight ``cls_weight``), and REPA's projection term (weight ``weight``, after block ``layer``)
    matches the class token and the patch tokens. It needs the images, as REPA does."""

    layer: PositiveInt = 8  # 1-based block; REG's authors used 4 for SiT-B/2, 8 for L/2 and XL/2
    cls_weight: NonNegativeFloat = 0.03  # the class token's velocity loss


class Train(Section):
    # optimizer steps in total; raising it resumes a finished run
    steps: Annotated[PositiveInt, NotInResult()]
    # images per step over all processes; it must split evenly into processes x batch_per_gpu
    # (sra2.methods.checks, with the process count of `launch`)
    global_batch: PositiveInt
    # images per forward/backward on one process; None: global_batch / processes (no accumulation)
    batch_per_gpu: Annotated[PositiveInt | None, NotInResult()] = None
    lr: PositiveFloat  # AdamW, constant
    weight_decay: NonNegativeFloat
    betas: Annotated[list[Beta], Field(min_length=2, max_length=2)]
    ema_decay: Annotated[float, Field(gt=0, lt=1)]  # EMA of the SiT weights, updated every step
    grad_clip: PositiveFloat  # max global gradient norm
    precision: Literal["fp32", "bf16"]  # bf16 autocast on a GPU; losses are computed in fp32
    # steps between checkpoints (the unit of resuming)
    ckpt_every: Annotated[PositiveInt, NotInResult()]
    # also save when this many minutes of wall time have passed since the last save (0: off); rank 0
    # decides, every rank saves at the same step
    ckpt_minutes: Annotated[NonNegativeFloat, NotInResult()] = 30.0
    # step checkpoints kept per run: older ones are deleted once a newer one is complete (written
    # and named by `latest`); files outside the run folder's step-*.pt (snapshots/) are never
    # deleted
    keep_checkpoints: Annotated[PositiveInt, NotInResult()] = 3
    log_every: Annotated[PositiveInt, NotInResult()]  # steps averaged into one row of metrics.csv
    # FID over training: every eval_every steps (0: off) the EMA is kept as snapshots/step-N.pt and
    # eval_samples images sampled from it (the sample section's sampler) are scored into fid.csv
    eval_every: Annotated[NonNegativeInt, NotInResult()] = 0
    eval_samples: Annotated[PositiveInt, NotInResult()] = 10000
    seed: Seed
    device: Annotated[Literal["auto", "cpu", "cuda"], NotInResult()]
    # a step whose loss or gradient is not finite: stop the run before saving it; skip its update
    # (and its EMA step) and go on; or rewind to the last checkpoint and take the steps since with
    # other draws (recorded in the checkpoints, so a resume replays them). Either stops once
    # nonfinite_max steps met it within the last nonfinite_window steps. Not in the signature: a
    # run stopped by a NaN resumes in its own folder under skip or rewind (nonfinite.csv: each)
    nonfinite: Annotated[Literal["stop", "skip", "rewind"], NotInResult()] = "stop"
    nonfinite_max: Annotated[PositiveInt, NotInResult()] = 10
    nonfinite_window: Annotated[PositiveInt, NotInResult()] = 1000
    # processes reading latents ahead of the step
    workers: Annotated[NonNegativeInt, NotInResult()] = 2
    # where the latents are read from: "copy", a node-local, uncompressed, memory-mapped copy of the
    # store made once per node and checked at every start (sra2.data.latent_copy), or "store", the
    # zarr store itself (decompressing chunk by chunk: ~1,000 latents/s per reader)
    read_from: Annotated[Literal["copy", "store"], NotInResult()] = "copy"
    # folder of the node-local copies; None: $SRA2_COPY_DIR, else $TMPDIR, else /tmp
    copy_dir: Annotated[str | None, NotInResult()] = None
    compile: Annotated[bool, NotInResult()] = False  # torch.compile the model and its loss
    # torch.use_deterministic_algorithms with cuBLAS's fixed workspace: a GPU run then repeats bit
    # for bit (bench/gpu.py measures what it costs); the CPU's kernels are deterministic already
    deterministic: Annotated[bool, NotInResult()] = False


class Ralu(Section):
    """RALU (sample.sampler: ralu; sra2.sample.ralu, arXiv 2507.08422): Euler ODE steps in three
    stages, half-size latent, then its most edged tokens at full size, then all of it; at each
    stage's end the upsampled tokens are re-noised to match their noise level ("noise-timestep
    matching"). The defaults are the published FLUX-5x ends and top_k on SiT's uniform step grid
    (shifts 1) with 50 evaluations, and c = 1/4 (the published 0.0177, fitted to FLUX's shifted
    schedule, re-noises almost to pure noise and did worse on the demo: bench/README.md)."""

    # Euler steps of stages 1, 2, 3; 0 skips a stage (stage 1 only with top_k 1: no edges)
    steps: Annotated[list[NonNegativeInt], Field(min_length=3, max_length=3)] = [20, 10, 20]
    # SiT times where stages 1 and 2 end (stage 3 ends at 1)
    ends: Annotated[list[Annotated[float, Field(gt=0, lt=1)]],
                    Field(min_length=2, max_length=2)] = [0.3, 0.45]
    # per stage, the step grid's time shift h (1: uniform, SiT's; the RALU paper's g(sigma))
    shifts: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)] = [1.0, 1.0, 1.0]
    # noise-timestep matching: the correlation left in the noise of 4 copied children,
    # 0 < c <= 1/4; the sampler restarts at t = e / ((1 - e) / sqrt(c) + e) (e 0.3: 0.18 with
    # c = 1/4, 0.054 with FLUX's 0.0177)
    c: Annotated[float, Field(gt=0, le=0.25)] = 0.25
    top_k: Annotated[float, Field(gt=0, le=1)] = 0.2  # share of tokens upsampled in stage 2
    # position embedding of a half-size token: at the centre of its 2x2 full-size block, in the
    # full grid's units (centres), or on a grid of half the size (half)
    positions: Literal["centres", "half"] = "centres"
    # OpenCV Canny's low and high thresholds on the decoded grey image (the published ones)
    canny: Annotated[list[NonNegativeInt], Field(min_length=2, max_length=2)] = [100, 200]

    @field_validator("ends")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if value[0] >= value[1]:
            raise ValueError("must be [stage 1 end, stage 2 end] with stage 1 ending first")
        return value

    @field_validator("steps")
    @classmethod
    def _last_stage(cls, value: list[int]) -> list[int]:
        if value[2] < 1:
            raise ValueError("stage 3 (full size, to t = 1) needs at least one step")
        return value

    @field_validator("top_k")
    @classmethod
    def _edges_need_stage_1(cls, value: float, info: ValidationInfo) -> float:
        if "steps" in info.data and info.data["steps"][0] == 0 and value != 1:
            raise ValueError("must be 1 when stage 1 is skipped (steps[0] = 0): the edges come "
                             "from stage 1's estimate")
        return value


class Sample(Section):
    num_samples: PositiveInt  # of one set
    # sets of num_samples images, each with its own seeds (sample i of all seeds x num_samples
    # depends on (seed, i)): evaluate scores each set, and their spread is the sampling noise
    seeds: PositiveInt = 1
    batch_size: Annotated[PositiveInt, NotInResult()]  # images per network call
    shard_size: PositiveInt  # images per shard: the unit of resuming
    sampler: Literal["sde", "ode-euler", "ode-heun", "ralu"]
    # network evaluations for sde and ode-euler; ode-heun takes two per step; ralu: ralu.steps
    steps: PositiveInt
    # SDE only: the final deterministic step, from 1 - last_step to 1 (0 would divide by 1 - t = 0)
    last_step: Annotated[float, Field(gt=0, lt=1)]
    cfg_scale: float  # 1 means no guidance
    # guidance on the first N of the VAE's 4 latent channels (SiT: 3, REPA: 4)
    cfg_channels: Annotated[int, Field(ge=1, le=4)]
    # [t_low, t_high] in SiT time (1 = data): guidance only inside. REPA's --guidance-low/-high are
    # in its reversed time, so [low, high] there is [1 - high, 1 - low] here: REPA's
    # --guidance-high 0.7 (no guidance on the noisiest 30%) is cfg_interval [0.3, 1.0]
    cfg_interval: Interval
    # time convention of the weights: sit (t = 1 is data, predicts x1 - x0) or repa (REPA and the
    # SRA code on it: t = 1 is noise, predicts eps - x, run here as v(x, t) = -v_repa(x, 1 - t));
    # auto tells them apart by the file's layout (sra2.model.sit.detect_convention) and stops with
    # an error where the layout cannot say (e.g. a bare state_dict of a 4-channel network)
    convention: Literal["auto", "sit", "repa"] = "auto"
    ralu: Ralu = Ralu()  # sampler ralu only
    grid: Annotated[PositiveInt, NotInResult()]  # images in the PNG grid (the first ones)
    seed: Seed  # sample i's label and noise depend on (seed, i) only
    # class labels: uniform random in [0, num_classes) (SiT, REPA), or balanced: num_samples //
    # num_classes of each class (the rest to distinct seeded classes), in a seeded random order
    labels: Literal["uniform", "balanced"]
    precision: Literal["fp32", "bf16"]  # network compute on a GPU (the sampler's state stays fp32)
    device: Annotated[Literal["auto", "cpu", "cuda"], NotInResult()]

    @property
    def total(self) -> int:
        """The images drawn: every set."""
        return self.seeds * self.num_samples

    @field_validator("cfg_interval")
    @classmethod
    def _ordered(cls, value: list[float]) -> list[float]:
        # low > high would turn guidance off without a word
        if value[0] > value[1]:
            raise ValueError("must be [low, high] with low <= high")
        return value


class Evaluate(Section):
    inception: str  # "random" (seeded, offline demo), "download", or a local .pth path
    inception_seed: Seed
    # an ADM reference batch (VIRTUAL_imagenet256_labeled.npz, what papers report against): mu,
    # sigma (FID), mu_s, sigma_s (sFID) and its images arr_0 (precision/recall), or None: the
    # real images of the encoded dataset for all of them (and for precision/recall without arr_0)
    reference: str | None
    num_real: PositiveInt | None  # real images used where the reference is the dataset; None: all
    batch_size: PositiveInt  # images per Inception call
    seed: Seed  # picks the num_real subset, and the bootstrap's resamples
    device: Literal["auto", "cpu", "cuda"]
    # resamples of the generated images' features behind each number's interval (0: none)
    bootstrap: NonNegativeInt = 100
    # text to image (data.kind coco): the CLIP of the CLIP score (model and processor), and
    # PickScore's model and processor; hub ids or local folders
    clip: str = "openai/clip-vit-large-patch14"
    pickscore: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class Config(Section):
    preset: str
    launch: Launch = Launch()
    data: Data
    vae: VAE
    text: Text = Text()
    encode: Encode
    model: Model
    align: Align
    repa: Repa = Repa()
    sra: Sra = Sra()
    reg: Reg = Reg()
    train: Train
    sample: Sample
    evaluate: Evaluate


def available_presets() -> list[str]:
    """The presets params.yaml may name: sra2/config/presets/*.yaml but the bases (``_*.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_chain(name: str) -> list[str]:
    """The files preset ``name`` is made of, its bases first: ``["_imagenet", "sit-b2"]``."""
    chain = [name]
    while True:
        path = PRESETS_DIR / f"{chain[0]}.yaml"
        base = _read_yaml(path).get("base")
        if base is None:
            return chain
        if not isinstance(base, str) or not (PRESETS_DIR / f"{base}.yaml").is_file():
            bases = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            raise ConfigError(f"{path}: base must name a file of {PRESETS_DIR} (one of {bases}), "
                              f"got {base!r}")
        if base in chain:
            raise ConfigError(f"{path}: base {base!r} makes a cycle: "
                              f"{' -> '.join(reversed(chain))} -> {base}")
        chain.insert(0, base)


def read_preset(name: str) -> dict[str, Any]:
    """Preset ``name`` with its bases laid under it key by key (the ``base`` keys dropped)."""
    merged: dict[str, Any] = {}
    for part in preset_chain(name):
        layer = _read_yaml(PRESETS_DIR / f"{part}.yaml")
        layer.pop("base", None)
        merged = _overlay(merged, layer)
    return merged


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
            # our validators' messages read as the rest without pydantic's "Value error, "
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {e['input']!r})")
    return ConfigError(f"invalid parameters in {source}:\n" + "\n".join(lines))


def resolve(params: dict[str, Any], source: str = "params") -> Config:
    """Lay ``params`` over the preset it names and validate the result."""
    params = dict(params)
    name = params.pop("preset", None)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: 'preset' must name one of {available_presets()}, "
                          f"got {name!r}")
    if name not in available_presets():
        raise ConfigError(f"{source}: unknown preset {name!r}; choose one of {available_presets()}")
    for section, value in params.items():
        if section not in SECTIONS:
            raise ConfigError(f"invalid parameters in {source}:\n  {section}: unknown key "
                              f"(sections are: preset, {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"invalid parameters in {source}:\n  {section}: expected a mapping "
                              f"of keys, got {value!r}")
    merged = _overlay(read_preset(name), params)
    try:
        return Config.model_validate({"preset": name, **merged})
    except ValidationError as e:
        raise _explain(e, source) from None


def apply_overrides(params: dict, overrides: Iterable[str]) -> dict:
    """params.yaml's mapping with `-S`-style overrides (`[+|++]section.key=value`) applied."""
    params = copy.deepcopy(params)
    for override in overrides:
        key, sep, text = override.lstrip("+").partition("=")
        if not sep or not key:
            raise ValueError(f"-S {override!r}: expected KEY=VALUE")
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"-S {override!r}: {part} is not a section")
        node[last] = yaml.safe_load(text)
    return params


def load(path: str | Path = "params.yaml") -> Config:
    return resolve(_read_yaml(Path(path)), str(path))
