"""The code's layout as documented (#15): the README's layout section names every module, and a module over 400
lines says at its top why it is one module."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

PACKAGE = REPO / "service" / "facerecon"
#: Sub-packages whose every module the layout names (facemodel/ and batch/ are described as a whole).
NAMED_ONE_BY_ONE = ("api", "detect", "nets", "render", "train")
MAX_LINES = 400
#: Over the limit without a stated reason yet, each under active change elsewhere (its reason is owed, not waived).
SIZE_REASON_OWED: set[str] = set()


def _layout_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Repository layout"):]
    start = section.index("```")
    return section[start: section.index("```", start + 3)]


def test_the_readme_layout_names_every_module() -> None:
    block = _layout_block()

    def named(name: str) -> bool:
        return re.search(r"(?<![\w/.])" + re.escape(name) + r"(?![\w])", block) is not None

    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    top += [p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    subs = [p.name for sub in NAMED_ONE_BY_ONE for p in (PACKAGE / sub).glob("*.py") if p.name != "__init__.py"]
    missing = sorted(n for n in top + subs if not named(n))
    assert not missing, f"README's layout section does not name {missing}"


def test_a_module_over_400_lines_says_why() -> None:
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        source = path.read_text()
        if source.count("\n") <= MAX_LINES or rel in SIZE_REASON_OWED:
            continue
        doc = ast.get_docstring(ast.parse(source)) or ""
        if not re.search(r"^Size: over 400 lines", doc, re.MULTILINE):
            unexplained.append(rel)
    assert not unexplained, f"over {MAX_LINES} lines without a 'Size: over 400 lines ...' reason: {unexplained}"
    for rel in SIZE_REASON_OWED:  # the owed list shrinks once a reason is written
        path = PACKAGE / rel
        if path.is_file() and path.read_text().count("\n") > MAX_LINES:
            assert "Size: over 400 lines" not in (ast.get_docstring(ast.parse(path.read_text())) or ""), rel
