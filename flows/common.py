"""What the stage flows share: the command line, the config check, Prefect progress and tables."""

from __future__ import annotations

import argparse
import sys
import time

from sra2.config import Config, ConfigError, load


def parse(stage: str, doc: str, paths: dict[str, tuple[str, str]],
          argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parse ``--params`` and the stage's paths (name: (default, help)); a bad parameter file ends
    the process at once, before Prefect starts, with the offending key named."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml",
                        help="parameter file: a preset name and overrides (default: params.yaml)")
    for name, (default, text) in paths.items():
        parser.add_argument(f"--{name}", default=default, help=f"{text} (default: {default})")
    args = vars(parser.parse_args(argv))
    try:
        cfg = load(args["params"])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return cfg, args


def is_main() -> bool:
    """True on the process that writes shared outputs (rank 0 under torchrun, else always)."""
    from sra2 import dist

    return dist.init()[0] == 0


class Progress:
    """A Prefect progress artifact, updated at most every ``every`` seconds."""

    def __init__(self, key: str, description: str, every: float = 5.0):
        from prefect.artifacts import create_progress_artifact

        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.every, self.last = every, 0.0

    def __call__(self, done: int, total: int, *_) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if done >= total or now - self.last >= self.every:
            self.last = now
            update_progress_artifact(self.id, 100.0 * done / max(total, 1))


def table(key: str, values: dict, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"name": k, "value": v} for k, v in values.items() if not isinstance(v, (list, dict))]
    create_table_artifact(rows, key=key, description=description)

