"""The protocol every published number of the papers compared here follows (FID-50K of ImageNet
256x256 against ADM's reference batch with ADM's evaluator, SDE Euler-Maruyama with 250 steps,
uniform random labels; for the text-to-image run, REPA's MS-COCO protocol), and the reasons a
run's numbers fall outside it.
"""

from __future__ import annotations

from sra2.config.params import Config, preset_chain

SAMPLES, SAMPLER, STEPS, IMAGE_SIZE = 50_000, "sde", 250, 256
REFERENCE = "VIRTUAL_imagenet256_labeled.npz"  # ADM's ImageNet 256x256 reference batch
REFERENCE_HOW = (f"download ADM's {REFERENCE} (guided-diffusion's evaluations README links it) "
                 f"and set evaluate.reference to its path")


def not_comparable(cfg: Config, guided: bool = False) -> list[str]:
    """Every reason the numbers of a run with ``cfg`` cannot sit beside the paper's (none: they
    can); ``guided``: whether the number it is compared with was measured with guidance. Its
    text-to-image numbers follow their own protocol (:func:`text_to_image`)."""
    if cfg.data.kind == "coco":
        return text_to_image(cfg)
    sc, ec = cfg.sample, cfg.evaluate
    why = []
    if ec.reference is None:
        why.append(f"FID against our crops of the training set, not ADM's reference batch "
                   f"(evaluate.reference: {REFERENCE})")
    why += _inception(cfg)
    if sc.num_samples < SAMPLES:
        why.append(f"{sc.num_samples:,} samples, not {SAMPLES:,} (sample.num_samples)")
    if sc.labels != "uniform":
        why.append(f"labels {sc.labels}, not uniform random (sample.labels)")
    if (sc.sampler, sc.steps) != (SAMPLER, STEPS):
        why.append(f"sampler {sc.sampler} with {sc.steps} steps, not {SAMPLER} with {STEPS} "
                   f"(sample.sampler, sample.steps)")
    if (sc.cfg_scale != 1.0) != guided:
        why.append(f"guidance scale {sc.cfg_scale} against a number measured "
                   f"{'with' if guided else 'without'} guidance (sample.cfg_scale)")
    return why + _vae_and_size(cfg)


def _inception(cfg: Config) -> list[str]:
    if cfg.evaluate.inception == "random":
        return ["random Inception weights (evaluate.inception: random)"]
    return []


def _vae_and_size(cfg: Config) -> list[str]:
    why = []
    if cfg.vae.source == "random":
        why.append("a random-weight VAE, not SD-VAE (vae.source: random)")
    if cfg.data.image_size != IMAGE_SIZE:
        why.append(f"{cfg.data.image_size} px images, not {IMAGE_SIZE} (data.image_size)")
    return why


# REPA's text-to-image protocol (its generate_t2i.py), which the paper's MS-COCO run follows: one
# random caption of each val image, 40,192 of them, Euler ODE with 50 steps, guidance 1.5 on every
# channel at every step; CLIP ViT-L/14's text features; PickScore's own model
T2I = {"samples": 40_192, "sampler": "ode-euler", "steps": 50, "cfg_scale": 1.5,
       "text": "openai/clip-vit-large-patch14", "pickscore": "yuvalkirstain/PickScore_v1"}


def text_to_image(cfg: Config) -> list[str]:
    """The reasons a text-to-image run's numbers fall outside :data:`T2I`."""
    sc, ec = cfg.sample, cfg.evaluate
    why = _inception(cfg)
    if ec.reference is None and ec.num_real is not None:
        why.append(f"FID against {ec.num_real:,} val images, not all of them (evaluate.num_real)")
    if sc.num_samples < T2I["samples"]:
        why.append(f"{sc.num_samples:,} samples, not {T2I['samples']:,} (sample.num_samples)")
    if (sc.sampler, sc.steps) != (T2I["sampler"], T2I["steps"]):
        why.append(f"sampler {sc.sampler} with {sc.steps} steps, not {T2I['sampler']} with "
                   f"{T2I['steps']} (sample.sampler, sample.steps)")
    if (sc.cfg_scale, sc.cfg_channels, sc.cfg_interval) != (T2I["cfg_scale"], 4, [0.0, 1.0]):
        why.append(f"guidance {sc.cfg_scale} on {sc.cfg_channels} channels in {sc.cfg_interval}, "
                   f"not {T2I['cfg_scale']} on all 4 at every step (sample.cfg_scale, "
                   "cfg_channels, cfg_interval)")
    if cfg.text.source != T2I["text"]:
        why.append(f"text encoder {cfg.text.source}, not {T2I['text']} (text.source)")
    if ec.pickscore != T2I["pickscore"]:
        why.append(f"PickScore from {ec.pickscore}, not {T2I['pickscore']} (evaluate.pickscore)")
    return why + _vae_and_size(cfg)


def reference_missing(cfg: Config) -> str | None:
    """One line for a paper preset (one made on the ImageNet base) without ADM's reference batch:
    its FIDs will not be comparable, and how to make them so."""
    if (cfg.evaluate.reference is not None or cfg.data.kind != "imagefolder"
            or "_imagenet" not in preset_chain(cfg.preset)):
        return None
    return (f"preset {cfg.preset} has no evaluate.reference: its FIDs are against our crops of the "
            f"training set, not comparable with the paper's; {REFERENCE_HOW}")
