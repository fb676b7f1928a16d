"""The checks on parameters that one section cannot make alone: they need another section, the
model registry, the process count or the stage that runs. The stage flows make them before
Prefect starts and before any data loads, so that a bad value costs seconds, with its key named.

sra2.config.params checks each value on its own (types, ranges, intervals) when the file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sra2.config.params import Config, ConfigError, apply_overrides, resolve

SD_VAE_DOWNSAMPLING = 8  # the SD-VAE (hub and local weights of this pipeline) halves 3 times


def _problem(key: str, message: str, value) -> str:
    """One line in sra2.config.params's style: the dotted key, what is wrong, the value."""
    return f"{key}: {message} (got {value!r})"


def model_problems(cfg: Config) -> list[str]:
    """model.name, and data.image_size against the SiT it names. The training methods' own
    checks are :func:`sra2.methods.registry.problems`: the stages that need the methods pass them
    (``more``), so that no other stage depends on the methods' code."""
    # the registry itself, not a copy of its table, so that a size added there is known here;
    # its torch import is paid anyway where launch counts the GPUs
    from sra2.model.networks import MODELS, family

    if cfg.model.name not in MODELS:
        return [_problem("model.name", f"not a known network; choose one of {sorted(MODELS)}",
                         cfg.model.name)]
    arch = MODELS[cfg.model.name].keywords  # depth, patch_size, ...
    problems = []
    # captions condition an MMDiT, class labels a SiT
    wanted = {"coco": "mmdit", "imagefolder": "sit"}[cfg.data.kind]
    if family(cfg.model.name) != wanted:
        problems.append(_problem("model.name", f"data.kind {cfg.data.kind} trains "
                                 f"{'an MMDiT' if wanted == 'mmdit' else 'a SiT'}; choose one of "
                                 f"{sorted(n for n in MODELS if family(n) == wanted)}",
                                 cfg.model.name))
    # the VAE turns an image_size crop into image_size / downsampling latent pixels, which the
    # SiT cuts into patch_size squares
    vae = cfg.vae.random
    down = 2 ** (len(vae.block_out_channels) - 1) if vae is not None else SD_VAE_DOWNSAMPLING
    step = down * arch["patch_size"]
    if cfg.data.image_size % step:
        problems.append(_problem("data.image_size", f"must be a multiple of {step} (the VAE's "
                                 f"downsampling {down} x the patch size of {cfg.model.name})",
                                 cfg.data.image_size))
    elif cfg.sample.sampler == "ralu" and wanted == "mmdit":
        problems.append(_problem("sample.sampler", "ralu samples a SiT's token sets; an MMDiT "
                                 "takes captions beside them: use sde, ode-euler or ode-heun",
                                 cfg.sample.sampler))
    elif cfg.sample.sampler == "ralu" and (cfg.data.image_size // step) % 2:
        problems.append(_problem("sample.sampler", "ralu needs an even number of tokens per side "
                                 f"(it halves the token grid); data.image_size / {step} is odd",
                                 cfg.sample.sampler))
    return problems


def data_problems(cfg: Config) -> list[str]:
    demo = cfg.data.demo
    if demo is not None and cfg.data.kind == "imagefolder" and demo.classes > cfg.model.num_classes:
        # a label beyond num_classes would index past the class embedding
        return [_problem("data.demo.classes", f"must be at most model.num_classes "
                         f"({cfg.model.num_classes})", demo.classes)]
    return []


def split_problems(cfg: Config, world: int) -> list[str]:
    """train.global_batch against the processes (the rule of sra2.train.loop.micro_batches)."""
    tc = cfg.train
    per_step = world * (tc.batch_per_gpu or 1)
    if tc.global_batch % per_step == 0:
        return []
    if tc.batch_per_gpu is None:
        need = f"a multiple of the {world} worker process(es) (launch.nproc_per_node x nnodes)"
    else:
        need = (f"a multiple of {world} worker process(es) x train.batch_per_gpu "
                f"({tc.batch_per_gpu}) = {per_step}")
    return [_problem("train.global_batch", f"must be {need}", tc.global_batch)]


def path_problems(cfg: Config, stage: str) -> list[str]:
    """Files and folders the stage reads that no earlier stage makes."""
    problems = []
    # with data.demo set, the demo-data stage draws the images into data.root before encode
    if stage == "encode" and cfg.data.demo is None and not Path(cfg.data.root).is_dir():
        problems.append(_problem("data.root", "no such folder; point it at an ImageFolder "
                                 "(root/<class>/<image>) or set data.demo", cfg.data.root))
    ec = cfg.evaluate
    if stage == "evaluate":
        if ec.reference is not None and not Path(ec.reference).is_file():
            problems.append(_problem("evaluate.reference", "no such file", ec.reference))
        if ec.inception not in ("random", "download") and not Path(ec.inception).is_file():
            problems.append(_problem("evaluate.inception", "no such file; use random, download "
                                     "or the path of a weights file", ec.inception))
    return problems


def check(cfg: Config, stage: str, world: int, source: str = "params",
          more: Callable[[Config], list[str]] | None = None) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for ``stage`` run on ``world``
    processes (launch.nproc_per_node x nnodes), and those ``more`` finds; ``source`` names the
    parameter file."""
    problems = model_problems(cfg) + data_problems(cfg) + path_problems(cfg, stage)
    if more is not None:
        problems += more(cfg)
    if stage == "train":
        problems += split_problems(cfg, world)
    _raise_for(problems, source)


def with_overrides(params: dict, overrides: list[str], source: str,
                   more: Callable[[Config], list[str]]) -> Config:
    """``params`` (params.yaml's content) with ``overrides`` (``key=value``, as ``dvc exp run -S``
    takes them), resolved and checked across sections and by ``more`` (the methods' checks): what
    a queued experiment meets in its stages, known before anything is queued. ConfigError naming
    the keys otherwise."""
    cfg = resolve(apply_overrides(params, overrides), source)
    _raise_for(model_problems(cfg) + data_problems(cfg) + more(cfg), source)
    return cfg


def _raise_for(problems: list[str], source: str) -> None:
    if problems:
        raise ConfigError(f"invalid parameters in {source}:\n" +
                          "\n".join(f"  {p}" for p in problems))
