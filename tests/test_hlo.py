"""lorajax.hlo: matrix products of HLO text with their operand shapes, and the weight-gradient test on them.

Toy programs: x [10, 12] (10 tokens), W [12, 20], A [12, 4], B [4, 20]. A gradient of W contracts over the
10 tokens; A @ B has W's shape but contracts over the rank 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lorajax import hlo

T, D_IN, D_OUT, R = 10, 12, 20, 4
W_SHAPES = {(D_IN, D_OUT), (D_OUT, D_IN)}


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile().as_text()


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(0), (T, D_IN), dtype)


def test_weight_gradient_of_x_at_w_is_flagged():
    x, w = _x(), jnp.ones((D_IN, D_OUT))
    text = _compiled(jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w))), w)
    (grad,) = hlo.weight_gradients(text, W_SHAPES, T)
    assert grad.out_shape in W_SHAPES and grad.contracted == T
    assert {grad.lhs_shape, grad.rhs_shape} <= {(T, D_IN), (T, D_OUT), (D_IN, T), (D_OUT, T)}
    assert hlo.count_weight_gradients(text, W_SHAPES, T) == (1, 1)


def test_product_of_factors_is_weight_shaped_but_not_a_gradient():
    x, a, b = _x(), jnp.ones((D_IN, R)), jnp.ones((R, D_OUT))
    forward = _compiled(lambda a, b: jnp.tanh(x @ (a @ b)), a, b)
    assert ((D_IN, D_OUT), (D_IN, R), (R, D_OUT), R) in [p[:4] for p in hlo.dot_products(forward)]  # A @ B
    assert hlo.weight_gradients(forward, W_SHAPES, T) == []
    assert hlo.count_weight_gradients(forward, W_SHAPES, T) == (0, 1)
    # differentiated through the merged weight, autodiff forms d(A @ B) = x^T dy: that one is a gradient
    merged = _compiled(jax.grad(lambda a, b: jnp.sum(jnp.tanh(x @ (a @ b))), argnums=(0, 1)), a, b)
    (grad,) = hlo.weight_gradients(merged, W_SHAPES, T)
    assert grad.contracted == T and hlo.count_weight_gradients(merged, W_SHAPES, T) == (1, 2)


def test_bf16_programs():
    """bf16 inputs: compiled (the CPU may compute in f32) and before optimisation (bf16 dots, names without %)."""
    x, w = _x(jnp.bfloat16), jnp.ones((D_IN, D_OUT), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))))
    compiled, before = grad.lower(w).compile().as_text(), grad.lower(w).as_text(dialect="hlo")
    assert compiled is not None and before is not None
    assert len(hlo.weight_gradients(compiled, W_SHAPES, T)) == 1
    (g,) = hlo.weight_gradients(before, W_SHAPES, T)
    assert g.contracted == T and "bf16[" in g.line.split("dot(")[0]


# Hand-written modules in XLA's text format: fusions with clashing local names, inline operand shapes,
# batch dims, tiled layouts, a GEMM custom-call with a tuple result, an instruction over several lines.
FUSED = """HloModule m, entry_computation_layout={(f32[10,12]{1,0}, f32[10,20]{1,0})->f32[12,20]{1,0}}

%fused_a (p.0: f32[12,4], p.1: f32[4,20]) -> f32[12,20] {
  %p.0 = f32[12,4]{1,0} parameter(0)
  %p.1 = f32[4,20]{1,0} parameter(1)
  ROOT %d = f32[12,20]{1,0} dot(%p.0, %p.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_b (p.0: f32[10,12], p.1: f32[10,20]) -> f32[12,20] {
  %p.0 = f32[10,12]{1,0} parameter(0)
  %p.1 = f32[10,20]{1,0} parameter(1)
  ROOT %d = f32[12,20]{1,0} dot(%p.0, %p.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[10,12], dy: f32[10,20]) -> f32[12,20] {
  %x = f32[10,12]{1,0} parameter(0)
  %dy = f32[10,20]{1,0} parameter(1), metadata={op_name="dy dot(x)"}
  %a = f32[12,4]{1,0} slice(%x), slice={[0:12], [0:4]}
  %b = f32[4,20]{1,0} slice(%dy), slice={[0:4], [0:20]}
  %f.0 = f32[12,20]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_a
  %f.1 = f32[12,20]{1,0} fusion(%x, %dy), kind=kCustom, calls=%fused_b
  ROOT %s = f32[12,20]{1,0} add(%f.0, %f.1)
}
"""


def test_fused_computations_resolve_names_locally():
    products = hlo.dot_products(FUSED)
    assert [p.contracted for p in products] == [R, T]
    assert [p.lhs_shape for p in products] == [(D_IN, R), (T, D_IN)]
    assert hlo.count_weight_gradients(FUSED, W_SHAPES, T) == (1, 2)


def test_inline_operand_shapes_batch_dims_and_tiled_layouts():
    text = """ENTRY e {
  ROOT dot.1 = bf16[3,12,20]{2,1,0:T(8,128)(2,1)} dot(bf16[3,10,12]{2,1,0:T(8,128)(2,1)} %x, bf16[3,10,20]{2,1,0} dy), \
lhs_batch_dims={0}, lhs_contracting_dims={1}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}"""
    (p,) = hlo.dot_products(text)
    assert p[:4] == ((3, D_IN, D_OUT), (3, T, D_IN), (3, T, D_OUT), T)
    assert hlo.weight_gradients(text, {(3, D_IN, D_OUT)}, T) == [p]


def test_gemm_custom_call_with_tuple_result_over_several_lines():
    text = """ENTRY e {
  %x = f16[10,12]{1,0} parameter(0)
  %dy = f16[10,20]{1,0} parameter(1)
  %gemm = (f16[12,20]{1,0}, s8[1024]{0}) custom-call(%x, %dy),
    custom_call_target="__cublas$gemm",
    backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,
      "dot_dimension_numbers":{"lhs_contracting_dimensions":["0"],"rhs_contracting_dimensions":["0"],
      "lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %g = f16[12,20]{1,0} get-tuple-element(%gemm), index=0
}"""
    (p,) = hlo.dot_products(text)
    assert p[:4] == ((D_IN, D_OUT), (T, D_IN), (T, D_OUT), T)
    broken = text.replace('"lhs_contracting_dimensions"', '"lhs_contracting"')
    with pytest.raises(ValueError, match="dot_dimension_numbers"):
        hlo.dot_products(broken)


def test_unreadable_products_raise():
    unknown = "ENTRY e {\n  ROOT %d = f32[12,20]{1,0} dot(%nowhere, %p), lhs_contracting_dims={0}\n}"
    with pytest.raises(ValueError, match="cannot find the shape of nowhere"):
        hlo.dot_products(unknown)
    changed = "ENTRY e {\n  ROOT %d = <f32 12x20> dot(%x, %y), lhs_contracting_dims={0}\n}"
    with pytest.raises(ValueError, match="cannot read this HLO dot"):
        hlo.dot_products(changed)
    bad_dims = FUSED.replace("lhs_contracting_dims={0}", "lhs_contracting_dims={2}")
    with pytest.raises(ValueError, match="do not fit the lhs shape"):
        hlo.dot_products(bad_dims)
