"""The dependency rule of the layout: the edges (serve.py, cli/) -> agent/ -> retrieval/ and prompts/; eval/ may
use all of them and only the CLI imports it. Checked on every import statement, the lazy ones inside functions
included."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "retrieval", "prompts", "eval", "cli", "serve")
# what each part of the project may import from the others
ALLOWED: dict[str, set[str]] = {
    "retrieval": set(),
    "prompts": set(),
    "agent": {"retrieval", "prompts"},
    "serve": {"agent", "retrieval", "prompts"},
    "eval": {"agent", "retrieval", "prompts", "serve"},
    "cli": {"agent", "retrieval", "prompts", "serve", "eval"},
}


def project_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level project package) of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                yield node.lineno, top


def sources() -> Iterator[tuple[str, Path]]:
    yield "serve", ROOT / "serve.py"
    for part in PACKAGES:
        if (ROOT / part).is_dir():
            for path in sorted((ROOT / part).rglob("*.py")):
                yield part, path


def test_every_part_of_the_layout_is_checked() -> None:
    assert {part for part, _ in sources()} == set(PACKAGES)


@pytest.mark.parametrize("part", PACKAGES)
def test_dependencies_point_one_way(part: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {top}"
             for owner, path in sources() if owner == part
             for line, top in project_imports(path) if top != part and top not in ALLOWED[part]]
    assert not wrong, f"{part} may import only {sorted(ALLOWED[part]) or 'none of the others'}:\n" + "\n".join(wrong)


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from eval.metrics import rank_of\n    import cli.main\n")
    assert list(project_imports(module)) == [(2, "eval"), (3, "cli")]
