"""The variant contract v2 holds across the code base (issue "Variant contract v2").

* Generic code never asks a variant's name: no ``variant == "<registered name>"``
  (or ``!=``, ``in``) outside ``lorajax/variants/``; it reads declared
  capabilities instead (`Variant.factors`, `truncate`, `peft`, ...).
* Every variant's options are an `Options` dataclass whose fields are documented
  by a ``#:`` comment.
* A `Variant` has no behaviour flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import pytest

import lorajax
from lorajax import registry
from lorajax.variants.base import Variant
from lorajax.variants.options import Options

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = lorajax.list_variants()


def _generic_sources():
    for folder in ("lorajax", "pallas_kernels", "experiments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "variants" not in path.relative_to(ROOT).parts:
                yield path


def test_no_variant_name_checks_outside_variants():
    names = "|".join(re.escape(n) for n in NAMES)
    quoted = rf"""["']({names})["']"""
    # variant == "lora", spec.variant != 'dora', variant in ("lora", "dylora"), ... not in [...]
    pattern = re.compile(rf"variant\w*\s*(==|!=|\bnot in\b|\bin\b)\s*[\(\[\{{]?\s*{quoted}|{quoted}\s*(==|!=)\s*[\w.]*variant")
    found = []
    for path in _generic_sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "generic code checks variant names (declare a capability instead):\n" + "\n".join(found)


def test_name_check_finder_finds_one():
    """The pattern above does catch the forms it is meant to catch."""
    names = "|".join(re.escape(n) for n in NAMES)
    quoted = rf"""["']({names})["']"""
    pattern = re.compile(rf"variant\w*\s*(==|!=|\bnot in\b|\bin\b)\s*[\(\[\{{]?\s*{quoted}|{quoted}\s*(==|!=)\s*[\w.]*variant")
    for line in ('if spec.variant != "lora":', "if variant in ('vera', 'x'):", 'x = "dora" == spec.variant'):
        assert pattern.search(line), line
    assert not pattern.search('if cfg.spec.variant == "full":')  # an experiment arm, not a registered variant


@pytest.mark.parametrize("name", NAMES)
def test_options_are_typed_and_documented(name):
    v = registry.get(name)
    assert isinstance(v.options, type) and issubclass(v.options, Options), f"{name}: options is not an Options class"
    source = inspect.getsource(v.options).splitlines()
    for f in dataclasses.fields(v.options):
        at = next(i for i, line in enumerate(source) if re.match(rf"\s+{f.name}\s*:", line))
        assert source[at - 1].strip().startswith("#:"), f"{name}: option {f.name!r} has no '#:' comment above it"


def test_variant_has_no_behaviour_flags():
    fields = {f.name for f in dataclasses.fields(Variant)}
    assert not fields & {"uses_context", "has_aux", "validate", "frozen"}, fields


@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_adapt_call_looks_up_once(mode, monkeypatch):
    """One call of `lorajax.adapt`'s function: at most one registry lookup and exactly one target selection."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lorajax import targets

    model = nn.Sequential([nn.Dense(6), nn.Dense(3)])
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("lora", rank=2, targets=".*")
    adapters = lorajax.init(spec, variables, 1)
    fn = lorajax.adapt(model.apply, spec, mode=mode)
    counts = {"get": 0, "select": 0}
    real_get, real_select = registry.get, targets.select

    def get(*a, **k):
        counts["get"] += 1
        return real_get(*a, **k)

    def select(*a, **k):
        counts["select"] += 1
        return real_select(*a, **k)

    monkeypatch.setattr(registry, "get", get)
    monkeypatch.setattr(targets, "select", select)
    fn(variables, adapters, x)
    assert counts["select"] == 1 and counts["get"] <= 1, counts
