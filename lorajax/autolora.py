"""AutoLoRA: retrieve LoRAs for a prompt through a shared adapter/text embedding space, then fuse them with gates.

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image
Generation" (arXiv:2508.02107). Spec: ``../shared/specs/adapters.md`` §14. Three pieces, all pure:

1. **Adapter encoder** (`features`, `fit_encoders`, `encode_adapters`): an adapter is described by
   its weight update through fixed random probes, ``f_t = P_t ΔW_t`` per target (``P_t [p, in]``
   Gaussian / √in, ``ΔW`` from `lorajax.combination.delta`, so any mergeable variant and
   invariant to the factor gauge ``A R, R⁻¹ B``), concatenated and standardised over the library;
   a linear map ``W_a`` sends it to the shared space, a linear map ``W_t`` sends a text embedding
   (e.g. all-MiniLM-L6-v2, `lorajax.models.bert.embed_sentences`) there; both trained with the
   symmetric InfoNCE (CLIP) loss on the library's (adapter, description) pairs, unit-norm outputs,
   fixed temperature ``τ``.
2. **Retrieval index** (`Index`, `retrieve`): cosine top-k of a text query against the encoded
   adapters.
3. **Gated fusion** (`adapt_gated`): at every adapted ``nn.Dense`` / ``DenseGeneral`` /
   ``Einsum``, factored (no ``ΔW`` formed)::

       y = x W + Σ_i g_i(ℓ, x) · s_i (x A_i) B_i        x [T, in], A_i [in, r], B_i [r, out]

   with the experts stacked by `lorajax.multi_adapter.stack_adapters` (plain LoRA; ``s_i`` each
   expert's own ``α/r``) and gates from outside: ``[n]`` (every module), ``[L, n]`` (per adapted
   module, in `module_names` order) or a function ``gate_fn(name, x_Txin) -> [n] or [T, n]``
   (per module and token: the place for a learned gate network). `retrieval_gates` gives the
   softmax of the retrieval scores as a simple global gate.

UNVERIFIED (the official code was not found: github.com/lzws/AutoLoRA holds a README pointing at
DiffSynth-Studio and no retriever or gate code in the stored snapshot — read 2026-12-05; the paper
text was not read): the weight encoder's input (here probe responses of ΔW; the paper "maps LoRA
parameter matrices" into the space), its architecture (here linear), the contrastive loss form and
temperature, and the gate network (the paper computes per-layer, per-timestep fusion weights;
here gates are an input). Diffusion timesteps have no counterpart in a language model: ``ℓ`` is the
adapted module, ``x`` its input.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lorajax import registry
from lorajax.adapt import check_reached, make_interceptor
from lorajax.adapter_library import cosine
from lorajax.adapters import resolve
from lorajax.combination import delta
from lorajax.multi_adapter import stack_adapters
from lorajax.spec import Spec
from lorajax.variants import lora
from lorajax.variants.base import EVAL

__all__ = [
    "features",
    "Encoders",
    "fit_encoders",
    "encode_adapters",
    "encode_texts",
    "Index",
    "build_index",
    "retrieve",
    "retrieval_gates",
    "module_names",
    "adapt_gated",
    "clip_loss",
    "stack",
]


def features(spec: Spec, params: Any, adapters: Any, *, n_probes: int = 4, seed: int = 0) -> jax.Array:
    """``[F]``: ``concat_t vec(P_t ΔW_t)`` over the targets in path order, ``P_t [n_probes, in]`` ~ N(0, 1/in),
    drawn from ``fold_in(key(seed), crc32(path))`` (the same probes for every adapter of one base)."""
    leaves = jax.tree_util.tree_leaves_with_path(delta(spec, params, adapters))
    if not leaves:
        raise ValueError("AutoLoRA features: the adapters reach no weight of params")
    out = []
    for path, d in sorted(leaves, key=lambda pd: jax.tree_util.keystr(pd[0])):
        name = jax.tree_util.keystr(path)
        d2 = d.reshape(-1, d.shape[-1]).astype(jnp.float32)
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
        probes = jax.random.normal(key, (n_probes, d2.shape[0])) / jnp.sqrt(d2.shape[0])
        out.append((probes @ d2).ravel())
    return jnp.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The two linear maps into the shared space: ``adapter`` ``{"kernel": [F, d]}`` on standardised features
    (``mu [F]``, ``sd [F]``), ``text`` ``{"kernel": [E, d]}``; ``temperature`` τ of the contrastive loss."""

    adapter: dict
    text: dict
    mu: jax.Array
    sd: jax.Array
    temperature: float


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _enc_a(p: dict, f: jax.Array, mu: jax.Array, sd: jax.Array) -> jax.Array:
    shape = (1,) * (f.ndim - 1) + (-1,)
    return _unit(((f - mu.reshape(shape)) / sd.reshape(shape)) @ p["kernel"])


def _enc_t(p: dict, e: jax.Array) -> jax.Array:
    return _unit(_unit(e) @ p["kernel"])


def clip_loss(za_NxD: jax.Array, zt_NxD: jax.Array, temperature: float) -> jax.Array:
    """Symmetric InfoNCE: mean of the cross-entropies adapter→text and text→adapter, pairs on the diagonal."""
    logits = za_NxD @ zt_NxD.T / temperature
    labels = jnp.arange(za_NxD.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())


def fit_encoders(
    features_NxF: Any,
    text_NxE: Any,
    key: jax.Array,
    *,
    dim: int = 32,
    temperature: float = 0.1,
    steps: int = 300,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-4,
) -> Encoders:
    """Train both encoders contrastively on the library's N (adapter features, description embedding) pairs."""
    f, e = jnp.asarray(features_NxF, jnp.float32), jnp.asarray(text_NxE, jnp.float32)
    if f.ndim != 2 or e.ndim != 2 or f.shape[0] != e.shape[0]:
        raise ValueError(f"fit_encoders: features {f.shape} and text embeddings {e.shape} must be [N, F] and [N, E]")
    if f.shape[0] < 1:
        raise ValueError("fit_encoders: the adapter library is empty")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mu = f.mean(0)
    sd = jnp.maximum(f.std(0), 1e-6 * jnp.maximum(f.std(), 1e-30))
    ka, kt = jax.random.split(key)
    p = {
        "adapter": {"kernel": jax.random.normal(ka, (f.shape[1], dim)) / jnp.sqrt(f.shape[1])},
        "text": {"kernel": jax.random.normal(kt, (e.shape[1], dim)) / jnp.sqrt(e.shape[1])},
    }
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p):
        return clip_loss(_enc_a(p["adapter"], f, mu, sd), _enc_t(p["text"], e), temperature)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return Encoders(p["adapter"], p["text"], mu, sd, float(temperature))


def encode_adapters(enc: Encoders, features_NxF: Any) -> jax.Array:
    """``[N, d]`` unit vectors of adapters (their `features`) in the shared space."""
    f = jnp.asarray(features_NxF, jnp.float32)
    if f.ndim != 2 or f.shape[1] != enc.mu.shape[0]:
        raise ValueError(f"encode_adapters: features must be [N, {enc.mu.shape[0]}], got {f.shape}")
    return _enc_a(enc.adapter, f, enc.mu, enc.sd)


def encode_texts(enc: Encoders, text_QxE: Any) -> jax.Array:
    """``[Q, d]`` unit vectors of text embeddings in the shared space."""
    e = jnp.asarray(text_QxE, jnp.float32)
    if e.ndim != 2 or e.shape[1] != enc.text["kernel"].shape[0]:
        raise ValueError(f"encode_texts: text embeddings must be [Q, {enc.text['kernel'].shape[0]}], got {e.shape}")
    return _enc_t(enc.text, e)


@dataclasses.dataclass(frozen=True)
class Index:
    """Encoded adapters ``keys [N, d]`` and their names."""

    keys: jax.Array
    names: tuple[str, ...]


def build_index(keys_NxD: Any, names: Sequence[str]) -> Index:
    k = jnp.asarray(keys_NxD, jnp.float32)
    if k.ndim != 2 or k.shape[0] == 0:
        raise ValueError(f"build_index: the adapter library is empty or keys are not [N, d] (got {k.shape})")
    if len(names) != k.shape[0]:
        raise ValueError(f"build_index: {len(names)} names for {k.shape[0]} keys")
    return Index(k, tuple(names))


def retrieve(index: Index, query_D: Any, k: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(ids [k], scores [k])``: the ``k`` adapters of highest cosine similarity to one encoded query ``[d]``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= index.keys.shape[0]:
        raise ValueError(f"retrieve: k must be an int in [1, {index.keys.shape[0]}], got {k!r}")
    scores = cosine(query_D, index.keys)
    if scores.ndim != 1:
        raise ValueError(f"retrieve takes one query [d], got shape {jnp.shape(query_D)}")
    top, ids = jax.lax.top_k(scores, k)
    return ids, top


def retrieval_gates(scores_k: Any, temperature: float = 0.1) -> jax.Array:
    """``softmax(scores / temperature)`` ``[k]``: one global gate per retrieved adapter."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return jax.nn.softmax(jnp.asarray(scores_k, jnp.float32) / temperature)


def module_names(spec: Spec, params: Any, pool: Any) -> tuple[str, ...]:
    """The adapted modules' names in the order of ``[L, n]`` gates (sorted by name)."""
    selected, _, _ = resolve(spec, params, pool)
    return tuple(sorted(t.name for t in selected))


def _gated_apply(x2d: jax.Array, w: jax.Array, entry: dict, t, ctx: Any = None, *, gate_fn: Callable | None):
    """``x W + Σ_i g_i s_i (x A_i) B_i`` on ``x [T, in]``; ``g`` ``[n]`` from the entry or ``[T, n]`` from gate_fn."""
    a, b, s = entry["lora_A"], entry["lora_B"], entry["scale"]
    n = a.shape[0]
    g = entry["gate"] if gate_fn is None else jnp.asarray(gate_fn(t.name, x2d))
    if g.shape not in ((n,), (x2d.shape[0], n)):
        raise ValueError(f"AutoLoRA gates at {t.name}: shape {g.shape}, expected ({n},) or ({x2d.shape[0]}, {n})")
    g_Txn = jnp.broadcast_to(g.reshape((-1, n)), (x2d.shape[0], n)) * s.reshape(1, n)
    xa_Txnxr = jnp.einsum("ti,nir->tnr", x2d, a.astype(x2d.dtype))
    return x2d @ w + jnp.einsum("tnr,nro->to", xa_Txnxr * g_Txn.astype(x2d.dtype)[:, :, None], b.astype(x2d.dtype))


def adapt_gated(apply_fn: Callable, spec: Spec) -> Callable:
    """Wrap ``apply_fn(params, *a, **kw)`` as ``fn(params, pool, gates, *a, **kw)``: gated fusion of the pool.

    ``pool``: `stack` of n ``lora`` experts; ``gates``: ``[n]``, ``[L, n]`` (rows in `module_names` order) or
    ``gate_fn(name, x_Txin) -> [n] | [T, n]``.
    """
    registry.plain_lora(spec.variant, "AutoLoRA gated fusion")

    @functools.wraps(apply_fn)
    def gated_fn(params, pool, gates, *args, **kwargs):
        selected, index, _ = resolve(spec, params, pool)
        ordered = sorted(selected, key=lambda t: t.name)
        counts = {e["lora_A"].shape[0] for e in index.values()}
        if len(counts) != 1:
            raise ValueError(f"AutoLoRA: pool entries hold different numbers of experts {sorted(counts)}")
        (n,) = counts
        gate_fn = gates if callable(gates) else None
        table = {}
        if gate_fn is None:
            g = jnp.asarray(gates, jnp.float32)
            if g.shape not in ((n,), (len(ordered), n)):
                raise ValueError(
                    f"AutoLoRA gates have shape {g.shape}; expected ({n},) or ({len(ordered)}, {n}) for {n} experts "
                    f"and {len(ordered)} adapted modules (module_names gives the row order), or a gate function"
                )
            g_Lxn = jnp.broadcast_to(g.reshape(-1, n), (len(ordered), n))
        for ell, t in enumerate(ordered):
            entry = dict(index[t.keys]) if gate_fn is not None else {**index[t.keys], "gate": g_Lxn[ell]}
            table[t.name] = (t, entry, EVAL)
        variant = dataclasses.replace(lora.VARIANT, apply=functools.partial(_gated_apply, gate_fn=gate_fn))
        used: set[str] = set()
        with nn.intercept_methods(make_interceptor(variant, table, used, {})):
            out = apply_fn(params, *args, **kwargs)
        check_reached(table, used, "AutoLoRA", "nn.Dense / nn.DenseGeneral / nn.Einsum")
        return out

    return gated_fn


def stack(spec: Spec | Sequence[Spec], experts: Sequence[Any]) -> dict:
    """The experts (``lora`` trees, same targets) as one pool (`lorajax.multi_adapter.stack_adapters`)."""
    if len(experts) < 1:
        raise ValueError("AutoLoRA: no expert adapters to fuse (empty library)")
    return stack_adapters(spec, list(experts))
