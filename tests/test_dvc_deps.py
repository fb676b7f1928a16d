"""Each stage's code deps in dvc.yaml are exactly the project modules its command imports, so
editing any of them re-runs the stage and editing anything else does not."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sra2", "flows")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (None outside the project)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (also inside functions: they run)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from sra2 import dist`
    return names


def closure(module: str) -> set[str]:
    """Relative paths of the project files that importing ``module`` runs, package inits
    included."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b runs a/__init__.py first
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += imported(path)
    return {str(p.relative_to(REPO)) for p in seen}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_import_closure(stage):
    cmd = STAGES[stage]["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith("flows.")
    listed = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    assert listed == closure(cmd[2]), f"dvc.yaml {stage} deps differ from its imports"
