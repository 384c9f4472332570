"""pallas_kernels.multi_lora (Punica/S-LoRA batch): kernel and XLA baselines vs the gather reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.multi_lora import (BlockSizes, multi_lora, multi_lora_ragged_dot, multi_lora_reference,
                                       segment_layout)

SMALL = BlockSizes(16, 16, 16)


def make(x_shape, n, n_adapters, rank, dtype, adapter_dtype=jnp.float32, ids=None, seed=0):
    """A pool whose adapter g has rank ``max(1, rank - g)`` (zero-padded to ``rank``), random scales."""
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    a = rng.standard_normal((n_adapters, k, rank)) / np.sqrt(k)
    b = rng.standard_normal((n_adapters, rank, n))
    for g in range(n_adapters):
        a[g, :, max(1, rank - g):] = 0
        b[g, max(1, rank - g):] = 0
    scales = jnp.asarray(rng.uniform(0.5, 2.0, n_adapters), jnp.float32)
    if ids is None:
        ids = rng.integers(0, n_adapters, x_shape[0])
    return x, w, jnp.asarray(a, adapter_dtype), jnp.asarray(b, adapter_dtype), scales, jnp.asarray(ids, jnp.int32)


# (x shape [S, ..., in], out, G, R, dtype, blocks, layout, ids)
CASES = {
    # one id per sequence of 7 tokens; 3 row tiles of 16 per adapter at most; in, out off the blocks
    "per_sequence": ((5, 7, 50), 33, 4, 3, jnp.float32, SMALL, "prefetch", [3, 0, 3, 1, 3]),
    "per_sequence_pointer": ((5, 7, 50), 33, 4, 3, jnp.float32, SMALL, "pointer", [3, 0, 3, 1, 3]),
    "batch1_rank1": ((1, 24), 40, 3, 1, jnp.float32, None, "prefetch", [2]),
    # per-token ids, adapters 0 and 4 unused, rank 128, bf16 activations with f32 adapters
    "per_token_bf16_rank128": ((29, 40), 20, 6, 128, jnp.bfloat16, BlockSizes(None, 16, 16), "prefetch",
                               [1, 2, 3, 5] * 7 + [2]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, interpret, close):
    x_shape, n, g, r, dt, bs, layout, ids = CASES[case]
    x, w, a, b, s, ids = make(x_shape, n, g, r, dt, ids=ids)
    y = multi_lora(x, w, a, b, s, ids, block_sizes=bs, layout=layout, interpret=interpret)
    assert y.dtype == dt and y.shape == x_shape[:-1] + (n,)
    close(y, jax.jit(multi_lora_reference)(x, w, a, b, s, ids))


def test_reference_equals_each_adapter_alone_and_ragged_dot(close):
    x, w, a, b, s, ids = make((6, 3, 20), 12, 3, 4, jnp.float32, ids=[2, 0, 2, 1, 1, 0])
    ref = jax.jit(multi_lora_reference)(x, w, a, b, s, ids)
    xn, wn, an, bn, sn = (np.asarray(v, np.float64) for v in (x, w, a, b, s))
    for i, g in enumerate(np.asarray(ids)):
        close(ref[i], xn[i] @ wn + sn[g] * (xn[i] @ an[g]) @ bn[g], dtype=jnp.float32)
    close(jax.jit(multi_lora_ragged_dot)(x, w, a, b, s, ids), ref)


def test_traced_ids_under_jit_give_nan_rows_when_out_of_range(interpret, close):
    x, w, a, b, s, _ = make((4, 2, 20), 12, 3, 2, jnp.float32)
    fn = jax.jit(lambda ids: multi_lora(x, w, a, b, s, ids, interpret=interpret))
    good = jnp.array([0, 2, 1, 2], jnp.int32)
    y = fn(good)
    close(y, jax.jit(multi_lora_reference)(x, w, a, b, s, good))
    y_bad = fn(jnp.array([0, 3, 1, -1], jnp.int32))  # same compiled function, ids are data
    assert bool(jnp.isnan(y_bad[1]).all() and jnp.isnan(y_bad[3]).all())
    close(y_bad[jnp.array([0, 2])], y[jnp.array([0, 2])])


def test_segment_layout_puts_each_tile_on_one_adapter():
    rows = jnp.array([2, 0, 2, 2, 1, 0, 2, 2, 2], jnp.int32)
    src, dest, tile_group = jax.jit(segment_layout, static_argnums=(1, 2))(rows, 4, 2)
    src, dest, tile_group = map(np.asarray, (src, dest, tile_group))
    assert sorted(dest.tolist()) == sorted(set(dest.tolist()))  # one slot per row
    assert (src[dest] == np.arange(9)).all()
    for t, g in enumerate(tile_group):
        slots = src[2 * t: 2 * t + 2]
        real = slots[slots < 9]
        if g < 4:
            assert (np.asarray(rows)[real] == g).all()
        else:
            assert real.size == 0  # tiles past the last adapter hold no row
    assert len(tile_group) == -(-9 // 2) + 4


def test_bad_input_raises_before_launch():
    x, w, a, b, s, ids = make((4, 8), 6, 3, 2, jnp.float32)
    with pytest.raises(ValueError, match="adapter index 3 at position 1 is out of range for a pool of 3"):
        multi_lora(x, w, a, b, s, jnp.array([0, 3, 1, 2]))
    with pytest.raises(ValueError, match="adapter index -1"):
        multi_lora(x, w, a, b, s, np.array([0, 1, -1, 2]))
    with pytest.raises(TypeError, match="ids must be integers"):
        multi_lora(x, w, a, b, s, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="one adapter index per leading row"):
        multi_lora(x, w, a, b, s, ids[:3])
    with pytest.raises(ValueError, match=r"B pool must be \[G, R, out\]"):
        multi_lora(x, w, a, b[:2], s, ids)
    with pytest.raises(ValueError, match="in = 8"):
        multi_lora(x, w, a[:, :7], b, s, ids)
    with pytest.raises(TypeError, match="dtype mismatch, b_pool is bfloat16"):
        multi_lora(x, w, a, b.astype(jnp.bfloat16), s, ids)
    with pytest.raises(ValueError, match="layout"):
        multi_lora(x, w, a, b, s, ids, layout="sorted")
