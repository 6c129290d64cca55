"""Every Example in spn's docstrings runs and prints what it says (doctest, module by module):
a reader copies them, so a stale one is a bug."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import spn

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(spn.__path__, prefix="spn.") if not info.name.endswith("__main__")
)


def test_the_walk_finds_the_package():
    assert {"spn.functional", "spn.data.erased", "spn.methods.erasing", "spn.models.levels"} <= set(MODULES)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (printed above)"
