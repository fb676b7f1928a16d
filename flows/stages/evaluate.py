"""evaluate stage: FID and IS of the samples; FID against ADM-format reference statistics
(evaluate.reference) or against the encoded dataset's real images with the same crop (captioned
data: the val split's images), and for captioned samples their CLIP score and PickScore.

Writes a metrics JSON for `dvc metrics show`. With evaluate.inception=random (the offline demo)
the Inception network has seeded random weights, and the JSON says so.
"""

from __future__ import annotations

from tqdm import tqdm

from flows.harness.common import entry, parse, table
from flows.harness.monitor import current
from flows.harness.progress import Watch
from flows.harness.runner import run_stage, stage_flow
from sra2.config.params import Config
from sra2.runtime import atomic


@stage_flow("evaluate")
def evaluate_flow(cfg: Config, samples: str, latents: str, out: str) -> dict:
    from sra2.evaluate.scores import evaluate

    ec, mon = cfg.evaluate, current()
    real = cfg.data.val_root if cfg.data.kind == "coco" else latents  # captioned: the val split
    mon.say(f"evaluate: preset {cfg.preset}, samples {samples} against "
            f"{ec.reference or f'the real images of {real}'} ({ec.num_real or 'all'}), "
            f"Inception {ec.inception}, batch {ec.batch_size}, device {ec.device}")
    watch = Watch(mon, "evaluate", "images", "Inception features of the samples, then of the "
                  "reference images")
    with tqdm(unit="img", desc="evaluate") as bar:  # the terminal's view: this runs in-process

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            watch.update(done, total)
            mon.stop_if_cancelled(f"{done} / {total} images")
            if done == total:  # what follows has no progress of its own: say what it is
                bar.close()
                mon.say("evaluate: features done; computing FID and sFID (matrix square roots), "
                        "Inception Score, precision and recall")

        result = evaluate(cfg, samples, latents, progress=progress)
    watch.finish()
    atomic.write_json(out, result)
    verdict = ("comparable with the paper's numbers" if result["comparable"] else
               f"NOT comparable with the paper's numbers: {result['why']}")
    table("metrics", result, f"{result['inception_weights']}; {verdict}")
    mon.say(f"evaluate: FID {result['fid']:.3f}  sFID {result['sfid']:.3f}  "
            f"IS {result['inception_score']:.3f}  precision {result['precision']:.3f}  "
            f"recall {result['recall']:.3f}{captions_line(result)} of {result['num_samples']} "
            f"samples "
            f"({result['inception_weights']}; FID against {result['fid_reference']}); {verdict}")
    return result


def captions_line(result: dict) -> str:
    """The caption scores of a text-to-image run, for the log line ("" for class labels)."""
    if "clip_score" not in result:
        return ""
    return (f"  CLIP score {result['clip_score']:.2f}  PickScore {result['pickscore']:.2f} "
            f"({result['caption_scorers']})")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("evaluate", __doc__, {
        "samples": ("data/samples/samples.npz", "samples in the ADM format (arr_0, uint8 NHWC)"),
        "latents": ("data/latents.json", "the encoded dataset (a store, or the pointer file naming "
                                         "it): its files are the real images"),
        "out": ("data/metrics.json", "fid and inception_score, for dvc metrics")}, argv)
    from sra2.data.store import pointed_store

    run_stage(evaluate_flow, cfg.preset, cfg=cfg, samples=args["samples"],
              latents=str(pointed_store(args["latents"])), out=args["out"])


if __name__ == "__main__":
    entry(main)
