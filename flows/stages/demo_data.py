"""demo-data stage: draw the demo preset's ImageFolder of JPEG files (shapes and textures), and
with data.demo.vae set, train the demo's VAE on them and save it where vae.source points.

Presets that read a real dataset (data.demo unset) write only a note saying so.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

from PIL import Image

from flows.harness.common import entry, parse, table
from flows.harness.progress import InProcessProgress
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config
from sra2.runtime import atomic

GRID_IMAGES = 32  # real images in the reconstruction check, spread over the classes


def _png(picture) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def train_vae(cfg: Config) -> None:
    """Train the demo's VAE on the drawn images, save it at vae.source with training.json (how it
    was made) and reconstructions.png (real images above what it gives back for them)."""
    from sra2.data import demo
    from sra2.data.captions import listing
    from sra2.data.images import load_crops

    knobs, folder, listed = cfg.data.demo.vae, Path(cfg.vae.source), listing(cfg).images
    images = load_crops(listed, cfg.data.image_size)
    print(f"training the demo VAE on {len(images)} images: {knobs.steps} steps, of "
          f"{knobs.batch_size} crops of {knobs.crop} px, the last {knobs.whole_steps} of whole "
          "images")
    progress = InProcessProgress("demo-vae-progress",
                                 f"training the demo VAE on {len(images)} images")
    start = time.monotonic()
    vae = demo.train_demo_vae(images, cfg.vae, knobs, progress)
    seconds = time.monotonic() - start
    stats = demo.latent_statistics(vae, images)
    # no timings in the files: the stage's outputs are the same bytes on every run
    info = {"description": f"VAE trained {knobs.steps} steps on the {len(images)} demo images "
                           "(not SD-VAE)", "steps": knobs.steps, "images": len(images),
            "architecture": cfg.vae.random.model_dump(), "training": knobs.model_dump(), **stats}
    demo.save_trained_vae(vae, folder, round(stats["suggested_scale"], 4), info)
    grid = demo.reconstruction_grid(vae, load_crops(listed, cfg.data.image_size, GRID_IMAGES))
    atomic.write_bytes(folder / "reconstructions.png", _png(grid))
    print(f"trained in {seconds:.0f} s: reconstruction error {stats['l1_grey_levels']:.1f} grey "
          f"levels (PSNR {stats['psnr_db']:.1f} dB), latent std {stats['latent_std']:.3f}; "
          f"saved to {folder} (reconstructions.png shows real images above their decodings)")
    scaled = cfg.vae.scale * stats["latent_std"]
    if not 0.5 <= scaled <= 2.0:
        print(f"WARNING: vae.scale ({cfg.vae.scale}) gives latents of std {scaled:.2f}; the SiT "
              f"expects about 1: set vae.scale to {stats['suggested_scale']:.4f}")
    table("demo-vae", {"seconds": round(seconds, 1), **stats}, info["description"])


def write_captioned_demo(cfg: Config) -> None:
    """The text-to-image demo: its train and val splits in COCO's layout, its text encoder at
    text.source and a CLIP at data.demo.text.clip (random weights both)."""
    from sra2.data.captions import demo_vocabulary, write_demo_split
    from sra2.model.text import describe, write_demo_clip, write_demo_encoder

    data, demo = cfg.data, cfg.data.demo
    for split, root, captions, count in (("train", data.root, data.captions, demo.per_class),
                                          ("val", data.val_root, data.val_captions,
                                           demo.val_per_class)):
        n = write_demo_split(root, captions, demo.classes, count, demo.min_side, demo.max_side,
                             demo.seed, split)
        print(f"wrote {n} captioned JPEG files ({split}) under {root}, captions in {captions}")
    knobs, words = demo.text, demo_vocabulary()
    write_demo_encoder(cfg.text.source, words, knobs.hidden_size, knobs.layers, knobs.heads,
                       cfg.text.max_length, knobs.seed)
    print(f"wrote the {describe(cfg.text.source)} at {cfg.text.source}")
    # what the CLIP score and PickScore read: the same shape, random weights too
    write_demo_clip(knobs.clip, words, knobs.hidden_size, knobs.layers, knobs.heads,
                    data.image_size, knobs.seed)
    print(f"wrote the {describe(knobs.clip)} at {knobs.clip}")


@stage_flow("demo-data")
def demo_data_flow(cfg: Config, out: str) -> None:
    from sra2.data.demo import write_demo_dataset

    demo = cfg.data.demo
    shutil.rmtree(out, ignore_errors=True)
    if demo is None:
        atomic.write_text(Path(out) / "README.txt",
                          f"preset {cfg.preset} reads data.root={cfg.data.root}; no demo data\n")
        print(f"preset {cfg.preset} has no demo dataset; encode reads {cfg.data.root}")
        return
    if cfg.data.kind == "coco":
        write_captioned_demo(cfg)
    else:
        n = write_demo_dataset(cfg.data.root, demo.classes, demo.per_class, demo.min_side,
                               demo.max_side, demo.seed)
        print(f"wrote {n} JPEG files in {demo.classes} classes under {cfg.data.root}")
    if demo.vae is not None:
        train_vae(cfg)


def _check_vae_target(cfg: Config, out: str) -> None:
    """The demo's VAE starts from vae.random and is saved at vae.source, which encode and sample
    load: both must be set, and the folder must lie inside ``out`` for DVC to track it."""
    if cfg.vae.random is None:
        raise SystemExit("error: data.demo.vae is set but vae.random (the architecture and seed "
                         "the demo's VAE starts from) is not")
    folder, images = Path(cfg.vae.source).resolve(), Path(cfg.data.root).resolve()
    if not folder.is_relative_to(Path(out).resolve()) or folder == Path(out).resolve():
        raise SystemExit(f"error: vae.source ({cfg.vae.source}) must be a folder inside {out} "
                         "when data.demo.vae is set: the demo's VAE is trained and saved there "
                         "(data.demo.vae: null keeps vae.source and trains nothing)")
    if folder.is_relative_to(images) or images.is_relative_to(folder):
        raise SystemExit(f"error: vae.source ({cfg.vae.source}) and data.root ({cfg.data.root}) "
                         "must not overlap: saving the VAE replaces its folder")


def _check_captioned_demo(cfg: Config, out: str) -> None:
    """A captioned demo writes both splits, their captions and the text encoder inside ``out``."""
    from sra2.data.captions import SHAPES

    data = cfg.data
    if data.demo.classes > len(SHAPES):
        raise SystemExit(f"error: data.demo.classes is {data.demo.classes}: the captioned demo "
                         f"draws at most {len(SHAPES)} shapes ({', '.join(SHAPES)})")
    if data.demo.text is None:
        raise SystemExit("error: data.kind is coco and data.demo is set, but data.demo.text (the "
                         "shape of the demo's text encoder) is not")
    if data.demo.val_per_class == 0:
        raise SystemExit("error: data.demo.val_per_class is 0: the captioned demo's val split "
                         "(the captions sampled, the images FID compares with) would be empty")
    for key, path in (("data.val_root", data.val_root), ("data.captions", data.captions),
                      ("data.val_captions", data.val_captions), ("text.source", cfg.text.source),
                      ("data.demo.text.clip", data.demo.text.clip)):
        if not Path(path).resolve().is_relative_to(Path(out).resolve()):
            raise SystemExit(f"error: {key} ({path}) must lie inside {out} when data.demo is "
                             "set, so that DVC tracks what the demo stage writes there")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("demo_data", __doc__, {
        "out": ("data/demo", "folder the demo images are drawn into")}, argv)
    inside = Path(cfg.data.root).resolve().is_relative_to(Path(args["out"]).resolve())
    if cfg.data.demo is not None and not inside:
        raise SystemExit(f"error: data.root ({cfg.data.root}) must lie inside {args['out']} "
                         "when data.demo is set, so that DVC tracks the images it draws")
    if cfg.data.demo is not None and cfg.data.demo.vae is not None:
        _check_vae_target(cfg, args["out"])
    if cfg.data.demo is not None and cfg.data.kind == "coco":
        _check_captioned_demo(cfg, args["out"])
    run_stage(demo_data_flow, cfg.preset, cfg=cfg, out=args["out"])


if __name__ == "__main__":
    entry(main)
