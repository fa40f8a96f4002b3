"""Each part's ``__init__`` is its complete face: code outside a part imports the part, never a module
behind it. Tests and benches measure a part's insides and may reach behind its face; product code may not."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
# folder on disk -> the package it is installed as (pyproject's package-dir)
FOLDERS = {"tollway": "tollway", "gateway": "tollway.gateway", "routing": "tollway.routing",
           "retrieval": "tollway.retrieval", "guardrails": "tollway.guardrails", "prompts": "tollway.prompts",
           "evals": "tollway.evals"}
PARTS = ("tollway.routing", "tollway.retrieval", "tollway.guardrails", "tollway.prompts", "tollway.evals",
         "tollway.gateway.metering.quota")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *rel))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import, names imported from a package counted as modules
    where such a module exists."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if f"{node.module}.{a.name}" in MODULES and not _exported(node.module, a.name)]
    return out


def _exported(package: str, name: str) -> bool:
    """A face may export a function named like one of its modules (``retrieval.documents``)."""
    if package not in PARTS:
        return False
    return not inspect.ismodule(getattr(importlib.import_module(package), name, None))


def part_of(module: str) -> str | None:
    return next((p for p in PARTS if module == p or module.startswith(p + ".")), None)


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def behind_faces() -> list[str]:
    wrong = []
    for name, path in sorted(MODULES.items()):
        for line, target in imports(path):
            part = part_of(target)
            if part and target != part and part_of(name) != part:
                wrong.append(f"{_where(path)}:{line} imports {target} (behind {part}'s face)")
    return wrong


def test_no_module_imports_behind_another_parts_face() -> None:
    wrong = behind_faces()
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_reach_behind_a_face(tmp_path: Path) -> None:
    """The check itself: a module outside routing that imports routing.fallback is caught."""
    MODULES["tollway.gateway.probe"] = probe = tmp_path / "probe.py"
    probe.write_text("from tollway.routing.fallback import Attempt\nfrom tollway.routing import Router\n")
    try:
        wrong = [w for w in behind_faces() if "probe.py" in w]
    finally:
        del MODULES["tollway.gateway.probe"]
    assert wrong == [f"{probe}:1 imports tollway.routing.fallback (behind tollway.routing's face)"]


@pytest.mark.parametrize("part", PARTS)
def test_each_face_lists_what_it_exports(part: str) -> None:
    face = importlib.import_module(part)
    names = getattr(face, "__all__", None)
    assert names, f"{part} has no __all__"
    missing = [n for n in names if not hasattr(face, n)]
    assert not missing, f"{part}.__all__ names what it does not define: {missing}"
    assert len(set(names)) == len(names), f"{part}.__all__ repeats a name"
