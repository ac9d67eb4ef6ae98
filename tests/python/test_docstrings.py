"""Every public name documents itself with an example, and the examples run as written.

The examples see their module's names and ``torch``, ``nn`` and ``shardpipe``; anything
else they build themselves. Lines that write files or need GPUs or ``torchrun`` say
``# doctest: +SKIP``.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import shardpipe

MODULES = sorted(info.name for info in pkgutil.iter_modules(shardpipe.__path__, "shardpipe.")
                 if not info.name.startswith("shardpipe._"))


@pytest.mark.parametrize("name", shardpipe.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(getattr(shardpipe, name))
    assert doc, f"shardpipe.{name} has no docstring"
    assert "Example" in doc and ">>>" in doc, f"shardpipe.{name}'s docstring has no example"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    mod = importlib.import_module(module)
    globs = {**vars(mod), "torch": torch, "nn": nn, "shardpipe": shardpipe}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(mod, globs=globs)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module} has no examples"
    assert result.failed == 0, f"{result.failed} example lines of {module} failed (see stdout)"
