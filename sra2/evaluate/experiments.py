"""DVC experiments as `dvc exp show --json` lists them: the newest run of each name, with its
commit, parameters and metrics (the paper's tables and the convergence picture find runs so)."""

from __future__ import annotations

import json
import subprocess
from typing import Iterable


def exp_show(all_commits: bool) -> list[dict]:
    """`dvc exp show --json` of the repository here; a RuntimeError naming the command and its
    error output if it fails."""
    command = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {run.stderr.strip()}")
    return json.loads(run.stdout)


def _experiments(shown: list[dict]) -> Iterable[tuple[dict, dict]]:
    """(experiment entry, its newest revision) for every experiment of `dvc exp show --json`."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:
                yield exp, revs[0]


def newest(shown: list[dict]) -> dict[str, dict]:
    """Experiment name -> {experiment, state, rev, commit, timestamp, params, metrics, error} of
    the newest experiment of that name."""
    found: dict[str, dict] = {}
    for exp, rev in _experiments(shown):
        name = exp.get("name") or rev.get("name") or ""
        data = rev.get("data") or {}
        metrics = {}
        for values in (data.get("metrics") or {}).values():
            metrics.update(values.get("data") or {})
        entry = {"experiment": name, "state": (exp.get("executor") or {}).get("state") or "done",
                 "rev": rev.get("rev", "")[:7], "commit": rev.get("rev", ""),
                 "timestamp": data.get("timestamp") or "",
                 "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
                 "metrics": metrics, "error": rev.get("error")}
        if name not in found or entry["timestamp"] >= found[name]["timestamp"]:
            found[name] = entry
    return found
