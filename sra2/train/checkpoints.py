"""The files of a training run: step checkpoints with a ``latest`` pointer and a retention rule,
the exported EMA weights the sample stage reads, and the per-step metrics log.

A run's folder is named by the hash of what its numbers depend on (``sra2.train.loop.signature``);
everything that belongs to one step of it (a checkpoint, an FID snapshot, its samples) is named
:func:`step_file`.

Resume reads checkpoints with the safe reader (:func:`sra2.model.sit.read_checkpoint`) and falls
back: a checkpoint that cannot be resumed from (truncated, not a training checkpoint, non-finite
weights) is moved to ``.quarantine/`` with a warning naming it and why, and the run resumes from
the newest step file that reads, which ``latest`` then names; with none left it starts at step 0.
One damaged file costs the steps since the one before it (retaken, they end with the bytes of an
unbroken run). A checkpoint refused because it would run code is not damage but a file someone
put there: it stops the run, named.

A run's length (``train.steps``) is not in the signature: nothing saved at a step depends on it,
so runs of every length share the run folder's step files and its metrics log. A run of N steps
takes the step file at N if there is one (nothing to train), else resumes from the newest at or
below N; while step files of a longer run lie beyond N it leaves those and ``latest`` alone and
deletes only the step files it wrote itself (:attr:`Checkpoints.floor`).
"""

from __future__ import annotations

import csv
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sra2.config.params import Config
from sra2.data.store import QUARANTINE, digest
from sra2.model.sit import CheckpointError, UnsafeCheckpoint, read_checkpoint
from sra2.runtime import atomic

# what sra2.train.loop resumes from
REQUIRED = ("step", "model", "ema", "opt", "heads")


def step_file(step: int) -> str:
    """The name of what belongs to ``step`` (without a suffix): ``step-0000100``."""
    return f"step-{step:07d}"


def resumable(path: Path) -> tuple[dict | None, str]:
    """The training checkpoint at ``path``, or None and why training cannot resume from it.

    Raises :class:`UnsafeCheckpoint` for a file that would run code: that is not damage to skip."""
    try:
        state = read_checkpoint(path)
    except FileNotFoundError:
        return None, "missing"
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{e}. Training does not skip it (it is not damaged): move it out "
                               f"of {path.parent} to resume from the checkpoint "
                               "before it") from None
    except CheckpointError as e:
        return None, str(e).removeprefix(f"{path}: ")
    if missing := [key for key in REQUIRED if key not in state]:
        return None, f"not a training checkpoint (no {', '.join(missing)})"
    for part in ("model", "ema"):
        for name, t in state[part].items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return None, f"non-finite values in {part}.{name}"
    return state, ""


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
    Only ``step-*.pt`` files of the run folder are ever deleted (not ``snapshots/`` or
    ``.quarantine/``). ``latest`` names the newest step file of the longest run.
    """

    STEP_FILE = re.compile(r"step-(\d+)\.pt")  # what step_file names, read back

    def __init__(self, folder: str | Path, signature: dict | None, keep: int = 3):
        # no signature: ``folder`` is a run's folder found on disk, to inspect (sra2.tools.verify)
        self.folder = Path(folder) / digest(signature) if signature is not None else Path(folder)
        self.signature, self.keep = signature, keep
        # set by load: None for the longest run; for a shorter one (a longer run's step files lie
        # beyond its length), the step it resumed from: it deletes only step files after it
        self.floor: int | None = None

    def path(self, step: int) -> Path:
        return self.folder / f"{step_file(step)}.pt"

    def latest(self) -> Path | None:
        """The step file ``latest`` names (present or not); None if it is missing or names none."""
        try:
            name = (self.folder / "latest").read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return self.folder / name if self.STEP_FILE.fullmatch(name) else None

    def steps(self) -> list[int]:
        """The steps of the step files in the run folder, oldest first."""
        if not self.folder.is_dir():
            return []
        names = (self.STEP_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m[1]) for m in names if m)

    def save(self, state: dict) -> Path:
        if not (self.folder / "signature.json").exists():
            atomic.write_json(self.folder / "signature.json", self.signature)
        path = self.path(state["step"])
        atomic.save_torch(state, path)
        if self.floor is None:  # a shorter run leaves latest naming the longer run's newest
            atomic.write_text(self.folder / "latest", path.name + "\n")
        self.prune(state["step"])
        return path

    def prune(self, newest: int) -> None:
        """Delete the step files older than the ``keep`` newest up to ``newest`` (the one just
        saved; a later file left by a crash is written again on the way), none at or below
        ``floor``: a shorter run keeps its ``keep`` newest and every file of a longer run."""
        steps = [step for step in self.steps() if (self.floor or 0) < step <= newest]
        for step in steps[:-self.keep]:
            self.path(step).unlink(missing_ok=True)

    def load(self, upto: int | None = None, repair: bool = True) -> dict | None:
        """The checkpoint a run of ``upto`` steps (None: any) resumes from: the one ``latest``
        names, else the newest step file that reads (see the module's docstring); None to start
        at step 0. With step files beyond ``upto`` (a longer run's), the newest that reads at or
        below it, ``latest`` left alone, and ``floor`` set.

        ``repair`` is for one process per run: it quarantines, rewrites ``latest`` and warns on
        stderr. The other ranks pick the same file without touching the folder."""
        steps = self.steps()
        shorter = upto is not None and bool(steps) and steps[-1] > upto
        pointer, named = self.folder / "latest", None if shorter else self.latest()
        newest_first = [self.path(step) for step in reversed(steps) if upto is None or step <= upto]
        order = ([named] if named else []) + [p for p in newest_first if p != named]
        warn = (lambda text: print(f"WARNING: {text}", file=sys.stderr)) if repair else None
        if warn and order and named is None and not shorter:
            warn(f"{pointer} is missing or names no step file")
        for path in order:
            state, why = resumable(path)
            if state is not None:
                if warn and path != named and not shorter:
                    atomic.write_text(pointer, path.name + "\n")
                    warn(f"resuming from {path} (step {state['step']}); {pointer} names it now")
                self.floor = state["step"] if shorter else None
                return state
            if why == "missing":  # named by latest, or moved by the repairing rank since listed
                if warn and path == named:
                    warn(f"{pointer} names {path}, which is missing")
            elif warn:
                warn(f"cannot resume from {path}: {why}; moved to {self.quarantine(path)}")
        if warn and order:
            if not shorter:
                pointer.unlink(missing_ok=True)
            below = f" at or below step {upto}" if shorter else ""
            warn(f"no checkpoint left to resume from in {self.folder}{below}: training starts "
                 "at step 0")
        self.floor = 0 if shorter else None
        return None

    def quarantine(self, path: Path) -> Path:
        """Move ``path`` into ``.quarantine/`` (kept to be looked at, never deleted), numbered so
        it is no step file and never replaces one moved there before."""
        folder = self.folder / QUARANTINE  # .dvcignore'd, as the stores' is
        folder.mkdir(exist_ok=True)
        n = 1
        while (folder / f"{path.name}.{n}").exists():
            n += 1
        return path.rename(folder / f"{path.name}.{n}")


class MetricsLog:
    """Per-step rows in a CSV kept in the run's folder (so runs with other settings never mix their
    rows) and the rows of this run's ``steps`` mirrored to ``mirror`` (what ``dvc plots show``
    draws), each rewritten atomically.

    The folder's file is the line's log, shared by runs of every length: a row every
    ``train.log_every`` steps up to the newest checkpoint ``saved``. Rows a crash left after it are
    dropped and a step taken again replaces its row, so the file matches an unbroken run. A run's
    last row off that cadence (``tail``) is its own: it goes to the mirror only."""

    def __init__(self, path: str | Path, mirror: str | Path, columns: list[str], steps: int,
                 saved: int):
        self.path, self.mirror, self.columns, self.steps = Path(path), Path(mirror), columns, steps
        self.rows: dict[int, dict] = {}
        self.tail: dict | None = None
        if self.path.exists():
            with open(self.path) as f:
                rows = ((int(r["step"]), r) for r in csv.DictReader(f))
                self.rows = {step: r for step, r in rows if step <= saved}

    def append(self, row: dict) -> None:
        self.rows[row["step"]] = row
        self.write()

    def drop_after(self, step: int) -> None:
        """Forget the rows after ``step`` (a rewind takes those steps again)."""
        self.rows = {s: r for s, r in self.rows.items() if s <= step}
        self.write()

    def shown(self) -> list[dict]:
        """This run's rows: the line's up to its steps, then its tail."""
        rows = [self.rows[step] for step in sorted(self.rows) if step <= self.steps]
        return rows + ([self.tail] if self.tail else [])

    def write(self) -> None:
        atomic.write_csv([self.path], self.columns, [self.rows[step] for step in sorted(self.rows)])
        atomic.write_csv([self.mirror], self.columns, self.shown())


class TimeLog:
    """What training up to a step cost: images seen, wall-clock seconds and process-seconds (the
    wall time of each stretch times the processes that ran it), at every saved or evaluated step.

    Wall times differ between runs that write the same bytes, so this log lives outside every
    DVC output and every hashed folder: the line's file at ``path`` (``timing/<run>.csv`` beside
    ``checkpoints/``, one per run folder), and a run's rows up to its ``steps`` mirrored as
    ``times.csv`` next to ``fid.csv``, for git (:mod:`sra2.evaluate.convergence` reads both). A
    resumed run continues from the row at the step it resumed from; without one (the run started
    before times were kept) it records nothing.
    Evaluations during training are not counted (:meth:`paused`): their cost is the evaluator's
    cadence, not the method's."""

    COLUMNS = ["step", "images", "processes", "device", "seconds", "process_seconds"]

    def __init__(self, path: str | Path, start: int, saved: int, global_batch: int,
                 processes: int, device: str, write: bool):
        self.path, self.global_batch, self.write = Path(path), global_batch, write
        self.processes, self.device = processes, device
        self.rows = {step: r for step, r in self._read().items() if step <= saved}
        zero = {"seconds": 0.0, "process_seconds": 0.0}
        self.base = zero if start == 0 else self.rows.get(start)
        self.start, self.tick, self.excluded = start, time.perf_counter(), 0.0

    def _read(self) -> dict[int, dict]:
        if not self.path.exists():
            return {}
        with open(self.path) as f:
            return {int(r["step"]): r for r in csv.DictReader(f)}

    @contextmanager
    def paused(self):
        """Time spent inside is not training time."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - begin

    def record(self, step: int) -> None:
        """The cost up to ``step``, taken now (replacing a row an earlier try left there)."""
        if self.base is None or not self.write:
            return
        seconds = time.perf_counter() - self.tick - self.excluded
        self.rows[step] = {
            "step": step, "images": step * self.global_batch, "processes": self.processes,
            "device": self.device,
            "seconds": round(float(self.base["seconds"]) + seconds, 3),
            "process_seconds": round(float(self.base["process_seconds"])
                                     + seconds * self.processes, 3)}
        atomic.write_csv([self.path], self.COLUMNS, [self.rows[s] for s in sorted(self.rows)])

    def mirror(self, path: str | Path, steps: int) -> None:
        """The rows up to ``steps`` at ``path`` (just the header when none were kept)."""
        rows = [self.rows[s] for s in sorted(self.rows) if s <= steps]
        atomic.write_csv([path], self.COLUMNS, rows)
