"""Every ```python block of README.md and docs/*.md runs, page by page in one namespace.

Blocks fenced with another info string (```text, ```bash) are shown, not run. The README's
commands and extras must exist too: its `make` targets in the Makefile, its extras in pyproject.toml.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_pages_have_code_to_run():
    assert BLOCK.findall((ROOT / "README.md").read_text()), "README.md lost its example"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(BLOCK.findall(page.read_text()), 1):
        try:
            exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
        except Exception as error:  # say which block broke
            raise AssertionError(f"{page.name}, python block {number} failed: {error!r}") from error


def optional_dependencies() -> set[str]:
    """The extras pyproject.toml defines (its [project.optional-dependencies] table)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", text, re.MULTILINE | re.DOTALL)
    assert table, "pyproject.toml has no [project.optional-dependencies]"
    return set(re.findall(r"^([\w-]+) = \[", table.group(1), re.MULTILINE))


def test_readme_names_the_distribution_and_real_extras():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r'^name = "spn-wsol"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert "spn[" not in readme, "`spn` on PyPI is another project: the distribution is spn-wsol"
    groups = re.findall(r"spn-wsol\[([\w,-]+)\]", readme) + re.findall(r"EXTRAS=([\w,-]+)", readme)
    named = {extra for group in groups for extra in group.split(",")}
    assert "pictures" in named
    assert named <= optional_dependencies(), sorted(named - optional_dependencies())


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", (ROOT / "README.md").read_text()))
    assert {"test", "lint", "demo"} <= used
    assert used <= targets, sorted(used - targets)
