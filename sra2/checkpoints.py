"""The files of a training run: step checkpoints with a ``latest`` pointer and a retention rule,
the exported EMA weights the sample stage reads, and the per-step metrics log.

A run's folder is named by the hash of what its numbers depend on (``sra2.train.signature``);
everything that belongs to one step of it (a checkpoint, an FID snapshot, its samples) is named
:func:`step_file`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch

from sra2 import atomic
from sra2.config import Config
from sra2.store import digest

def step_file(step: int) -> str:
    """The name of what belongs to ``step`` (without a suffix): ``step-0000100``."""
    return f"step-{step:07d}"


def ema_export(cfg: Config, ema: torch.nn.Module, step: int) -> dict:
    """The EMA weights at ``step`` as the sample stage reads them: a plain SiT (no projector) with
    the architecture it was built as."""
    return {"name": cfg.model.name, "model_config": cfg.model.model_dump(), "step": step,
            "ema": ema.state_dict()}


class Checkpoints:
    """``<folder>/<run>/step-NNNNNNN.pt`` and a ``latest`` pointer, each written atomically; the
    ``keep`` newest step files stay, older ones go once a newer one is complete.

    ``run`` is a hash of the signature: other settings start a new run beside the old one
    instead of resuming it or overwriting it, and going back to old settings resumes the old run.
    Only ``step-*.pt`` files of the run folder are ever deleted (not ``snapshots/``).
    """

    STEP_FILE = re.compile(r"step-(\d+)\.pt")  # what step_file names, read back

    def __init__(self, folder: str | Path, signature: dict, keep: int = 3):
        self.folder = Path(folder) / digest(signature)
        self.signature, self.keep = signature, keep

    def path(self, step: int) -> Path:
        return self.folder / f"{step_file(step)}.pt"

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        return self.folder / pointer.read_text().strip() if pointer.exists() else None

    def save(self, state: dict) -> Path:
        if not (self.folder / "signature.json").exists():
            atomic.write_json(self.folder / "signature.json", self.signature)
        path = self.path(state["step"])
        atomic.save_torch(state, path)
        atomic.write_text(self.folder / "latest", path.name + "\n")
        self.prune(state["step"])
        return path

    def prune(self, newest: int) -> None:
        """Delete the step files older than the ``keep`` newest up to ``newest`` (the one
        ``latest`` names; a later file left by a crash is written again on the way)."""
        names = (self.STEP_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        steps = sorted(int(m[1]) for m in names if m and int(m[1]) <= newest)
        for step in steps[:-self.keep]:
            self.path(step).unlink(missing_ok=True)

    def load(self) -> dict | None:
        path = self.latest()
        return None if path is None else torch.load(path, map_location="cpu", weights_only=True)


class MetricsLog:
    """Per-step rows in a CSV kept in the run's folder (so runs with other settings never mix their
    rows) and mirrored to ``mirror`` (what ``dvc plots show`` draws), rewritten atomically; on
    resume, rows after the checkpoint's step are dropped so the file matches an unbroken run."""

    def __init__(self, path: str | Path, resume_step: int, mirror: str | Path, columns: list[str]):
        self.path, self.mirror, self.columns = Path(path), Path(mirror), columns
        self.rows: list[dict] = []
        if self.path.exists() and resume_step > 0:
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        atomic.write_csv([self.path, self.mirror], self.columns, self.rows)
