"""FID over training across experiments, and the speed-up read off the curves as the paper
states it.

  python -m sra2.evaluate.convergence table1-vanilla table1-layer2 --baseline table1-vanilla
  python -m sra2.evaluate.convergence runs/a/data/train runs/b/data/train/fid.csv \\
      --out convergence.png

Each RUN is a DVC experiment's name (its committed ``data/train/fid.csv`` and ``times.csv``, read
from git at the experiment's newest commit, found by sra2.evaluate.experiments), a folder holding
``fid.csv`` (a train output folder such as ``data/train``, or a run folder ``checkpoints/<run>``),
or a ``fid.csv`` file. One PNG shows FID against the training step, the
training images seen (step x global batch) and the process-hours (processes x wall time, from
training's ``times.csv``: GPU-hours when the runs trained on GPUs), one line per run, its final
FID written beside its last point.

The speed-up of each other run over ``--baseline`` (default: the first RUN): the step at which the
baseline first reaches its own final FID over the step at which the run first does, each read
off the curve by linear interpolation between evaluations; a run that never gets there is "not
reached", never extrapolated. A run already there at its first evaluation got there at that step
or before: its speed-up is a lower bound ("at least").

Bad input (an unknown experiment, a missing or empty ``fid.csv``, a baseline that is not a RUN) is
one ``error:`` line and exit status 2, before anything is drawn. Not a pipeline stage: it reads
what the train stages wrote.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sra2.evaluate.noise import Z95
from sra2.evaluate.plots import PALETTE, Series, font, line_panel
from sra2.runtime import atomic

# where the train stage writes them (dvc.yaml), as committed to each experiment
FID_CSV, TIMES_CSV = "data/train/fid.csv", "data/train/times.csv"


# what every curve is, said on the chart: the evaluations over training are small
CAVEAT = ("FIDs over training: train.eval_samples images each, noisier than FID-50K (wider "
          "intervals) and not comparable with the paper's numbers")


class ConvergenceError(ValueError):
    """Input that cannot be drawn (named in the message): exit status 2."""


@dataclass
class Curve:
    """One run's FID evaluations, with what training had cost at each (None where unrecorded)."""

    label: str
    steps: list[int]
    fid: list[float]
    images: list[float] | None = None  # training images seen
    hours: list[float] | None = None  # process-hours
    fid_sd: list[float] | None = None  # each FID's bootstrap standard deviation, where measured
    device: str = ""  # what the processes ran on: cuda, cpu, or both ("cpu+cuda")


# --- reading the curves

def parse_fid(text: str, source: str) -> tuple[list[int], list[float], list[float] | None]:
    """Steps, FIDs and (where every row has one) the FIDs' standard deviations of a ``fid.csv``
    (sra2.train.fid_curve), by step."""
    reader = csv.DictReader(io.StringIO(text))
    if not {"step", "fid"} <= set(reader.fieldnames or []):
        raise ConvergenceError(f"{source}: not a fid.csv (no step and fid columns)")
    try:
        points = sorted((int(r["step"]), float(r["fid"]), r.get("fid_sd") or None)
                        for r in reader)
        sds = [float(sd) for _, _, sd in points] if all(p[2] for p in points) else None
    except (TypeError, ValueError) as e:
        raise ConvergenceError(f"{source}: line {reader.line_num}: {e}") from None
    if bad := [str(step) for step, fid, _ in points if not math.isfinite(fid)]:
        raise ConvergenceError(f"{source}: FID is not a number at step(s) {', '.join(bad)}")
    return [p[0] for p in points], [p[1] for p in points], sds


def make_curve(label: str, fid_text: str, source: str, times_text: str | None = None,
               global_batch: int | None = None) -> Curve:
    """A run's curve; images seen and process-hours come from training's ``times.csv``
    (sra2.train.checkpoints.TimeLog), images also from ``global_batch`` when that file is
    missing."""
    steps, fids, sds = parse_fid(fid_text, source)
    if not steps:
        raise ConvergenceError(f"{label}: {source} has no FID rows (was it trained with "
                               "train.eval_every > 0, up to that step?)")
    curve = Curve(label, steps, fids, fid_sd=sds)
    reader = csv.DictReader(io.StringIO(times_text or ""))
    try:
        at = {int(r["step"]): r for r in reader}
        curve.device = "+".join(sorted({r["device"] for r in at.values()}))
        if at and all(s in at for s in steps):  # training keeps a row at every evaluated step
            curve.images = [float(at[s]["images"]) for s in steps]
            curve.hours = [float(at[s]["process_seconds"]) / 3600 for s in steps]
    except (KeyError, TypeError, ValueError) as e:
        raise ConvergenceError(f"{label}: the times.csv beside {source}: line {reader.line_num}: "
                               f"{e!r}") from None
    if curve.images is None and global_batch:
        curve.images = [float(s * global_batch) for s in steps]
    return curve


def times_beside(fid: Path) -> Path:
    """The ``times.csv`` that goes with a ``fid.csv``: beside it (a train output folder), or for a
    run folder ``<out>/checkpoints/<run>``, ``<out>/timing/<run>.csv`` (sra2.train.loop)."""
    if fid.parent.parent.name == "checkpoints":
        return fid.parent.parent.parent / "timing" / f"{fid.parent.name}.csv"
    return fid.parent / "times.csv"


def fid_file(arg: str) -> Path | None:
    """The fid.csv that ``arg`` names (the file, or a folder holding it); None if it names none:
    then it is an experiment's name (a folder called ``sra2`` is not a run)."""
    path = Path(arg)
    fid = path / "fid.csv" if path.is_dir() else path
    return fid if fid.is_file() else None


def read_path(arg: str) -> Curve:
    fid = fid_file(arg)
    times = times_beside(fid)
    times_text = times.read_text() if times.is_file() else None
    return make_curve(arg, fid.read_text(), str(fid), times_text)


def git_file(commit: str, path: str) -> str | None:
    """A file's text at a commit, None if it has none."""
    run = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True)
    return run.stdout if run.returncode == 0 else None


def global_batch(params: dict) -> int | None:
    """train.global_batch of an experiment's params.yaml (None if they no longer resolve)."""
    from sra2.config.params import ConfigError, resolve

    try:
        return resolve(params, "experiment").train.global_batch
    except (ConfigError, TypeError, ValueError):
        return None


def read_experiments(names: list[str], all_commits: bool) -> dict[str, Curve]:
    """The curves committed to the newest experiment of each name (`dvc exp show`)."""
    from sra2.evaluate.experiments import exp_show, newest

    try:
        found = newest(exp_show(all_commits))
    except RuntimeError as e:
        raise ConvergenceError(f"{names[0]} names no fid.csv, and the experiments could not be "
                               f"listed: {e}") from None
    curves = {}
    for name in names:
        entry = found.get(name)
        if entry is None:
            raise ConvergenceError(f"{name}: no fid.csv, folder holding one or DVC experiment of "
                                   f"that name (experiments: {', '.join(sorted(found)) or 'none'})")
        text = git_file(entry["commit"], FID_CSV)
        if text is None:
            raise ConvergenceError(f"{name}: experiment {entry['rev']} ({entry['state']}) has no "
                                   f"{FID_CSV}")
        curves[name] = make_curve(name, text, f"{FID_CSV} of {name} ({entry['rev']})",
                                  git_file(entry["commit"], TIMES_CSV),
                                  global_batch(entry["params"]))
    return curves


def read_runs(runs: list[str], all_commits: bool = True) -> list[Curve]:
    """The curves of paths and experiment names, in the order given."""
    experiments = [r for r in runs if fid_file(r) is None]
    found = read_experiments(experiments, all_commits) if experiments else {}
    return [found[r] if r in found else read_path(r) for r in runs]


# --- the speed-up

def first_reach(curve: Curve, target: float) -> tuple[float, bool] | None:
    """The step at which ``curve`` first has FID <= ``target``, linear between evaluations, and
    whether that is its first evaluation (then it got there at that step or before); None if it
    never does."""
    for i, (step, fid) in enumerate(zip(curve.steps, curve.fid)):
        if fid <= target:
            if i == 0:
                return float(step), True
            s0, f0 = curve.steps[i - 1], curve.fid[i - 1]
            return s0 + (f0 - target) / (f0 - fid) * (step - s0), False
    return None


@dataclass
class SpeedUp:
    baseline: Curve
    method: Curve
    target: float  # the baseline's final FID
    baseline_step: float
    method_step: float | None  # None: not reached
    lower_bound: bool  # the method was there at its first evaluation
    # the ratios with the target moved by -+1.96 sd of the baseline's final FID
    # (:func:`noise_interval`)
    interval: tuple[float, float] | None = None

    @property
    def ratio(self) -> float | None:
        if self.method_step is None:
            return None
        return self.baseline_step / self.method_step if self.method_step else math.inf

    def hours(self) -> tuple[float, float] | None:
        """Process-hours of each run at its step, if both recorded them."""
        if self.method_step is None or not (self.baseline.hours and self.method.hours):
            return None
        return tuple(float(np.interp(step, c.steps, c.hours)) for step, c in
                     ((self.baseline_step, self.baseline), (self.method_step, self.method)))

    def text(self) -> str:
        b, m = self.baseline.label, self.method.label
        goal = f"{b}'s final FID {self.target:.2f}"
        if self.method_step is None:
            best = int(np.argmin(self.method.fid))
            return (f"{m} does not reach {goal}: not reached (best {self.method.fid[best]:.2f} at "
                    f"step {self.method.steps[best]:,}, evaluated up to step "
                    f"{self.method.steps[-1]:,})")
        at = (f"by step {self.method_step:,.0f} (its first evaluation)" if self.lower_bound
              else f"at step {self.method_step:,.0f}")
        line = (f"{m} reaches {goal} {at}; {b} at step {self.baseline_step:,.0f}: "
                f"{'at least ' if self.lower_bound else ''}{times_text(self.ratio)}")
        if self.interval:
            low, high = self.interval
            line += (f" ({low:.1f}x to {high:.1f}x with the target moved by 1.96 sd of "
                     f"{b}'s final FID, a bootstrap of train.eval_samples images)")
        if hours := self.hours():
            unit = hours_unit([self.baseline, self.method])
            line += (f" (in {unit}: {hours[1]:.3g} against {hours[0]:.3g}, "
                     f"{hours[0] / hours[1]:.1f}x)")
        return line


def times_text(ratio: float) -> str:
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def speedup(baseline: Curve, method: Curve) -> SpeedUp:
    if not baseline.steps:
        raise ConvergenceError(f"{baseline.label}: the baseline has no FID evaluations")
    target = baseline.fid[-1]
    own, _ = first_reach(baseline, target)
    reached = first_reach(method, target)
    return SpeedUp(baseline, method, target, own, reached[0] if reached else None,
                   bool(reached and reached[1]), noise_interval(baseline, method))


def noise_interval(baseline: Curve, method: Curve) -> tuple[float, float] | None:
    """The speed-up's range over the noise of the target, the baseline's final FID: the method
    read again at that FID -+ 1.96 of its bootstrap standard deviation, the baseline's step kept
    (its final FID is where it is by definition). None without a measured deviation, or where the
    method misses the lower target."""
    if not baseline.fid_sd:
        return None
    own, _ = first_reach(baseline, baseline.fid[-1])
    delta = Z95 * baseline.fid_sd[-1]
    hard, easy = (first_reach(method, baseline.fid[-1] + d) for d in (-delta, delta))
    if hard is None or easy is None:
        return None
    return tuple(own / step if step else math.inf for step in (hard[0], easy[0]))


# --- the picture

def hours_unit(curves: list[Curve]) -> str:
    """What process-hours are on these runs' devices."""
    devices = {c.device for c in curves if c.device}
    return {frozenset({"cuda"}): "GPU-hours", frozenset({"cpu"}): "process-hours on CPU"}.get(
        frozenset(devices), "process-hours")


def series(curves: list[Curve], axis: str) -> list[Series]:
    out = []
    for i, c in enumerate(curves):
        xs = {"step": c.steps, "images": c.images, "hours": c.hours}[axis]
        if xs is not None:
            out.append(Series(c.label, PALETTE[i % len(PALETTE)], list(map(float, xs)), c.fid,
                              f"{c.label} {c.fid[-1]:.2f}"))
    return out


def draw(curves: list[Curve], lines: list[str], panel: tuple[int, int] = (520, 400)) -> Image.Image:
    """FID against step, images seen and process-hours side by side, the legend above, the
    speed-up ``lines`` below."""
    w, h = panel
    head, foot = 64, 14 + 18 * len(lines)
    img = Image.new("RGB", (3 * w, head + h + foot), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 8), "FID during training (lower is better)", fill="black", font=font(16))
    x = 12
    for s in series(curves, "step"):
        d.rectangle([x, 38, x + 14, 50], fill=s.colour)
        d.text((x + 20, 44), s.label, fill="black", font=font(13), anchor="lm")
        x += 40 + int(d.textlength(s.label, font=font(13)))
    fids = [f for c in curves for f in c.fid]
    pad = (max(fids) - min(fids)) * 0.05 or 1.0
    y_range = (min(fids) - pad, max(fids) + pad)
    unit = hours_unit(curves)
    axes = [("step", "training step", ""),
            ("images", "training images seen (step x global batch)", "images"),
            ("hours", f"{unit} (processes x wall time, evaluations excluded)", "wall time")]
    for i, (axis, label, what) in enumerate(axes):
        missing = [c.label for c in curves if axis != "step" and
                   (c.images if axis == "images" else c.hours) is None]
        note = f"no {what} recorded for:\n" + "\n".join(missing) if missing else ""
        line_panel(img, (i * w, head, (i + 1) * w, head + h), series(curves, axis), label, "FID",
                   y_range, note)
    for i, line in enumerate(lines):
        d.text((12, head + h + 8 + 18 * i), line, fill="black", font=font(13))
    return img


# --- the command

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sra2.evaluate.convergence",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a DVC experiment name, a folder holding fid.csv, or a fid.csv file")
    parser.add_argument("--baseline", help="the RUN the others' speed-up is measured against "
                                           "(default: the first)")
    parser.add_argument("--out", default="convergence.png", help="the PNG to write")
    parser.add_argument("--all-commits", action=argparse.BooleanOptionalAction, default=True,
                        help="look for experiments on every commit, not only HEAD (default: yes)")
    args = parser.parse_args(argv)
    baseline = args.baseline or args.runs[0]
    try:
        if baseline not in args.runs:
            raise ConvergenceError(f"--baseline {baseline}: not among the runs {args.runs}")
        if twice := sorted({r for r in args.runs if args.runs.count(r) > 1}):
            raise ConvergenceError(f"{', '.join(twice)}: given twice")
        curves = read_runs(args.runs, args.all_commits)
    except ConvergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = curves[args.runs.index(baseline)]
    for c in curves:
        cost = f", {c.hours[-1]:.3g} {hours_unit([c])}" if c.hours else ""
        print(f"{c.label}: {len(c.steps)} evaluation(s) up to step {c.steps[-1]:,}, final FID "
              f"{c.fid[-1]:.2f}{cost}")
    lines = [speedup(base, c).text() for c in curves if c is not base] + [CAVEAT]
    print("\n".join(lines))
    img = draw(curves, lines)
    atomic.write_with(args.out, lambda f: img.save(f, format="PNG"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
