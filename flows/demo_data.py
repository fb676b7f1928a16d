"""demo-data stage: draw the demo preset's ImageFolder of JPEG files (shapes and textures).

Presets that read a real dataset (data.demo unset) write only a note saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow

from flows.common import parse
from sra2 import atomic
from sra2.config import Config
from sra2.data import write_demo_dataset


@flow(name="sra2-demo-data", log_prints=True)
def demo_data_flow(cfg: Config, out: str) -> None:
    demo = cfg.data.demo
    shutil.rmtree(out, ignore_errors=True)
    if demo is None:
        atomic.write_text(Path(out) / "README.txt",
                          f"preset {cfg.preset} reads data.root={cfg.data.root}; no demo data\n")
        print(f"preset {cfg.preset} has no demo dataset; encode reads {cfg.data.root}")
        return
    n = write_demo_dataset(cfg.data.root, demo.classes, demo.per_class, demo.min_side,
                           demo.max_side, demo.seed)
    print(f"wrote {n} JPEG files in {demo.classes} classes under {cfg.data.root}")


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse("demo_data", __doc__, {
        "out": ("data/demo", "folder the demo images are drawn into")}, argv)
    inside = Path(cfg.data.root).resolve().is_relative_to(Path(args["out"]).resolve())
    if cfg.data.demo is not None and not inside:
        raise SystemExit(f"error: data.root ({cfg.data.root}) must lie inside {args['out']} "
                         "when data.demo is set, so that DVC tracks the images it draws")
    demo_data_flow(cfg, args["out"])


if __name__ == "__main__":
    main()
