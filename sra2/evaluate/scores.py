"""The evaluate stage's numbers: FID, sFID, Inception Score, precision and recall of each sample
set (:mod:`sra2.evaluate.metrics`, as ADM computes them), their mean over the sets, each with its
noise (:mod:`sra2.evaluate.noise`), and whether they can sit beside the paper's
(:mod:`sra2.evaluate.protocol`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from sra2.config.params import Config
from sra2.evaluate import noise, protocol
from sra2.evaluate.metrics import (
    ArrayImages,
    adm_metrics,
    feature_function,
    load_reference,
    real_files,
    reference_keys,
    reference_side,
)
from sra2.evaluate.text_scores import caption_scores
from sra2.model import text as text_lib
from sra2.runtime import dist
from sra2.sample.outputs import read_npz_captions, read_npz_images

NUMBERS = ("fid", "sfid", "inception_score", "precision", "recall")


def _reference_size(cfg: Config, latents: str | Path) -> int:
    """How many images :func:`reference_side` sends through Inception (a progress total)."""
    ec = cfg.evaluate
    images = load_reference(ec.reference, reference_keys(cfg))["images"] if ec.reference else None
    if images is not None:
        return len(images)
    return len(real_files(cfg, latents))


def _counter(progress: Callable[[int, int], None], total: int) -> Callable[[int], None]:
    """Adds up the images of each batch and calls ``progress(done, total)``; says 0 at once."""
    done = 0

    def seen(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    progress(0, total)
    return seen


def evaluate(cfg: Config, samples: str | Path, latents: str | Path,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """The numbers of the ADM ``.npz`` at ``samples`` (``sample.seeds`` sets of
    ``sample.num_samples`` images, one after the other), against ``evaluate.reference`` (an ADM
    reference batch) or the real images of the encoded dataset: each number the mean over the sets,
    its noise (``<number>_noise``), each set's numbers (``sets``, with several), and
    ``comparable`` with the reasons ``why`` not (joined by "; "). ``progress(done, total)``
    counts the images (samples, then reference) through Inception."""
    ec, sets = cfg.evaluate, cfg.sample.seeds
    device = dist.device(ec.device)
    fakes = ArrayImages(read_npz_images(samples))
    if len(fakes) % sets:
        raise ValueError(f"{samples}: {len(fakes)} images do not split into sample.seeds = {sets} "
                         f"sets")
    seen = _counter(progress, len(fakes) + _reference_size(cfg, latents)) if progress else None
    with tempfile.TemporaryDirectory() as scratch:
        features = feature_function(cfg, device, Path(scratch), seen)
        fake = features(fakes)
        reference = reference_side(cfg, latents, features)
    size = len(fakes) // sets
    parts = [{k: v[j * size:(j + 1) * size] for k, v in fake.items()} for j in range(sets)]
    scored = [adm_metrics(part, reference, device) for part in parts]
    result = {k: float(np.mean([s[k] for s in scored])) for k in NUMBERS}
    warned = [line for s in scored for line in s.get("warnings", [])]
    result.update(noise_of(scored, parts[0], reference, ec, device))
    said = read_npz_captions(samples)
    if said is not None:  # text to image: how well each set shows its captions
        result.update(caption_means(caption_scores(cfg, fakes.images, said, device), sets))
        result["caption_scorers"] = (f"CLIP score: {text_lib.describe(ec.clip)}; PickScore: "
                                     f"{text_lib.describe(ec.pickscore)}")
    note = (f"RANDOM Inception weights (seed {ec.inception_seed}): not comparable to any paper"
            if ec.inception == "random" else "torch-fidelity InceptionV3 (TF-ported) weights")
    why = protocol.not_comparable(cfg)
    return {**result, **({"sets": scored} if sets > 1 else {}),
            **({"warnings": warned} if warned else {}), "comparable": not why,
            "why": "; ".join(why),  # one string: dvc exp show and metrics show drop lists
            "num_samples": size, "fid_reference": reference["fid_reference"],
            "pr_reference": reference["pr_reference"], "inception_weights": note,
            "preset": cfg.preset}


def caption_means(per_sample: dict[str, np.ndarray], sets: int) -> dict:
    """Each caption score's mean over the samples (the mean of the sets' means) and
    ``<name>_noise``: the sd of that mean, from the first set's standard error and the sets'
    spread (:func:`sra2.evaluate.noise.noise_of_mean`)."""
    out = {}
    for name, values in per_sample.items():
        means = values.reshape(sets, -1).mean(1)
        first = values[: len(values) // sets]
        error = float(first.std(ddof=1) / np.sqrt(len(first)))
        seeds_sd = float(np.std(means, ddof=1)) if sets > 1 else None
        out[name] = float(means.mean())
        out[f"{name}_noise"] = {"sd": noise.noise_of_mean(error, seeds_sd, sets),
                                "standard_error": error, "seeds_sd": seeds_sd}
    return out


def noise_of(scored: list[dict], first: dict, reference: dict, ec, device) -> dict:
    """``<number>_noise`` of each bootstrapped number: the standard deviation ``sd`` of the mean
    over the sets (:func:`sra2.evaluate.noise.noise_of_mean`), from the bootstrap of the first set
    (``bootstrap_sd``, its 95% ``bootstrap_interval``) and the sets' spread (``seeds_sd``, None
    with one set)."""
    if not ec.bootstrap and len(scored) == 1:
        return {}
    boot = noise.bootstrap(first, reference, ec.bootstrap, ec.seed, device) if ec.bootstrap \
        else {}
    out = {}
    for name in noise.BOOTSTRAPPED:
        values = [s[name] for s in scored]
        seeds_sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
        own = boot.get(name, {"sd": None, "interval": None})
        out[f"{name}_noise"] = {
            "sd": noise.noise_of_mean(own["sd"] or 0.0, seeds_sd, len(values)),
            "bootstrap_sd": own["sd"], "bootstrap_interval": own["interval"],
            "seeds_sd": seeds_sd}
    return out
