"""Test-wide JAX settings: 64-bit off, implicit rank promotion is an error."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
