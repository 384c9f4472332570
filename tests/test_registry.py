"""Every registered variant is complete (DESIGN.md, habits 1 and 3).

For each name in ``lorajax.list_variants()``: reachable through
``lorajax.registry.get``, ``VARIANT.name`` equals the key, the module
docstring has an ``Example`` (run as a doctest) and ``References``, and a test
file ``tests/variants/test_<name>.py`` exists.
"""

from __future__ import annotations

import doctest
import inspect
import os

import pytest

import lorajax
from lorajax import registry
from lorajax.variants.base import Variant

VARIANTS = lorajax.list_variants()
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _module(name):
    return inspect.getmodule(registry.get(name).init)


def test_registry_is_not_empty_and_sorted():
    assert VARIANTS == sorted(VARIANTS)
    assert {"lora", "dora", "vera"} <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_reachable_and_named(name):
    v = registry.get(name)
    assert isinstance(v, Variant)
    # an alias key maps to another variant's module (e.g. "bone" -> miss) and is that variant
    assert v.name == (name if registry._MODULES[name] == name else registry._MODULES[name])
    assert callable(v.init)
    # input-dependent variants (routing) have no merged weight, only a factored forward
    assert callable(v.adapted) or (v.adapted is None and callable(v.apply))
    # the variant's module ends with VARIANT, and that object is what the registry returns
    assert getattr(_module(name), "VARIANT") is v
    # a Spec can be built for it with its defaults
    assert lorajax.Spec(name, rank=2).variant == name


@pytest.mark.parametrize("name", VARIANTS)
def test_docstring_has_example_and_references(name):
    doc = _module(name).__doc__ or ""
    assert "References" in doc, f"{name}: module docstring lacks a References section"
    assert "Example" in doc, f"{name}: module docstring lacks an Example"
    assert ">>>" in doc, f"{name}: the Example has no runnable doctest lines"
    assert registry.get(name).doc == doc


@pytest.mark.parametrize("name", VARIANTS)
def test_docstring_example_runs(name):
    module = _module(name)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{name}: no doctest found in the module docstring"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"


@pytest.mark.parametrize("name", VARIANTS)
def test_has_a_test_file(name):
    path = os.path.join(TESTS_DIR, "variants", f"test_{name}.py")
    assert os.path.isfile(path), f"{name}: missing {os.path.relpath(path, os.path.dirname(TESTS_DIR))}"


def test_unknown_variant_names_the_closest():
    with pytest.raises(ValueError, match="lora"):
        registry.get("lorra")
    with pytest.raises(ValueError, match="unknown variant"):
        lorajax.Spec("nope")
