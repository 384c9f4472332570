"""Gradient-free search over LoRA adapters: ESSA (arXiv 2507.04453).

* `lorajax.es.svd`: LoRA adapters <-> SVD form (``"product"``: SVD of s·A·B;
  ``"factor"``: SVD of A and of B). Which one ESSA uses is UNVERIFIED.
* `ESSA`: evosax strategies (CMA-ES default, Sep-CMA-ES, OpenAI-ES) over the
  singular values; the population is one ``jax.vmap`` inside one jit,
  optionally sharded over a device mesh. Needs ``pip install 'lorajax[es]'``.
* `run`: driver loop with progress, logging and resumable checkpoints.
* `lorajax.es.quant`: int8 / int4 / NF4 / bf16 inference bases for the fitness
  evaluation: `lorajax.quant` trees (ESSA's defaults), LoRA on top, no wrapper.

The paper's method section and code were not available: options that go beyond
its abstract are documented in `lorajax.es.essa` as UNVERIFIED with the default
chosen. Sources tried: ``docs/unverified.md``.
"""

from lorajax.es import quant, svd
from lorajax.es.driver import run
from lorajax.es.essa import ESSA, FITNESS_SHAPING, STRATEGIES, State

__all__ = ["ESSA", "State", "run", "svd", "quant", "STRATEGIES", "FITNESS_SHAPING"]
