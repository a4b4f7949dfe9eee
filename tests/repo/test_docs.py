"""The README's "What is where" table says what the code says: each row's text is the first paragraph of
that folder's (or module's) docstring, and its floor is the one tests/repo/test_layering.py enforces."""
import ast
import re

from tests import ROOT
from tests.repo.test_layering import FLOORS, group

ROW = re.compile(r"^\| `([\w/.]+)` \| (\d+) \| (.+) \|$")


def layout_rows() -> list[tuple[str, int, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What is where", 1)[1].split("\n## ", 1)[0]
    return [(m[1], int(m[2]), m[3]) for m in map(ROW.match, section.splitlines()) if m]


def first_paragraph(path: str) -> str:
    file = ROOT / path / "__init__.py" if path.endswith("/") else ROOT / path
    doc = ast.get_docstring(ast.parse(file.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def test_every_row_matches_its_docstring_and_floor():
    rows = layout_rows()
    assert len(rows) >= 10
    for path, floor, text in rows:
        assert text == first_paragraph(path), f"README row for {path} differs from its docstring"
        module = path.rstrip("/").removesuffix(".py").replace("/", ".")
        assert FLOORS[group(module)] == floor, f"README gives {path} floor {floor}"


def test_every_package_folder_has_a_row():
    listed = {path for path, _, _ in layout_rows()}
    for init in ROOT.glob("*/**/__init__.py"):
        folder = init.parent.relative_to(ROOT).as_posix() + "/"
        if folder.split("/")[0] in ("kvlab", "emulator", "workers", "router", "loadtests") and folder.count("/") <= 2:
            assert folder in listed, f"{folder} has no row in README's What is where"
