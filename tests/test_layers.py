"""The packages form layers, and every import points down: the CLI on top, then `cluster/` (Ray), then `jobs/`
(the study without Ray), then `influence/` (the science) and `storage/` (the tables) side by side, which never
import each other. Imports inside functions count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the packages it may import
ALLOWED = {
    "influence": set(),
    "storage": set(),
    "jobs": {"influence", "storage"},
    "cluster": {"jobs", "influence", "storage"},
    "fragile": {"cluster", "jobs", "influence", "storage"},
}


def _imports(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import of one of the project's packages in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported, line in sorted(_imports(path)):
            if imported != package and imported not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not wrong, (f"{package}/ may import only {', '.join(sorted(ALLOWED[package])) or 'nothing of ours'}: "
                       + "; ".join(wrong))


def test_the_spec_layer_and_the_protocol_import_neither_torch_nor_ray():
    """What the CLI reads before anything heavy (spec, plan, protocol) stays cheap to import."""
    import subprocess
    import sys

    code = ("import sys, jobs.spec, jobs.plan, jobs.protocol, influence.registry; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
