"""One conformance suite over every lorajax optimiser (in the spirit of optax's ``contrib/_common_test.py``).

Each optimiser in `CASES` is built as ``factory(learning_rate, **keywords)`` on a
toy problem — a hand-made 2-layer MLP ``tanh(x W1 + b1) W2 + b2`` whose kernels
are adapted (``Spec("lora"|"sora", rank=2, targets=["l1", "l2"])``; GaLore trains
the params themselves) — and must:

(a) accept the ``None`` leaves of `lorajax.partition` (init and update; the other
    leaves' updates are unchanged by them);
(b) work inside ``optax.multi_transform`` next to ``optax.adamw`` (same updates
    as alone);
(c) work inside ``optax.inject_hyperparams`` with ``learning_rate`` injected
    (same updates as built directly, also after the injected rate is changed);
    the integers that fix state shapes go in ``static_args`` (column ``static``);
(d) jit once: ``jax.jit(step)`` traces once over all steps;
(e) keep dtypes (float32 and bfloat16 trees: updates and new params keep each
    leaf's dtype) and keep every state leaf's shape and dtype across steps;
(f) have its state placed by ``lorajax.sharding.shard(state, mesh, like=params)``
    on a 1-device mesh, and step from it to the unsharded result;
(g) lower the toy regression loss in 20 steps.

The table (`CASES`): name, factory, keywords, learning rate, the kind of tree,
and ``static`` — the arguments ``optax.inject_hyperparams`` must not inject,
with why. Keep shapes tiny: the whole file runs in well under a minute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import optim, sharding

TARGETS = ["l1", "l2"]
D_IN, D_HID, D_OUT, N = 8, 16, 8, 32
STEPS = 20


# --------------------------------------------------------------------------- the toy problem

def _mlp(p, x):
    h_NxH = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"][None, :])
    return h_NxH @ p["l2"]["kernel"] + p["l2"]["bias"][None, :]


@functools.lru_cache(maxsize=None)
def _problem():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"l1": {"kernel": jax.random.normal(k[0], (D_IN, D_HID)) / np.sqrt(D_IN), "bias": jnp.zeros(D_HID)},
              "l2": {"kernel": jax.random.normal(k[1], (D_HID, D_OUT)) / np.sqrt(D_HID), "bias": jnp.zeros(D_OUT)}}
    # the target: the same MLP with a rank-2 change of each kernel
    true = jax.tree.map(lambda x: x, params)
    true["l1"]["kernel"] = params["l1"]["kernel"] + jax.random.normal(k[2], (D_IN, 2)) @ jax.random.normal(
        k[3], (2, D_HID)) / 4
    true["l2"]["kernel"] = params["l2"]["kernel"] + jax.random.normal(k[4], (D_HID, 2)) @ jax.random.normal(
        k[5], (2, D_OUT)) / 4
    x = jax.random.normal(jax.random.key(1), (N, D_IN))
    return params, x, _mlp(true, x)


SPECS = {
    "lora": lorajax.Spec("lora", rank=2, alpha=4, targets=TARGETS),
    "sora": lorajax.Spec("sora", rank=2, alpha=4, targets=TARGETS),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    kind: str          # "lora" | "sora": an adapters tree; "full": the params (GaLore)
    spec: Any          # the adapters' Spec (None for "full")
    params: Any        # the frozen base (float32)
    tree: Any          # what the optimiser trains (float32)
    x: jax.Array
    y: jax.Array

    def loss(self, tree):
        if self.kind == "full":
            p = tree
        else:
            p = lorajax.merge(self.spec, self.params, tree)
        out = _mlp(jax.tree.map(lambda a: a.astype(jnp.float32), p), self.x)
        return jnp.mean((out - self.y) ** 2)


@functools.lru_cache(maxsize=None)
def setup(kind: str) -> Setup:
    params, x, y = _problem()
    if kind == "full":
        return Setup(kind, None, params, params, x, y)
    spec = SPECS[kind]
    trainable, _ = lorajax.partition(spec, lorajax.init(spec, params, 0))
    return Setup(kind, spec, params, trainable, x, y)


def with_frozen_leaves(kind: str, tree: Any) -> Any:
    """``tree`` plus ``None`` leaves as `lorajax.partition` gives them for frozen buffers."""
    if kind == "full":  # frozen biases
        return {k: {"kernel": v["kernel"], "bias": None} for k, v in tree.items()}
    params = _problem()[0]
    comp = lorajax.Spec("comp_lora", rank=2, targets=TARGETS)  # frozen comp_U / comp_V next to lora_A / lora_B
    trainable, _ = lorajax.partition(comp, lorajax.init(comp, params, 0))
    out = jax.tree.map(lambda x: x, tree)
    for t in TARGETS:
        nones = {k: v for k, v in trainable[t]["kernel"].items() if v is None}
        assert nones, "comp_lora's partition should give None leaves"
        out[t]["kernel"] = {**out[t]["kernel"], **nones}
    return out


# --------------------------------------------------------------------------- the table

GALORE_STATIC = ("rank", "update_proj_gap", "optim_bits", "block_size", "min_8bit_size", "in_axes")
STATIC_WHY = {
    "galore": "rank, update_proj_gap, optim_bits, block_size, min_8bit_size, in_axes fix the state's shapes and "
              "Python control flow (optax's own suite makes rank / update_proj_gap static for contrib.galore)",
    "adam_8bit": "block_size, min_8bit_size fix which leaves are quantised and the absmax shapes",
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kind: str
    lr: float
    keywords: Callable[[Setup], dict] = lambda s: {}
    static: tuple = ()  # static_args for optax.inject_hyperparams (why: STATIC_WHY)

    def build(self, s: Setup, lr: Any = None) -> optax.GradientTransformation:
        return self.factory(self.lr if lr is None else lr, **self.keywords(s))

    def __str__(self):
        return self.name


CASES = [
    Case("loraplus", optim.loraplus, "lora", 1e-2, lambda s: dict(lr_ratio=4.0)),
    Case("lora_pro", optim.lora_pro, "lora", 1e-2, lambda s: dict(spec=s.spec)),
    Case("allora", optim.allora, "lora", 1e-2, lambda s: dict(eta=2.0)),
    Case("sora", optim.sora, "sora", 1e-2, lambda s: dict(threshold=1e-4)),
    Case("galore", optim.galore, "full", 1e-2, lambda s: dict(targets=TARGETS, rank=2, update_proj_gap=5),
         static=GALORE_STATIC),
    Case("galore_8bit", optim.galore, "full", 1e-2,
         lambda s: dict(targets=TARGETS, rank=2, update_proj_gap=5, optim_bits=8, min_8bit_size=16),
         static=GALORE_STATIC),
    Case("adam_8bit", optim.adam_8bit, "lora", 1e-2, lambda s: dict(min_8bit_size=16),
         static=("block_size", "min_8bit_size")),
]


def test_table_covers_every_exported_optimiser():
    """Every alias in ``lorajax.optim`` is in the table, and has the one signature ``(learning_rate, *, ...)``."""
    aliases = {"loraplus", "lora_pro", "allora", "sora", "galore", "adam_8bit"}
    assert aliases <= set(optim.__all__)
    assert {c.factory.__name__ for c in CASES} == aliases
    import inspect
    for name in aliases:
        params = list(inspect.signature(getattr(optim, name)).parameters.values())
        assert params[0].name == "learning_rate" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name


def _close(a, b, rtol=1e-5, atol=1e-7):
    """Every leaf of ``a`` close to the leaf at the same path in ``b`` (``b`` may have more leaves)."""
    want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
    got = jax.tree_util.tree_flatten_with_path(a)[0]
    assert got and all(jax.tree_util.keystr(p) in want for p, _ in got)
    for p, x in got:
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(want[jax.tree_util.keystr(p)], np.float32),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(p))


def _spec_of(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def _drop_none(tree):
    if isinstance(tree, dict):
        return {k: _drop_none(v) for k, v in tree.items() if v is not None}
    return tree


IS_NONE = lambda x: x is None  # noqa: E731
params_ids = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """Tiny programs, many compilations: XLA's optimisation passes would dominate the run time."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@functools.lru_cache(maxsize=None)
def _case(name: str) -> tuple[Case, Setup, optax.GradientTransformation]:
    case = next(c for c in CASES if c.name == name)
    s = setup(case.kind)
    return case, s, case.build(s)


# --------------------------------------------------------------------------- (d), (e), (g): one jitted run each

@functools.lru_cache(maxsize=None)
def _train(name: str, dtype: str):
    """``STEPS`` jitted steps of the plain optimiser: traces, losses, dtypes, state specs, step-1 results."""
    case, s, tx = _case(name)
    tree = jax.tree.map(lambda x: x.astype(dtype), s.tree)
    traces = [0]

    @jax.jit
    def step(tree, state):
        traces[0] += 1
        loss, grads = jax.value_and_grad(s.loss)(tree)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, loss, updates, grads

    state = tx.init(tree)
    run = dict(specs=[_spec_of(state)], losses=[], dtypes=[],
               want=_spec_of(jax.tree.map(lambda x: x.astype(dtype), s.tree)))
    for i in range(STEPS):
        tree, state, loss, updates, grads = step(tree, state)
        if i == 0:
            run.update(grads=grads, updates=updates, state=state)
        run["specs"].append(_spec_of(state))
        run["losses"].append(float(loss))
        run["dtypes"].append((_spec_of(updates), _spec_of(tree)))
    run.update(traces=traces[0], cache=step._cache_size(), final=float(s.loss(tree)))
    return run


@params_ids
def test_jit_compiles_once(case):
    run = _train(case.name, "float32")
    assert run["traces"] == 1 and run["cache"] == 1, run["traces"]


@params_ids
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtypes_and_state_specs_kept(case, dtype):
    run = _train(case.name, dtype)
    assert run["traces"] == 1
    for upd, tree in run["dtypes"]:
        assert upd == run["want"] and tree == run["want"]
    for spec in run["specs"][1:]:
        assert spec == run["specs"][0]


@params_ids
def test_twenty_steps_lower_the_loss(case):
    run = _train(case.name, "float32")
    assert all(np.isfinite(run["losses"]))
    assert run["final"] < 0.8 * run["losses"][0], (run["losses"][0], run["final"])


# --------------------------------------------------------------------------- (a), (b), (f): one wrapped step

@functools.lru_cache(maxsize=None)
def _wrapped(name: str):
    """One jitted step of ``multi_transform({ours, adamw})`` over ``{"model": tree + None leaves, "head"}``,
    its state and inputs placed by ``sharding.shard(..., like=params)`` on a 1-device mesh."""
    case, s, tx = _case(name)
    mixed = with_frozen_leaves(case.kind, s.tree)
    head = {"kernel": jax.random.normal(jax.random.key(3), (D_OUT, 3))}
    tree = {"model": mixed, "head": head}
    labels = {"model": jax.tree.map(lambda _: "ours", mixed), "head": {"kernel": "adamw"}}
    both = optax.multi_transform({"ours": tx, "adamw": optax.adamw(1e-2)}, labels)

    def loss(tree):
        model = tree["model"]
        if case.kind == "full":  # frozen leaves come from the base
            model = jax.tree.map(lambda t, p: p if t is None else t, model, s.params, is_leaf=IS_NONE)
        return s.loss(_drop_none(model)) + 0.5 * jnp.sum(tree["head"]["kernel"] ** 2)

    @jax.jit
    def step(tree, state):
        grads = jax.grad(loss)(tree)
        updates, state = both.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, updates

    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    state = both.init(tree)
    placed = sharding.shard(state, mesh, like=s.params)
    new_tree, new_state, updates = step(sharding.shard(tree, mesh, like=s.params), placed)
    adamw = optax.adamw(1e-2)
    u_head, _ = adamw.update(head, adamw.init(head), head)
    return dict(tree=tree, state=state, placed=placed, mesh=mesh, new_tree=new_tree, new_state=new_state,
                updates=updates, u_head=u_head)


@params_ids
def test_none_leaves_from_partition(case):
    """(a) ``None`` leaves pass through init and update, and change nothing else."""
    w = _wrapped(case.name)
    mixed = w["tree"]["model"]
    assert any(x is None for x in jax.tree.leaves(mixed, is_leaf=IS_NONE))
    for out in (w["updates"], w["new_tree"]):
        assert jax.tree.structure(out, is_leaf=IS_NONE) == jax.tree.structure(w["tree"], is_leaf=IS_NONE)
    _close(w["updates"]["model"], _train(case.name, "float32")["updates"], rtol=1e-4, atol=1e-7)


@params_ids
def test_inside_multi_transform_next_to_adamw(case):
    """(b) next to ``adamw`` in ``multi_transform``: each part updated as by its optimiser alone."""
    w = _wrapped(case.name)
    _close(w["updates"]["head"], w["u_head"])
    _close(w["updates"]["model"], _train(case.name, "float32")["updates"], rtol=1e-4, atol=1e-7)


@params_ids
def test_state_placed_by_shard_like_params(case):
    """(f) ``sharding.shard(state, mesh, like=params)`` places every state leaf; the step runs from it."""
    w = _wrapped(case.name)
    assert jax.tree.structure(w["placed"]) == jax.tree.structure(w["state"])
    for x in jax.tree.leaves(w["placed"]):
        assert isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh.shape == w["mesh"].shape
    assert _spec_of(w["new_state"]) == _spec_of(w["state"])


# --------------------------------------------------------------------------- (c) inject_hyperparams

@params_ids
def test_inject_hyperparams_learning_rate(case):
    """(c) ``learning_rate`` injected: the first step equals the plain one; a changed rate takes effect."""
    _, s, _ = _case(case.name)
    run = _train(case.name, "float32")
    injected = optax.inject_hyperparams(case.factory, static_args=case.static)(
        learning_rate=case.lr, **case.keywords(s))
    state = injected.init(s.tree)
    assert set(state.hyperparams) >= {"learning_rate"}
    update = jax.jit(injected.update)
    u, new_state = update(run["grads"], state, s.tree)
    # hyper-parameters are float32 arrays there, Python floats in the plain optimiser: a few ulps apart
    _close(u, run["updates"], rtol=1e-4, atol=1e-7)
    _close(new_state.inner_state, run["state"], rtol=1e-4, atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(case.lr / 4, jnp.float32)
    u4, _ = update(run["grads"], state, s.tree)
    assert update._cache_size() == 1
    # a first step is linear in the learning rate, except SoRA's gates (proximal step: threshold not scaled)
    linear = jax.tree.map(lambda x, lab: x / 4 if lab != "gate" else None, u, optim.leaf_labels(u))
    _close(linear, u4, rtol=1e-4, atol=1e-8)


def test_uninjectable_arguments_say_so():
    """Without ``static_args``, an integer that fixes shapes is rejected by name."""
    s = setup("full")
    tx = optax.inject_hyperparams(optim.galore)(learning_rate=1e-2, targets=TARGETS, rank=2)
    with pytest.raises(TypeError, match=r"\['rank', 'update_proj_gap'.*static_args"):
        tx.init(s.tree)
