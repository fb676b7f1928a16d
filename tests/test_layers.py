"""The code's layers are its folders: every import of sra2/ and flows/, also those inside
functions, runs from a folder to one below it or within one folder, never in a circle. The order
is derived from the imports themselves, so a new folder finds its place without this file."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
from test_dvc_deps import imported

REPO = Path(__file__).resolve().parents[1]


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted name -> file of every module of ``packages`` under ``root`` (packages by their
    ``__init__.py``, which this project keeps empty)."""
    found = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            if path.name != "__init__.py":
                found[".".join(path.relative_to(root).with_suffix("").parts)] = path
    return found


def folder(module: str) -> str:
    return module.rsplit(".", 1)[0]


def graphs(root: Path, packages: tuple[str, ...]) -> tuple[dict, dict]:
    """(module -> modules it imports, folder -> folders it imports), self-loops left out."""
    known = modules(root, packages)
    # every module an import statement names, inside functions too
    by_module = {m: (imported(path) & set(known)) - {m} for m, path in known.items()}
    by_folder: dict[str, set[str]] = {}
    for m, targets in by_module.items():
        by_folder.setdefault(folder(m), set()).update(folder(t) for t in targets)
    return by_module, {f: targets - {f} for f, targets in by_folder.items()}


def layers(root: Path, packages: tuple[str, ...]) -> list[str]:
    """The folders from the bottom up; an AssertionError naming the imports that run in a
    circle, between modules or between folders (one of them then runs upward)."""
    by_module, by_folder = graphs(root, packages)
    for graph, what in ((by_module, "modules"), (by_folder, "folders")):
        try:
            order = list(TopologicalSorter(graph).static_order())
        except CycleError as e:
            circle = e.args[1][::-1]  # graphlib lists it against the arrows
            steps = [f"{a} -> {b}" + (f" ({behind(by_module, a, b)})" if what == "folders" else "")
                     for a, b in zip(circle, circle[1:])]
            raise AssertionError(f"{what} import each other in a circle: " + "; ".join(steps))
    return order


def behind(by_module: dict[str, set[str]], a: str, b: str) -> str:
    """The modules of folder ``a`` that import from folder ``b``."""
    return ", ".join(sorted(m for m, targets in by_module.items()
                            if folder(m) == a and any(folder(t) == b for t in targets)))


def test_the_folders_of_sra2_and_flows_stack_in_layers():
    layers(REPO, ("sra2", "flows"))
    by_folder = graphs(REPO, ("sra2", "flows"))[1]

    def reaches(high: str, low: str) -> bool:
        seen, todo = set(), [high]
        while todo:
            here = todo.pop()
            seen.add(here)
            todo += [f for f in by_folder.get(here, ()) if f not in seen]
        return low in seen

    # the layers as README's "Layout" section lists them: each above the one after it
    for high, low in [("sra2.tools", "sra2.train"), ("sra2.train", "sra2.evaluate"),
                      ("sra2.train", "sra2.methods"), ("sra2.evaluate", "sra2.sample"),
                      ("sra2.sample", "sra2.data"), ("sra2.data", "sra2.model"),
                      ("sra2.methods", "sra2.model"), ("sra2.model", "sra2.runtime"),
                      ("sra2.runtime", "sra2.config"), ("flows.stages", "flows.harness")]:
        assert reaches(high, low), (high, low)
    library = [f for f in by_folder if f.startswith("sra2")]
    assert not [f for f in library
                if any(reaches(f, g) for g in by_folder if g.startswith("flows"))]


def test_prefect_is_imported_after_the_projects_defaults_for_it():
    """Prefect reads its settings when it is first imported: each module that imports it imports
    flows.harness.prefect_defaults at its top, before any import of prefect."""
    defaults = "flows.harness.prefect_defaults"
    for module, path in modules(REPO, ("sra2", "flows")).items():
        if not any(name.split(".")[0] == "prefect" for name in imported(path)):
            continue
        tree = ast.parse(path.read_text())
        top = [name for node in tree.body for name in imported_by(node)
               if name == defaults or name.split(".")[0] == "prefect"]
        assert top[:1] == [defaults], f"{module}: import {defaults} at the top, before prefect"


def imported_by(node: ast.stmt) -> list[str]:
    """The modules one statement imports, in order."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_an_import_that_runs_upward_inside_a_function_is_named(tmp_path):
    write(tmp_path, {"pkg/low/a.py": "X = 1\n", "pkg/high/b.py": "from pkg.low import a\n"})
    assert layers(tmp_path, ("pkg",)) == ["pkg.low", "pkg.high"]
    write(tmp_path, {"pkg/low/c.py": "def f():\n    from pkg.high.b import Y\n"})
    with pytest.raises(AssertionError,
                       match=r"folders .* circle: .*pkg.low -> pkg.high \(pkg.low.c\)"):
        layers(tmp_path, ("pkg",))


def test_modules_importing_each_other_within_a_folder_are_named(tmp_path):
    write(tmp_path, {"pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg import a\n"})
    with pytest.raises(AssertionError,
                       match=r"modules import each other in a circle: pkg\.\w -> pkg\.\w"):
        layers(tmp_path, ("pkg",))
