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

import chex
import pytest
from absl.testing import parameterized

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


# ----------------------------------------------------------------------------
# What a new variant needs: its file (here a module made in the test), one
# registry line (here a monkeypatched entry) and its tests. Nothing else.
# ----------------------------------------------------------------------------


def _toy_module():
    """ScaledLoRA, ``W' = W + γ·s·A·B``, with a PEFT-style format of its own ("TOYSCALED")."""
    import types

    import jax
    import jax.numpy as jnp

    from lorajax.variants import lora, options
    from lorajax.variants.base import EVAL, PeftFormat, additive
    from lorajax.variants.options import checks, option

    @dataclasses.dataclass(frozen=True)
    class ToyOptions(options.Options):
        #: γ at init
        gamma_init: float = option(1.0, checks.finite)
        #: adapter dtype; None: float32
        dtype: str | None = option(None, checks.dtype)

    def init(key, w, t):
        return {**lora.init(key, w, t), "gamma": jnp.full((1,), t.options.gamma_init, jnp.float32)}

    def delta(w, adapter, t):
        return adapter["gamma"][0] * lora.delta(adapter, t)

    adapted, unadapted = additive(delta)

    def apply(x, w, adapter, t, ctx=EVAL):
        y = x @ w
        return y + (adapter["gamma"][0] * lora.low_rank(x, adapter, t)).astype(y.dtype)

    def from_config(config, common, opts):
        return lorajax.Spec("toy_scaled", alpha=float(config["lora_alpha"]), **common,
                            gamma_init=float(config["gamma_init"]))

    def to_config(spec, targets):
        return {"peft_type": "TOYSCALED", "lora_alpha": spec.alpha, "gamma_init": spec.options.gamma_init}

    module = types.ModuleType("lorajax.variants._toy_scaled")
    module.VARIANT = Variant(
        name="toy_scaled", init=init, adapted=adapted, apply=apply, unadapted=unadapted, options=ToyOptions,
        trainable_count=lambda targets: sum(t.rank * sum(t.matrix_shape) + 1 for t in targets),
        peft=PeftFormat(("TOYSCALED",), fields=frozenset({"lora_alpha", "gamma_init"}),
                        tensors=lora.PEFT_TENSORS + (("gamma", "gamma", None),),
                        from_config=from_config, to_config=to_config),
        doc="ScaledLoRA (test only).",
    )
    return module, jax


def test_a_new_variant_needs_only_its_file(monkeypatch, tmp_path):
    import sys

    import flax.linen as nn
    import numpy as np

    module, jax = _toy_module()
    monkeypatch.setitem(sys.modules, "lorajax.variants._toy_scaled", module)
    monkeypatch.setitem(registry._MODULES, "toy_scaled", "_toy_scaled")  # the one registry line

    model = nn.Sequential([nn.Dense(6), nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 5))
    variables = model.init(jax.random.key(1), x)
    spec = lorajax.Spec("toy_scaled", rank=2, alpha=4.0, targets=["layers_0", "layers_1"], gamma_init=0.5)
    adapters = lorajax.init(spec, variables, 2)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.1, adapters)
    y_f = lorajax.adapt(model.apply, spec, mode="factored")(variables, adapters, x)
    y_m = lorajax.adapt(model.apply, spec, mode="merged")(variables, adapters, x)
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_m), rtol=1e-5, atol=1e-5)
    assert lorajax.count_params(spec, variables, adapters)["trainable"] == module.VARIANT.trainable_count(
        lorajax.select(spec, variables))
    # the PEFT folder round-trips through the generic lorajax.peft
    lorajax.peft.save(tmp_path / "toy", spec, adapters, variables)
    spec2, loaded = lorajax.peft.load(tmp_path / "toy", variables)
    assert spec2.variant == "toy_scaled" and spec2.options.gamma_init == 0.5 and spec2.alpha == 4.0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                           loaded, adapters)
    # and it is picked up by the capability listings, with no entry anywhere else
    assert "toy_scaled" in registry.with_capability("peft")
    with pytest.raises(ValueError, match="squeeze supports the variants with an s·A·B term"):
        lorajax.squeeze(spec, adapters, 1)


# ----------------------------------------------------------------------------
# Every variant's functions are pure: the same result with and without jit
# (chex.variants), with the shapes and dtypes the contract promises.
# ----------------------------------------------------------------------------



def _one_target(name):
    import jax

    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (12, 10))}}
    spec = lorajax.Spec(name, rank=2, targets=["d"])
    adapters = lorajax.init(spec, params, 1)
    adapters = lorajax.combine(jax.tree_util.tree_map(lambda a: a + 0.1, lorajax.partition(spec, adapters)[0]),
                               lorajax.partition(spec, adapters)[1])
    (t,) = lorajax.select(spec, params)
    adapter = {**adapters["d"]["kernel"], **adapters.get("_shared", {})}
    x = jax.random.normal(jax.random.key(2), (7, 12))
    return registry.get(name), t, params["d"]["kernel"], adapter, x


class VariantFunctionsArePure(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(n, n) for n in NAMES])
    def test_apply_and_adapted(self, name):
        from lorajax.variants.base import EVAL

        v, t, w, adapter, x = _one_target(name)
        if v.apply is not None:
            y = self.variant(lambda x, w, a: v.apply(x, w, a, t, EVAL))(x, w, adapter)
            chex.assert_shape(y, (7, 10))
            chex.assert_type(y, x.dtype)
            chex.assert_tree_all_finite(y)
            if v.adapted is not None:
                chex.assert_trees_all_close(y, x @ v.adapted(w, adapter, t, EVAL), rtol=1e-4, atol=1e-4)
        if v.adapted is not None:
            w2 = self.variant(lambda w, a: v.adapted(w, a, t, EVAL))(w, adapter)
            chex.assert_shape(w2, w.shape)
            chex.assert_type(w2, w.dtype)
            chex.assert_trees_all_close(w2, v.adapted(w, adapter, t, EVAL), rtol=1e-5, atol=1e-5)


def test_no_private_name_imported_across_modules():
    """``from lorajax.x import _name`` (or ``x._name`` after ``import``) is not used between modules.

    Package-private modules (``lorajax/optim/_checks.py``, ``lorajax/inits/_svd.py``, ...) are fine
    inside their own package; their names are public within it.
    """
    pattern = re.compile(r"from (lorajax|pallas_kernels)[\w.]* import [^#\n]*\b_[a-z]\w*")
    found = []
    for folder in ("lorajax", "pallas_kernels", "experiments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for m in pattern.finditer(text):
                source, imported = m.group(0)[len("from "):].split(" import ", 1)
                names = [n.split(" as ")[0].strip("() ") for n in imported.split(",")]
                # a package-private module (``from pallas_kernels import _common``) inside its own package is fine
                inside = path.parent == ROOT.joinpath(*source.split("."))
                private = [n for n in names if n.startswith("_") and not inside]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)
