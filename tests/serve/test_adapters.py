"""lorajax.serve.DevicePool: a load writes the adapter's zero-padded serving form into its slot (batched, in place,
one compilation), and `prefetch` loads waiting adapters without ever evicting a pinned one.

A tiny random Llama (2 layers, width 16) and five adapters of different variants, ranks and targets in one store;
pools built directly (no engine), each write checked against the defining layout: ``A[slot, :, :k] = A``,
``B[slot, :k, :] = B``, zeros beyond the adapter's rank, ``scale``, ``gain`` (1 where the adapter has none), and
untouched slots / targets left as they were.
"""

import jax
import numpy as np
import pytest

import lorajax
from lorajax.models import llama
from lorajax.serve import AdapterStore, DevicePool

SPECS = {
    "a": lorajax.Spec("lora", rank=2, targets=["q_proj", "v_proj"], init_weights=False),
    "b": lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "o_proj"], init_weights=False, use_rslora=True),
    "c": lorajax.Spec("dora", rank=3, targets=["v_proj", "o_proj"], init_weights=False),
    "d": lorajax.Spec("lora", rank=1, targets=["q_proj"], init_weights=False),
    "e": lorajax.Spec("lora", rank=2, targets=["o_proj"], init_weights=False),
}


def _random(shapes, rng):
    return jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)


def _adapter(spec, params, rng):
    """``(spec, adapters)`` with random non-zero values (shapes traced, not initialised: fast)."""
    return spec, _random(jax.eval_shape(lambda k: lorajax.init(spec, params, k), jax.random.key(0)), rng)


@pytest.fixture(scope="module")
def store():
    cfg = llama.Config(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(llama.build(cfg).init, jax.random.key(0), *llama.example_inputs(cfg))
    store = AdapterStore(_random(shapes, rng)["params"])
    for name, spec in SPECS.items():
        store.add(name, _adapter(spec, store.params, rng))
    return store


def _pool(store, slots, max_loads):
    targets = sorted({m for n in store.names() for m in store[n].targets})
    shapes = {}
    for m in targets:
        e = next(store[n].targets[m] for n in store.names() if m in store[n].targets)
        shapes[m] = (e["A"].shape[0], e["B"].shape[1])
    ranks = {m: max(store[n].ranks.get(m, 1) for n in store.names()) for m in targets}
    return DevicePool(store, slots, shapes, ranks, max_loads=max_loads)


def _check_slot(pool, slot, name):
    """The pool's slot holds adapter ``name`` (None: the zero adapter) in serving form, zero-padded."""
    targets = {} if name is None else pool.store[name].targets
    for m, leaves in jax.device_get(pool.pool).items():
        a, b, scale, gain = (leaves[k][slot] for k in ("A", "B", "scale", "gain"))
        e = targets.get(m)
        if e is None:
            assert not a.any() and not b.any() and scale == 0 and (gain == 1).all(), (slot, name, m)
            continue
        k = e["A"].shape[1]
        np.testing.assert_array_equal(a[:, :k], e["A"])
        np.testing.assert_array_equal(b[:k], e["B"])
        assert not a[:, k:].any() and not b[k:].any()
        assert scale == np.float32(e["scale"])
        np.testing.assert_array_equal(gain, np.ones_like(gain) if e["gain"] is None else e["gain"])


def test_batched_write_places_padded_entries_in_place_and_compiles_once(store):
    assert store["c"].targets["model.layers.0.self_attn.o_proj"]["gain"] is not None  # DoRA: a gain
    pool = _pool(store, slots=5, max_loads=2)
    old = jax.tree.leaves(pool.pool)
    slots = {n: pool.acquire(n) for n in ("a", "b", "c")}  # queued: nothing is written yet
    assert pool.loads == pool.writes == 0 and sorted(slots.values()) == [1, 2, 3]
    for n in ("a", "b", "c"):
        _check_slot(pool, slots[n], n)  # reading pool.pool flushed the three loads: chunks of 2 + 1
    assert (pool.loads, pool.writes, pool.write_compiles) == (3, 2, 1)
    assert all(x.is_deleted() for x in old)  # the pool's buffers were donated: written in place
    for s in (0, 4):
        _check_slot(pool, s, None)  # the base slot and the free slot are untouched

    # b and c released; d takes the free slot, e evicts b (least recently used unpinned): one write of both
    pool.release(slots["b"])
    pool.release(slots["c"])
    assert pool.acquire("d") == 4 and pool.acquire("e") == slots["b"]
    jax.block_until_ready(pool.pool)
    assert list(pool.resident) == ["a", "c", "d", "e"] and (pool.loads, pool.writes, pool.write_compiles) == (5, 3, 1)
    for n, s in pool.resident.items():
        _check_slot(pool, s, n)

    # an adapter replaced in the store under the same name is packed again, not served from the host cache
    w_before = pool.host_entry("e")[0]
    with pytest.raises(ValueError, match="adapter 'e' is pinned by 1"):
        pool.forget("e")
    pool.release(slots["b"])
    pool.forget("e")
    store.remove("e")
    store.add("e", _adapter(SPECS["e"], store.params, np.random.default_rng(1)))
    slot = pool.acquire("e")
    _check_slot(pool, slot, "e")
    assert not np.array_equal(pool.host_entry("e")[0], w_before) and pool.write_compiles == 1
    with pytest.raises(ValueError, match="max_loads must be a positive int, got 0"):
        _pool(store, slots=3, max_loads=0)


def test_prefetch_never_evicts_a_pinned_adapter(store):
    pool = _pool(store, slots=4, max_loads=3)  # three adapter slots
    sa = pool.acquire("a")  # pinned: a running request uses it
    pool.release(pool.acquire("b"))  # resident, unpinned
    assert pool.prefetch(["c", None, "c"]) == ["c"]  # into the free slot; None and repeats are skipped
    assert pool.pins[pool.resident["c"]] == 0 and pool.prefetched == 1
    # full: d may evict b only (c is wanted too, a is pinned); e finds no slot
    assert pool.prefetch(["c", "d", "e"]) == ["d"]
    assert list(pool.resident) == ["a", "c", "d"] and pool.resident["a"] == sa and pool.pins[sa] == 1
    assert pool.prefetch(["b", "e"]) == ["b", "e"]  # c and d are not wanted now: evicted; a is still pinned
    assert list(pool.resident) == ["a", "b", "e"] and pool.resident["a"] == sa and pool.pins[sa] == 1
    assert pool.acquire("e") == pool.resident["e"] and pool.loads == 6  # admitted after its prefetch: no load
    assert pool.prefetch(["c"]) == ["c"] and "b" not in pool.resident  # b: the one unpinned adapter
    pool.acquire("c")
    assert pool.prefetch(["d"]) == [] and pool.loads == 7  # every slot pinned: nothing evicted
    assert [pool.pins[pool.resident[n]] for n in ("a", "e", "c")] == [1, 1, 1]
    jax.block_until_ready(pool.pool)
    for n, s in pool.resident.items():
        _check_slot(pool, s, n)
    assert pool.write_compiles == 1
