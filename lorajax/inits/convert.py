"""Export a base-shifting adapter (PiSSA, OLoRA, LoRA-GA) as a plain rank-2r LoRA on the original base.

PiSSA, OLoRA and LoRA-GA train ``(A, B)`` on a residual base
``W_res = W_0 - s·B_0 A_0`` (``A_0, B_0`` the initial factors). The trained
model is ``W_res + s·B A = W_0 + s·(B A - B_0 A_0)``, which is a LoRA of rank
2r on the ORIGINAL weights (PyTorch orientation)::

    A' = [A; A_0]   : [2r, in]        B' = [B, -B_0] : [out, 2r]
    W_0 + s'·B' A' = W_0 + s·(B A - B_0 A_0) = W_res + s·B A

with ``s' = s``: rank 2r and alpha 2α (``α/r``), or alpha √2·α with
``use_rslora`` (``α/√r``); ``rank_pattern`` doubles, and ``alpha_pattern``
doubles (× √2 with rsLoRA). This is what PEFT writes with
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
(``LoraModel.subtract_mutated_init``, ``PeftModel.save_pretrained``), so the
result can be saved with `lorajax.peft.save` and loaded by PEFT on the
original model, and it can be combined with other LoRAs. Unlike PEFT, rsLoRA
together with ``alpha_pattern`` is supported (PEFT refuses it because it
doubles the pattern). In lorajax's Flax orientation the concatenations are
``lora_A' = [lora_A, lora_A_0]: [in, 2r]`` and
``lora_B' = [lora_B; -lora_B_0]: [2r, out]``.

Without the initial adapters, ``s·B_0 A_0 = W_0 - W_res`` is recovered from
the two bases by a rank-r SVD (``original_params`` and ``residual_params``):
exact up to rounding for float32 bases; for a bf16 base the difference of the
two rounded weights is only approximately rank r.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"])
  >>> init, residual = lorajax.inits.pissa(spec, params)
  >>> trained = jax.tree_util.tree_map(lambda a: 1.1 * a, init)          # stands for training
  >>> spec2, plain = lorajax.inits.to_plain_lora(spec, trained, params, init)
  >>> spec2.rank, spec2.alpha
  (4, 8.0)
  >>> a = lorajax.merge(spec2, params, plain)["dense"]["kernel"]
  >>> b = lorajax.merge(spec, residual, trained)["dense"]["kernel"]
  >>> bool(jnp.allclose(a, b, atol=1e-5))
  True

References:
  PEFT ``src/peft/tuners/lora/model.py`` (``LoraModel.subtract_mutated_init``,
  ``_convert_state_dict_for_initial_model``), ``src/peft/peft_model.py``
  (``PeftModel.save_pretrained``, ``path_initial_model_for_weight_conversion``);
  PiSSA, arXiv:2404.02948, §"conversion to LoRA".
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from lorajax import adapters as adapters_lib
from lorajax import registry, targets
from lorajax.inits._svd import top_svd
from lorajax.plan import nest
from lorajax.spec import Spec
from lorajax.variants.lora import scaling

__all__ = ["to_plain_lora", "doubled_spec"]


def doubled_spec(spec: Spec) -> Spec:
    """The plain-LoRA Spec of rank 2r with the same scaling ``s`` for every target."""
    rslora = spec.options.get("use_rslora", False)
    factor = math.sqrt(2.0) if rslora else 2.0
    return spec.replace(
        rank=2 * spec.rank,
        alpha=factor * spec.alpha,
        rank_pattern={k: 2 * v for k, v in spec.rank_pattern},
        alpha_pattern={k: factor * v for k, v in spec.alpha_pattern},
        init_weights=True,
    )


def _get(tree: Any, keys: tuple, what: str) -> Any:
    """The node at ``keys`` in ``tree``, with or without the leading ``"params"``."""
    for ks in (keys, keys[1:] if keys[:1] == ("params",) else ("params",) + keys):
        node = tree
        try:
            for k in ks:
                node = node[k]
        except (KeyError, TypeError):
            continue
        return node
    raise ValueError(f"{what} has no entry for the targeted weight {'/'.join(keys)}")


def to_plain_lora(
    spec: Spec, adapters: Any, original_params: Any, initial_adapters: Any = None, *, residual_params: Any = None
) -> tuple[Spec, dict]:
    """A rank-2r LoRA on ``original_params`` equal to ``adapters`` on the residual base.

    Args:
      spec: the ``"lora"`` Spec the adapters were trained with.
      adapters: the trained adapters (on the residual base).
      original_params: the base before PiSSA/OLoRA/LoRA-GA shifted it.
      initial_adapters: the adapters as the initialiser returned them
        (exact, PEFT's method).
      residual_params: instead of ``initial_adapters``: the shifted base the
        initialiser returned; ``s·B_0 A_0`` is then the rank-r SVD of
        ``W_0 - W_res``.

    Returns:
      ``(spec_2r, plain_adapters)``: use them with ``original_params``.

    Raises:
      ValueError: neither or misfitting initial state; a non-"lora" Spec; a
      target where 2r exceeds min(in, out) (lorajax's "lora" caps the rank).
    """
    registry.plain_lora(spec.variant, "to_plain_lora")
    if initial_adapters is None and residual_params is None:
        raise ValueError(
            "to_plain_lora needs initial_adapters (the adapters at init) or residual_params "
            "(the shifted base the initialiser returned)"
        )
    selected, index, _ = adapters_lib.resolve(spec, original_params, adapters)
    new_spec = doubled_spec(spec)
    for t in selected:
        if 2 * t.rank > min(t.matrix_shape):
            raise ValueError(
                f"the plain LoRA of {t.name!r} needs rank 2r = {2 * t.rank} > min(in, out) = "
                f"{min(t.matrix_shape)}, which lorajax's 'lora' variant does not allow; keep the residual base "
                "(lorajax.merge(spec, residual_params, adapters)) instead"
            )
    originals = dict(targets.weight_leaves(original_params))
    flat = {}
    for t in selected:
        trained = index[t.keys]
        a, b = trained["lora_A"], trained["lora_B"]  # [in, r], [r, out]
        if initial_adapters is not None:
            init = _get(initial_adapters, t.keys, "initial_adapters")
            a0, b0 = jnp.asarray(init["lora_A"]), jnp.asarray(init["lora_B"])
            if a0.shape != a.shape or b0.shape != b.shape:
                raise ValueError(
                    f"initial adapter at {'/'.join(t.keys)} has lora_A {a0.shape}, lora_B {b0.shape}; "
                    f"the trained one {a.shape}, {b.shape}"
                )
        else:
            res = _get(residual_params, t.keys, "residual_params")
            w0 = adapters_lib.as_matrix(jnp.asarray(originals[t.keys]), t).astype(jnp.float32)
            w_res = adapters_lib.as_matrix(jnp.asarray(res), t).astype(jnp.float32)
            u, sv, vh = top_svd((w0 - w_res) / scaling(t), t.rank)  # = A_0 B_0 in Flax orientation
            root = jnp.sqrt(sv)
            a0, b0 = u * root[None, :], root[:, None] * vh
        a0, b0 = a0.astype(a.dtype), b0.astype(b.dtype)
        flat[t.keys] = {"lora_A": jnp.concatenate([a, a0], axis=1), "lora_B": jnp.concatenate([b, -b0], axis=0)}
    # the new spec selects the same weights with every scaling unchanged
    new_targets = {t.keys: t for t in targets.select(new_spec, original_params)}
    for t in selected:
        nt = new_targets[t.keys]
        assert nt.rank == 2 * t.rank and math.isclose(scaling(nt), scaling(t), rel_tol=1e-12), (t.name, nt, t)
    return new_spec, nest(flat)
