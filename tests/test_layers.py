"""The package's layers (docs/architecture.md) hold: imports only point down, and no module grows past its size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grayagent"

# Lower ranks are lower layers. stores and targets are siblings: neither may import the other.
RANK = {"errors": 0, "fsutil": 0, "logsetup": 0, "text": 0, "rules": 1, "stores": 2, "targets": 2, "runtime": 3,
        "rollout": 4, "proxycheck": 5, "docs": 5, "usecases": 6, "cli_options": 7, "cli_rollout": 8, "cli": 9,
        "__main__": 10, "__init__": 0}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "grayagent":
            if node.module == "grayagent":
                out.extend(f"grayagent.{alias.name}" for alias in node.names)
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names if alias.name.split(".")[0] == "grayagent")
    return out


def test_imports_only_point_down() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mine = _layer(module)
        assert mine in RANK, f"{module}: place it in a layer (RANK in this test, docs/architecture.md)"
        for imported in _imports(path):
            theirs = _layer(imported)
            if theirs == mine:
                continue
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and RANK[mine] > 0):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_module_over_600_lines_and_no_class_over_300() -> None:
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text("utf-8")
        if text.count("\n") > 600:
            too_big.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno and node.end_lineno - node.lineno + 1 > 300:
                too_big.append(f"{path.relative_to(PACKAGE)}: class {node.name} is "
                               f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)
