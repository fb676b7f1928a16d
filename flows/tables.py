"""The paper's tables as DVC experiments: Table 1 (SRA 2 ablations) and Table 3 (vanilla and the
rows of each method, sra2.methods, with their cost), SiT-B/2 at 400K steps; and the text-to-image
table (vanilla MMDiT and MMDiT + SRA 2 on MS-COCO: --table t2i --preset mmdit-coco, experiments
t2i-<row>).

  python -m flows.tables queue --preset sit-b2     # one queued `dvc exp run` per row, named
  dvc queue start -j 1                             # run them (or: queue ... --start)
  python -m flows.tables show                      # Markdown table: our FID beside the paper's
  python -m flows.tables --table 3 queue ...       # the same for Table 3 (experiments table3-<row>)

Each row is the preset with the row's change (sra2.evaluate.paper.TABLES) on top of this workspace's
params.yaml, queued as `dvc exp run --queue -n <prefix>-<row> -S ...`; `-S KEY=VALUE` adds the same
override to every row (e.g. `-S train.steps=100000` for a shorter run; passed on as ++KEY=VALUE,
which sets the key whether or not params.yaml lists it). `show` reads
`dvc exp show --json` and finds the experiments by those names, whichever commit they ran on
(the newest run of a name wins). Not a pipeline stage: it only drives DVC.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from typing import Any, Iterable

import yaml

from sra2.evaluate.experiments import exp_show, newest
from sra2.evaluate.noise import Z95, beyond_noise
from sra2.evaluate.paper import TABLES, Row, Table
from sra2.evaluate.protocol import not_comparable


def value_text(value: Any) -> str:
    """A value as a `-S` override writes it (YAML: false, 0.1, cosine)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def row_overrides(row: Row, preset: str | None, extra: Iterable[str] = ()) -> list[str]:
    """The `-S` values of one row: the preset, the row's changes, then ``extra``; all with `++`,
    which sets a key whether or not params.yaml lists it already."""
    out = [f"preset={preset}"] if preset else []
    out += [f"++{key}={value_text(value)}" for key, value in row.changes.items()]
    return out + ["++" + override.lstrip("+") for override in extra]


def queue_command(row: Row, preset: str | None, prefix: str,
                  extra: Iterable[str] = ()) -> list[str]:
    command = ["dvc", "exp", "run", "--queue", "-n", f"{prefix}-{row.name}"]
    for override in row_overrides(row, preset, extra):
        command += ["-S", override]
    return command


def check_row(params: dict, row: Row, preset: str | None, extra: Iterable[str]) -> None:
    """Resolve and check the row's parameters here, so that a row that cannot run (e.g. a block
    the model does not have) stops the queueing with its key named, before anything is queued."""
    from sra2.methods import checks, registry

    checks.with_overrides(params, row_overrides(row, preset, extra), f"row {row.name}",
                          registry.problems)


def select(table: Table, names: list[str] | None) -> list[Row]:
    if not names:
        return list(table.rows)
    known = {r.name: r for r in table.rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}; rows are {list(known)}")
    return [known[n] for n in names]


def queue(args: argparse.Namespace) -> None:
    from sra2.config.params import ConfigError

    table = TABLES[args.table]
    rows = select(table, args.rows)
    with open(args.params) as f:
        params = yaml.safe_load(f) or {}
    changed = sorted({k for r in table.rows for k in r.changes} & {
        f"{s}.{k}" for s, keys in params.items() if isinstance(keys, dict) for k in keys})
    if changed:
        print(f"note: {args.params} sets {', '.join(changed)}: rows that do not change a key "
              f"inherit its value there", file=sys.stderr)
    try:
        for row in rows:
            check_row(params, row, args.preset, args.set)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    for row in rows:
        command = queue_command(row, args.preset, args.prefix, args.set)
        print("$ " + " ".join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    if args.start and not args.dry_run:
        subprocess.run(["dvc", "queue", "start", "-j", str(args.jobs)], check=True)
    elif not args.dry_run:
        print(f"queued {len(rows)} experiment(s): run them with `dvc queue start`, watch them with "
              f"`dvc queue status`, then `python -m flows.tables --table {table.number} show`")


def collect(shown: list[dict], prefix: str) -> dict[str, dict]:
    """Row name -> :func:`newest`'s entry of the experiment named ``<prefix>-<row>``."""
    return {name.removeprefix(f"{prefix}-"): entry for name, entry in newest(shown).items()
            if name.startswith(f"{prefix}-")}


def _number(value: Any, digits: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def _fid(m: dict) -> str:
    """FID with +- 1.96 of its noise (sra2.evaluate.noise) where the run measured it."""
    fid, sd = m.get("fid"), (m.get("fid_noise") or {}).get("sd")
    return _number(fid, 2) + (f" ± {Z95 * sd:.2f}" if sd and fid is not None else "")


def _versus(m: dict, base: dict | None) -> str:
    """Whether a row's FID differs from the vanilla row's beyond their combined noise."""
    sd, base_sd = (m.get("fid_noise") or {}).get("sd"), ((base or {}).get("fid_noise") or {})
    if base is None or m is base or sd is None or base_sd.get("sd") is None:
        return "-"
    apart = beyond_noise(m["fid"], sd, base["fid"], base_sd["sd"])
    return "beyond noise" if apart else "within noise"


def _resolved(params: dict):
    """An experiment's configuration (None if its parameters no longer resolve)."""
    from sra2.config.params import ConfigError, resolve

    try:
        return resolve(params, "experiment")
    except (ConfigError, TypeError, ValueError):
        return None


def _setting(cfg) -> str:
    """model and training steps of an experiment ("?" if its parameters no longer resolve)."""
    return f"{cfg.model.name}, {cfg.train.steps} steps ({cfg.preset})" if cfg else "?"


def _gflops(cfg) -> float | None:
    """Training GFLOPs per image of an experiment's settings (sra2.train.cost.train_flops)."""
    from sra2.train.cost import train_flops

    return train_flops(cfg) / 1e9 if cfg else None


# the names of the numbers beside FID in the tables' headers
SCORE_NAMES = {"inception_score": "IS", "pickscore": "PickScore", "clip_score": "CLIP score"}


def render(found: dict[str, dict], table: Table, rows: Iterable[Row] | None = None) -> str:
    """The table in Markdown: each row's change, the published FID, ours, and the cost of its
    settings: training FLOPs per image (the SiT, the heads, SRA's teacher and REPA's encoder:
    sra2.train.cost) and their ratio to the vanilla row's."""
    # each score beside FID: the paper's where a row publishes it, and ours
    scores = [(name, any(name in r.published for r in table.rows)) for name in table.scores]
    heads = [h for name, paper in scores
             for h in ([f"paper {SCORE_NAMES[name]}"] if paper else []) + [
                 f"our {SCORE_NAMES[name]}"]]
    lines = [f"{table.title}, {table.protocol} (published numbers: sra2/evaluate/paper.py).", "",
             "| row | change | paper FID | our FID | vs vanilla | " + " | ".join(heads)
             + " | comparable | train GFLOPs/image | x vanilla | our run | experiment |",
             "|---|---|---:|---:|---|" + "---:|" * len(heads) + "---|---:|---:|---|---|"]
    notes = []  # why a row's numbers are not comparable, one line a row
    vanilla = _gflops(_resolved(found["vanilla"]["params"])) if "vanilla" in found else None
    base = found["vanilla"]["metrics"] if "vanilla" in found else None
    for row in rows or table.rows:
        change = ", ".join(f"{k}={value_text(v)}" for k, v in row.changes.items())
        entry = found.get(row.name)
        m = entry["metrics"] if entry else {}
        values = [v for name, paper in scores
                  for v in ([_number(row.published.get(name), 2)] if paper else []) + [
                      _number(m.get(name), 2)]]
        if entry is None:
            ours, cost, setting, experiment = ("-", "-"), ("-", "-"), "-", "not run"
            comparable = "-"
        else:
            cfg = _resolved(entry["params"])
            ours = (_fid(m), _versus(m, base))
            comparable = {True: "yes", False: f"no [{len(notes) + 1}]",
                          None: "?" if "fid" in m else "-"}[m.get("comparable")]
            if m.get("comparable") is False:  # why: from the run, else from its parameters
                why = m.get("why") or ("; ".join(not_comparable(cfg)) if cfg else "?")
                notes.append(f"[{len(notes) + 1}] {row.name}: {why}")
            gflops = _gflops(cfg)
            cost = (f"{gflops:.4g}" if gflops else "-",
                    _number(gflops / vanilla, 2) if gflops and vanilla else "-")
            setting = _setting(cfg)
            experiment = f"{entry['experiment']} ({entry['rev']}, {entry['state']})"
        paper = f"{row.fid:.2f}" if row.fid is not None else "-"
        lines.append(f"| {row.label} | {change} | {paper} | {ours[0]} | {ours[1]} | "
                     + "".join(f"{v} | " for v in values)
                     + f"{comparable} | {cost[0]} | {cost[1]} | {setting} | {experiment} |")
    lines += ["", f"Our FID: the mean over the run's sample sets ± {Z95:.2f} x its noise (the "
              "larger of the bootstrap's and the sets' spread, over the square root of the sets: "
              "sra2/evaluate/noise.py); vs vanilla: beyond noise where the difference exceeds "
              f"{Z95:.2f} x the two noises' root sum of squares."]
    if notes:
        lines += ["", "Not comparable with the paper's numbers (metrics.json's why; `?`: "
                  "evaluated before the check existed):", *notes]
    return "\n".join(lines)


def show(args: argparse.Namespace) -> None:
    table = TABLES[args.table]
    try:
        shown = exp_show(args.all_commits)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    found = collect(shown, args.prefix)
    print(render(found, table, select(table, args.rows)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="1",
                        help="1: the SRA 2 ablations; 3: the methods and their cost; t2i: "
                             "MMDiT on MS-COCO, vanilla and SRA 2")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue one experiment per row")
    q.add_argument("--preset", help="the preset every row runs (default: params.yaml's)")
    q.add_argument("--params", default="params.yaml", help="the workspace's parameter file")
    q.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every row, as `dvc exp run -S` takes it (repeatable)")
    q.add_argument("--start", action="store_true", help="then start the queue (dvc queue start)")
    q.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once with --start")
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    s = sub.add_parser("show", help="print the table with the paper's numbers")
    s.add_argument("--all-commits", action=argparse.BooleanOptionalAction, default=True,
                   help="look for the experiments on every commit, not only HEAD (default: yes)")
    for p in (q, s):
        p.add_argument("--rows", nargs="+", metavar="ROW",
                       help="some rows only: " + "; ".join(
                           f"table {t.number}: {' '.join(r.name for r in t.rows)}"
                           for t in TABLES.values()))
        p.add_argument("--prefix", help="experiment names are <prefix>-<row> (default: table<N>, "
                                        "t2i)")
    args = parser.parse_args(argv)
    args.prefix = args.prefix or TABLES[args.table].prefix
    (queue if args.command == "queue" else show)(args)


if __name__ == "__main__":
    main()
