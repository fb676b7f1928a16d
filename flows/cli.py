"""``sra2 <command> [options]``: run one stage's Prefect flow (what each dvc.yaml stage calls), the
whole pipeline as one flow run, serve it for the Prefect UI, or one of the tools beside them."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"demo-data": "flows.stages.demo_data:main", "encode": "flows.stages.encode:main",
            "train": "flows.stages.train:main", "sample": "flows.stages.sample:main",
            "evaluate": "flows.stages.evaluate:main", "pipeline": "flows.pipeline:pipeline_main",
            "serve": "flows.pipeline:serve_main", "feature-pca": "flows.stages.feature_pca:main",
            "convergence": "sra2.evaluate.convergence:main", "flops": "sra2.train.cost:main",
            "verify": "sra2.tools.verify:main", "plan": "sra2.tools.plan:main"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: sra2 {" + ",".join(COMMANDS) + "} [--help | options]\n\n"
              "A stage name runs that stage as a Prefect flow (`dvc repro` runs them in order);\n"
              "pipeline: `dvc repro` as one Prefect run with the stages as its subflows;\n"
              "serve: deployments for the Prefect UI's Run and Retry (pipeline, experiment, "
              "table);\n"
              "feature-pca: the PCA picture of VAE tokens and SiT hidden states per block;\n"
              "convergence: FID curves of experiments side by side, and the speed-up;\n"
              "flops: parameter and FLOP counts; "
              "verify: check every stored byte of stores and runs;\n"
              "plan: what a run will cost (time, GPU-hours, disk per folder) before it runs.\n"
              "`sra2 <command> --help` lists a command's options.", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from flows.harness.common import entry

    module, function = COMMANDS[argv[0]].split(":")
    command = getattr(importlib.import_module(module), function)
    entry(lambda: sys.exit(command(argv[1:])))  # verify's main returns its exit status


if __name__ == "__main__":
    main()
