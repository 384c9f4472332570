"""Uni-LoRA: one trainable vector for the whole model, projected into every LoRA factor.

All LoRA factors of all adapted weights, flattened and concatenated, form a
vector ``θ_D`` of length ``D = Σ_targets r·(in + out)``. Uni-LoRA trains only
``θ_d: [d]`` (``d = theta_d_length``) and sets ``θ_D = P θ_d`` with a fixed,
isometric projection ``P: [D, d]`` whose rows are one-hot: position ``p`` of
``θ_D`` reads entry ``idx[p]`` of ``θ_d``, scaled by ``1/√count[idx[p]]``
(``count[j]`` = how often ``j`` occurs in ``idx``), so ``Pᵀ P = I_d`` when
every entry is used (``D ≥ d``). Maths (Flax orientation, ``W: [in, out]``)::

    c = 1/√count                        [d]     (0 for unused entries)
    A = (θ_d ⊙ c)[idx_A]                [in, r]
    B = (θ_d ⊙ c)[idx_B]                [r, out]
    y  = x W + (x A) B,     W' = W + A B         (no α/r scaling)

The index vector (PEFT's ``UniLoraModel.generate_index``), with
``q, ρ = divmod(D, d)``: ``np.repeat(arange(d), q)`` followed by ``ρ`` extra
indices from ``rng.choice(d, ρ, replace=False)``, then ``rng.shuffle``, with
``rng = numpy.random.default_rng(proj_seed)``; each entry of ``θ_d`` is used
``q`` or ``q + 1`` times. lorajax runs the same numpy calls, so its indices
equal PEFT's bit for bit when the targets are laid out in the same order.
The layout is PEFT's (``model.modules()`` order): target 1's ``A`` (PyTorch
``[r, in]``, row-major), target 1's ``B`` (``[out, r]``), target 2's ``A``, …;
lorajax stores each index block transposed into Flax orientation
(``idx_A: [in, r]``, ``idx_B: [r, out]``); the coordinates are not re-drawn.

``target_order`` sets the layout order. ``None`` (default): lorajax's target
order (pytree order, i.e. sorted keys for linen). A list of module-name
suffixes, e.g. ``("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
"up_proj", "down_proj")`` for a Hugging Face decoder: targets are sorted by
the integers in the name before the matched suffix (the layer index), then
by the position of the first entry the name equals or ends with
(``"." + entry``) -- PyTorch's registration order, which PEFT follows.

Where the state lives (adapters["_shared"])::

    unilora_theta_d: [d]                       trainable (the only trainable array)
    unilora_norm:    [d]                       frozen, c = 1/√count
    unilora_indices: {target name: {"unilora_indices_A": [in, r] int32,
                                    "unilora_indices_B": [r, out] int32}}   frozen

The indices of a target depend on the whole model's layout, which only
``init_shared`` sees (``lorajax.init`` builds the per-target entries first,
one target at a time), so they sit under ``_shared``, keyed by the target's
module name. Each target's own entry is a frozen marker
``{"unilora_size": r·(in + out)}`` (its share of ``D``). PEFT keeps the
scales per target (``unilora_scales_A = c[indices_A]``); lorajax keeps ``c``
once, which gives the same products ``θ_j · c_j`` (``c`` is computed in
float64 and rounded; torch's float32 ``rsqrt`` can differ from it by 1 ulp).

Init: ``θ_d ~ U(-init_theta_d_bound, init_theta_d_bound)`` (default 0.02;
PEFT and the official NLU code alike), from the init key (PEFT uses torch's
global RNG, so ``θ_d`` itself cannot be reproduced; import it). Both factors
are random, so **the model changes at init** (ΔW ≠ 0), as in PEFT and the
official code. Defaults as PEFT: ``theta_d_length=256``, ``proj_seed=42``
(PEFT's ``r=4``: pass ``Spec(rank=4)``); ``alpha`` is ignored. Dropout is not
implemented. Targets may have different ranks (``rank_pattern``).

Trainable: ``d`` for the whole model (0 per target).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 8))}}
  >>> spec = lorajax.Spec("unilora", rank=2, targets=["q", "v"], theta_d_length=16)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> shared = adapters["_shared"]
  >>> shared["unilora_theta_d"].shape, shared["unilora_indices"]["q"]["unilora_indices_A"].shape
  ((16,), (6, 2))
  >>> lorajax.count_params(spec, params, adapters)["trainable"]
  16

References:
  Li et al., "Uni-LoRA: One Vector is All You Need", NeurIPS 2025,
  arXiv:2506.00799. Official code KaiyangLi1992/Uni-LoRA:
  ``NLU/NLU/modeling_roberta.py`` (vector bank, index generation, norm
  factors), ``NLU/unilora/unilora.py``. PEFT: ``src/peft/tuners/unilora/model.py``
  (``generate_index``, ``_assign_unilora_indices_and_scales``,
  ``_init_unilora_theta_d``) and ``unilora/layer.py`` (``_get_lora_matrices``,
  ``get_delta_weight``, ``forward``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.variants import options
from lorajax.variants.base import EVAL, SHARED_KEY, Context, PeftFormat, Target, Variant, additive, dropout
from lorajax.variants.options import checks, option


def _check_order(name: str, value: Any) -> None:
    if value is None:
        return
    if (
        isinstance(value, str)
        or not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(e, str) and e for e in value)
    ):
        raise ValueError(f"{name} must be None or a non-empty list of module-name suffixes, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``d``: length of the one trained vector ``θ_d`` (PEFT's default 256)
    theta_d_length: int = option(256, checks.positive_int)
    #: seed of the index vector (``numpy.random.default_rng(proj_seed)``, as PEFT)
    proj_seed: int = option(42, checks.nonneg_int)
    #: ``θ_d ~ U(±init_theta_d_bound)`` (> 0: ``θ_d = 0`` gets no gradient)
    init_theta_d_bound: float = option(0.02, checks.positive)
    #: layout order of the targets' factors in ``θ_D``: None (lorajax's target order) or module-name
    #: suffixes in torch registration order, e.g. ``("q_proj", "k_proj", "v_proj", "o_proj")``
    target_order: tuple[str, ...] | None = option(None, _check_order)
    #: adapter dtype; None: float32
    dtype: str | None = option(None, checks.dtype)
    #: PEFT's ``unilora_dropout``: dropout on the adapter's input in training (`lorajax.variants.base.dropout`; factored
    #: mode, with ``adapter_rng`` and ``adapter_train=True``)
    dropout: float = option(0.0, checks.probability)


def generate_index(lora_param_count: int, theta_d_length: int, proj_seed: int) -> np.ndarray:
    """The index vector ``[D]`` (int64): each of ``d`` indices ``q`` or ``q+1`` times, shuffled.

    The same numpy calls as PEFT's ``UniLoraModel.generate_index``, hence the
    same values for the same ``(D, d, proj_seed)``.
    """
    if lora_param_count < 0:
        raise ValueError(f"lora_param_count must be >= 0, got {lora_param_count}")
    if theta_d_length <= 0:
        raise ValueError(f"theta_d_length must be > 0, got {theta_d_length}")
    q, rho = divmod(lora_param_count, theta_d_length)
    rng = np.random.default_rng(proj_seed)
    data = np.repeat(np.arange(theta_d_length), q)
    if rho > 0:
        data = np.concatenate([data, rng.choice(theta_d_length, size=rho, replace=False)])
    rng.shuffle(data)
    return data


def column_scale(idx: np.ndarray, theta_d_length: int) -> np.ndarray:
    """``c = 1/√count`` per entry of ``θ_d`` (float64; 0 where an entry is never used), ``count = bincount(idx)``."""
    counts = np.bincount(np.asarray(idx).ravel(), minlength=theta_d_length)
    norm = np.zeros(theta_d_length, np.float64)
    norm[counts > 0] = 1.0 / np.sqrt(counts[counts > 0])
    return norm


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(m) for m in re.findall(r"\d+", text))


def layout_order(targets: list[Target], order: Sequence[str] | None) -> list[Target]:
    """Targets in the order their factors are laid out in ``θ_D`` (see ``target_order``)."""
    if order is None:
        return list(targets)
    keys, unmatched = {}, []
    for t in targets:
        for rank, entry in enumerate(order):
            if t.name == entry or t.name.endswith("." + entry):
                keys[t.keys] = (_ints(t.name[: len(t.name) - len(entry)]), rank)
                break
        else:
            unmatched.append(t.name)
    if unmatched:
        raise ValueError(
            f"target_order={list(order)} matches no entry for targets {unmatched[:5]}: "
            "list the suffix of every adapted module"
        )
    return sorted(targets, key=lambda t: keys[t.keys])  # stable: ties keep lorajax's order


def init_shared(key: jax.Array, targets: list[Target]) -> dict:
    """``θ_d ~ U(±bound)``, ``c = 1/√count`` and every target's index blocks (PEFT's layout)."""
    opts = targets[0].options
    d = opts.theta_d_length
    ordered = layout_order(targets, opts.target_order)
    sizes = [t.rank * sum(t.matrix_shape) for t in ordered]
    idx = generate_index(sum(sizes), d, opts.proj_seed)
    norm = column_scale(idx, d)
    blocks, pos = {}, 0
    for t in ordered:
        (d_in, d_out), r = t.matrix_shape, t.rank
        idx_a = idx[pos : pos + r * d_in].reshape(r, d_in).T  # PEFT [r, in] -> [in, r]
        pos += r * d_in
        idx_b = idx[pos : pos + d_out * r].reshape(d_out, r).T  # PEFT [out, r] -> [r, out]
        pos += d_out * r
        blocks[t.name] = {
            "unilora_indices_A": jnp.asarray(idx_a, jnp.int32),
            "unilora_indices_B": jnp.asarray(idx_b, jnp.int32),
        }
    dtype = jnp.dtype(opts.dtype or jnp.float32)
    bound = opts.init_theta_d_bound
    return {
        "unilora_theta_d": jax.random.uniform(key, (d,), dtype, -bound, bound),
        "unilora_norm": jnp.asarray(norm, dtype),
        "unilora_indices": blocks,
    }


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"unilora_size": r·(in + out)}``: a frozen marker; the state is in ``_shared``."""
    del key
    return {"unilora_size": jnp.asarray(t.rank * sum(w.shape), jnp.int32)}


def factors(w: jax.Array, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
    """``(A: [in, r], B: [r, out])`` gathered from ``θ_d ⊙ c``."""
    blocks = adapter["unilora_indices"]
    if t.name not in blocks:
        raise ValueError(
            f"adapters['_shared']['unilora_indices'] has no entry for target {t.name!r} "
            f"(it has {sorted(blocks)[:5]}...): the adapters were made for other targets"
        )
    idx_a, idx_b = blocks[t.name]["unilora_indices_A"], blocks[t.name]["unilora_indices_B"]
    d_in, d_out = w.shape
    if (
        idx_a.ndim != 2
        or idx_b.ndim != 2
        or idx_a.shape[0] != d_in
        or idx_b.shape[1] != d_out
        or idx_a.shape[1] != idx_b.shape[0]
    ):
        raise ValueError(
            f"Uni-LoRA indices of {t.name!r}: A {idx_a.shape}, B {idx_b.shape} do not fit the weight {w.shape} "
            "(need A [in, r] and B [r, out])"
        )
    g = adapter["unilora_theta_d"] * adapter["unilora_norm"]  # θ_j · c_j: one projection step for all targets
    return g[idx_a], g[idx_b]


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``A B: [in, out]``."""
    a, b = factors(w, adapter, t)
    return a @ b


#: ``W + A B`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + (x A) B`` for ``x: [T, in]``; never forms ``A B``."""
    a, b = factors(w, adapter, t)
    y = x @ w
    h = dropout(x, t, ctx).astype(a.dtype) @ a
    return y + (h @ b).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``d``, once for the whole model (the per-target entries are buffers)."""
    return targets[0].options.theta_d_length if targets else 0


# ----------------------------------------------------------------------------- PEFT format (UniLoraConfig)
#
# PEFT lays the factors of all targets out in the torch module registration order and, unless saved with
# ``save_indices=True``, stores only θ_d and re-derives the indices from that order, which a Flax params tree
# does not carry. Loading imports saved indices when the file has them; otherwise it regenerates them in the
# order of the load option ``module_order`` (`lorajax.peft.load`'s ``unilora_order``). Saving always writes
# the indices (and PEFT's per-target scales).

_INDICES_SUFFIX = ".unilora_indices_A"


def peft_from_config(config: dict, common: dict, options: dict | None = None) -> Any:
    from lorajax.spec import Spec

    options = options or {}
    if config.get("init_weights", True) is not True:
        raise ValueError("unsupported PEFT field init_weights=False for Uni-LoRA (θ_d ~ N(0, 1))")
    order = options.get("module_order")
    if any(k.endswith(_INDICES_SUFFIX) for k in options.get("tensor_names", ())):
        order = None  # the file's own indices fix the layout
    return Spec(
        "unilora",
        **common,
        theta_d_length=int(config.get("theta_d_length", 256)),
        proj_seed=int(config.get("proj_seed", 42)),
        init_theta_d_bound=float(config.get("init_theta_d_bound", 0.02)),
        target_order=None if order is None else tuple(order),
    )


def peft_to_config(spec: Any, targets: list[Target]) -> dict:
    opts = spec.options
    return {
        "peft_type": "UNILORA",
        "theta_d_length": opts.theta_d_length,
        "proj_seed": opts.proj_seed,
        "init_theta_d_bound": opts.init_theta_d_bound,
        "save_indices": True,
        "init_weights": True,
    }


def peft_load(spec: Any, params: Any, targets: list[Target], tensors: dict, template: Any, options: dict) -> dict:
    """θ_d from the file; the index blocks imported (``save_indices=True``) or regenerated."""
    from lorajax.peft import PREFIX, read_tensor

    has_indices = any(k.endswith(_INDICES_SUFFIX) for k in tensors)
    try:
        adapters = template()
    except ValueError as e:
        raise ValueError(
            f"{e}. The Uni-LoRA file has no indices: pass unilora_order=[...] (the torch "
            "registration order of the adapted modules) or save it with save_indices=True"
        ) from e
    shared = dict(adapters[SHARED_KEY])
    like = shared["unilora_theta_d"]
    shared["unilora_theta_d"] = read_tensor(
        tensors, "base_model.unilora_theta_d", "_shared/unilora_theta_d", like, None
    )
    d = like.shape[0]
    if has_indices:
        blocks, scales = {}, {}
        for t in targets:
            old = shared["unilora_indices"][t.name]
            pre = f"{PREFIX}{t.name}.unilora_"
            blocks[t.name] = {
                f"unilora_indices_{x}": read_tensor(
                    tensors, pre + f"indices_{x}", f"{t.name}/indices_{x}", old[f"unilora_indices_{x}"], "T"
                )
                for x in "AB"
            }
            scales[t.name] = {x: tensors.pop(pre + f"scales_{x}", None) for x in "AB"}
        flat_idx = np.concatenate([np.asarray(b[k]).ravel() for b in blocks.values() for k in sorted(b)])
        if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= d):
            raise ValueError(f"Uni-LoRA indices out of range [0, {d}) (theta_d_length={d})")
        norm = column_scale(flat_idx, d)
        for name, per in scales.items():
            for x, saved in per.items():
                if saved is None:
                    continue
                want = norm[np.asarray(blocks[name][f"unilora_indices_{x}"])].T
                if saved.shape != want.shape or not np.allclose(np.asarray(saved, np.float64), want, rtol=1e-5):
                    raise ValueError(
                        f"{PREFIX}{name}.unilora_scales_{x} disagrees with 1/sqrt(count) of the "
                        "saved indices: the file is inconsistent"
                    )
        shared["unilora_indices"] = blocks
        shared["unilora_norm"] = jnp.asarray(norm, like.dtype)
    return {**{k: v for k, v in adapters.items() if k != SHARED_KEY}, SHARED_KEY: shared}


def peft_save(spec: Any, targets: list[Target], index: dict, shared: dict) -> dict:
    """θ_d, and every target's indices and scales (PEFT's ``save_indices=True`` layout)."""
    from lorajax.peft import PREFIX

    out = {"base_model.unilora_theta_d": jnp.asarray(shared["unilora_theta_d"])}
    norm = jnp.asarray(shared["unilora_norm"], jnp.float32)
    for t in targets:
        for x in "AB":
            idx = jnp.asarray(shared["unilora_indices"][t.name][f"unilora_indices_{x}"])
            out[f"{PREFIX}{t.name}.unilora_indices_{x}"] = idx.T.astype(jnp.int32)
            out[f"{PREFIX}{t.name}.unilora_scales_{x}"] = norm[idx].T
    return out


VARIANT = Variant(
    name="unilora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    init_shared=init_shared,
    options=Options,
    buffers=("unilora_size", "unilora_norm", r"unilora_indices_[AB]"),
    peft=PeftFormat(
        ("UNILORA",),
        fields=frozenset({"theta_d_length", "proj_seed", "init_theta_d_bound", "init_weights"}),
        dropout=("unilora_dropout",),
        from_config=peft_from_config,
        to_config=peft_to_config,
        load_extra=peft_load,
        save_extra=peft_save,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
