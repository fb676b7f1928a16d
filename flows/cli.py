"""``sra2 <stage> [options]``: run one stage's Prefect flow (what each dvc.yaml stage calls), or
one of the tools beside them (flops, verify)."""

from __future__ import annotations

import importlib
import sys

STAGES = {"demo-data": "flows.demo_data", "encode": "flows.encode", "train": "flows.train",
          "sample": "flows.sample", "evaluate": "flows.evaluate", "flops": "sra2.flops",
          "verify": "sra2.verify"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print("usage: sra2 {" + ",".join(STAGES) + "} [--help | options]\n\n"
              "Runs one pipeline stage as a Prefect flow (flops: print parameter and FLOP counts;\n"
              "verify: check every stored byte of stores and runs). `dvc repro` runs the stages in order;\n"
              "`sra2 <stage> --help` lists a stage's options.", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from flows.common import entry

    module = importlib.import_module(STAGES[argv[0]])
    entry(lambda: sys.exit(module.main(argv[1:])))  # verify's main returns its exit status
