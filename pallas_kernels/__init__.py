"""Pallas kernels for LoRA, each beside the pure-jnp reference it is tested against.

Layout follows ``jax/experimental/pallas/ops``: one module per kernel holding
the kernel body, its ``pallas_call`` wrapper, a ``BlockSizes`` dataclass, the
``custom_vjp`` where it is differentiated, and the ``*_reference`` in jnp.

* `lora_linear`: fused ``x W + s (x A) B``, forward kernel plus custom_vjp
  (``dx``, ``dA``, ``dB`` as Pallas kernels, no ``dW``).
  Used by ``lorajax.adapt(..., mode="factored", kernel="pallas")``.
* `multi_lora`: a batch whose rows use different adapters from a stacked pool
  (Punica SGMV / S-LoRA), forward only; XLA baselines `multi_lora_reference`
  (gather + batched matmul) and `multi_lora_ragged_dot`. Used by
  ``lorajax.multi_adapter``.
* `lora_attention`: Flash-LoRA-Attention (LRAgent), K/V = base cache + low-rank
  cache, never materialised per adapter; forward only.

Every kernel takes ``interpret=None`` (interpret mode on CPU, compiled on
GPU/TPU), falls back to its reference with a one-time warning where no Pallas
lowering exists, and checks shapes, dtypes and adapter ids before launching.
`resolve_mode(kernel, interpret)` and `COMPILED_BACKENDS` give the backend
rules (``pallas_kernels/_common.py``). The first compiled run on a GPU (H200,
Triton backend) is recorded in ``experiments/results/pallas_gpu_check.md``.
"""

from pallas_kernels._common import COMPILED_BACKENDS, resolve_mode
from pallas_kernels.lora_attention import lora_attention, lora_attention_reference
from pallas_kernels.lora_linear import lora_linear, lora_linear_reference
from pallas_kernels.multi_lora import multi_lora, multi_lora_ragged_dot, multi_lora_reference

__all__ = [
    "resolve_mode",
    "COMPILED_BACKENDS",
    "lora_linear",
    "lora_linear_reference",
    "multi_lora",
    "multi_lora_reference",
    "multi_lora_ragged_dot",
    "lora_attention",
    "lora_attention_reference",
]
