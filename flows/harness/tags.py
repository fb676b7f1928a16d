"""Which preset, experiment and pipeline run a stage's flow run belongs to, as Prefect tags: the
UI's filters then gather the stages of one `dvc repro` or `dvc exp run`."""

from __future__ import annotations

import os
from typing import Mapping

from sra2.runtime import procs


def experiment(env: Mapping[str, str] = os.environ) -> str:
    """The experiment's name (DVC sets DVC_EXP_NAME for the stages of `dvc exp run`)."""
    return env.get("DVC_EXP_NAME") or "workspace"


def _is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .../bin/dvc ...`` or ``python -m dvc ...``."""
    return "dvc" in [os.path.basename(a) for a in argv[:2]] or argv[1:3] == ["-m", "dvc"]


def dvc_ancestor() -> int | None:
    """The pid of the nearest dvc process above this one (DVC runs a stage's command in a shell)."""
    return next((pid for pid in procs.ancestors(os.getpid()) if _is_dvc(procs.cmdline(pid))),
                None)


def pipeline_id(env: Mapping[str, str] = os.environ) -> str:
    """One id for the stages of one `dvc repro` or `dvc exp run`: the start time and pid of the dvc
    process that runs them (together unique on a machine, and the same for each of its stages).
    SRA2_PIPELINE_RUN overrides it (a batch script running stages itself, or the sra2-pipeline
    flow); a stage run by hand is a pipeline of its own."""
    if env.get("SRA2_PIPELINE_RUN"):
        return env["SRA2_PIPELINE_RUN"]
    pid = (dvc_ancestor() if "DVC_STAGE" in env else None) or os.getpid()
    return f"{procs.start_time(pid):%Y%m%d-%H%M%S}-{pid}"


def run_tags(preset: str, env: Mapping[str, str] = os.environ) -> list[str]:
    return [f"preset:{preset}", f"exp:{experiment(env)}", f"pipeline:{pipeline_id(env)}"]
