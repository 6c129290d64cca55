"""Every ```python block of README.md and docs/*.md runs, page by page in one namespace.

Blocks fenced with another info string (```text, ```bash) are shown, not run.
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
