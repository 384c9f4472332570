"""Adapters as data: a pytree <-> flat-vector codec and a library of expert adapters with text embeddings.

The shared pieces of `lorajax.sg_lora` (parameter generation from a task description) and
`lorajax.autolora` (retrieval + gated fusion). Each expert is an adapter tree (any lorajax
variant, same targets and shapes) plus the embedding of its task description (e.g. all-MiniLM-L6-v2
sentence embeddings from `lorajax.models.bert.embed_sentences`)::

    codec = Codec.of(template)           # ravel_pytree of the template: treedef, shapes, dtypes
    v = codec.flatten(adapters)          # [P] float32, P = codec.size
    adapters == codec.unflatten(v)       # exact round trip (float32 leaves)
    lib = build(adapters_list, embeddings_NxE, names)   # vectors [N, P], unit embeddings [N, E]
    w = similarity_weights(lib.embeddings, q_E, temperature, top_k)   # [N], sums to 1

``similarity_weights``: cosine similarities ``c_j = <q, e_j> / (|q| |e_j|)``, the ``top_k``
largest kept, ``w = softmax(c / temperature)`` over the kept ones (the rest 0). As ``temperature
-> 0`` the weight goes to the nearest expert alone.

Errors: adapters whose tree structure, leaf shapes or dtypes differ from the codec's template
(ValueError naming the first differing leaf), an empty library, embeddings of the wrong shape,
a non-positive temperature or top_k.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["Codec", "Library", "build", "cosine", "similarity_weights"]


def _leaves(tree: Any) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@dataclasses.dataclass(frozen=True)
class Codec:
    """Adapter tree <-> flat float32 vector ``[P]`` for trees shaped like one template."""

    treedef: Any
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, Any]
    size: int
    _unravel: Callable[[jax.Array], Any]

    @classmethod
    def of(cls, template: Any) -> "Codec":
        leaves = _leaves(template)
        if not leaves:
            raise ValueError("Codec.of: the template adapter tree has no array leaves")
        flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), template))
        return cls(
            treedef=jax.tree.structure(template),
            shapes={k: tuple(np.shape(x)) for k, x in leaves.items()},
            dtypes={k: jnp.result_type(x) for k, x in leaves.items()},
            size=int(flat.shape[0]),
            _unravel=unravel,
        )

    def check(self, adapters: Any, what: str = "adapters") -> None:
        """ValueError naming the first leaf whose path, shape or dtype differs from the template's."""
        leaves = _leaves(adapters)
        missing, extra = sorted(set(self.shapes) - set(leaves)), sorted(set(leaves) - set(self.shapes))
        if missing or extra or jax.tree.structure(adapters) != self.treedef:
            raise ValueError(
                f"{what}: tree does not match the library's adapters (missing leaves {missing[:3]}, unexpected "
                f"{extra[:3]}); every adapter must come from the same Spec and base model"
            )
        for k, x in leaves.items():
            if tuple(np.shape(x)) != self.shapes[k]:
                raise ValueError(
                    f"{what}: leaf {k} has shape {tuple(np.shape(x))}, the library's is {self.shapes[k]} "
                    "(same Spec: rank, targets, base model sizes)"
                )

    def flatten(self, adapters: Any, what: str = "adapters") -> jax.Array:
        """``[P]`` float32 (leaves in the template's order)."""
        self.check(adapters, what)
        return ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters))[0]

    def unflatten(self, vector_P: Any) -> Any:
        """The adapter tree of a ``[P]`` vector, each leaf cast back to the template's dtype."""
        v = jnp.asarray(vector_P)
        if v.shape != (self.size,):
            raise ValueError(f"Codec.unflatten: expected a vector of shape ({self.size},), got {v.shape}")
        tree = self._unravel(v.astype(jnp.float32))
        return jax.tree.unflatten(self.treedef, [x.astype(self.dtypes[k]) for k, x in _leaves(tree).items()])


@dataclasses.dataclass(frozen=True)
class Library:
    """Expert adapters as flat vectors ``[N, P]`` with unit-norm description embeddings ``[N, E]``."""

    codec: Codec
    vectors: jax.Array
    embeddings: jax.Array
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def adapter(self, i: int) -> Any:
        return self.codec.unflatten(self.vectors[i])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build(adapters: Sequence[Any], embeddings_NxE: Any, names: Sequence[str] | None = None) -> Library:
    """A `Library` of ``N >= 1`` experts (same tree as ``adapters[0]``) and their description embeddings."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapter library is empty: give at least one expert adapter and its description embedding")
    emb = jnp.asarray(embeddings_NxE, jnp.float32)
    if emb.ndim != 2 or emb.shape[0] != len(adapters):
        raise ValueError(f"embeddings must be [N={len(adapters)}, E], got shape {emb.shape}")
    names = tuple(names) if names is not None else tuple(str(i) for i in range(len(adapters)))
    if len(names) != len(adapters) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(adapters)} distinct strings, got {names}")
    codec = Codec.of(adapters[0])
    vectors = jnp.stack([codec.flatten(a, f"expert {n!r}") for a, n in zip(adapters, names)])
    return Library(codec, vectors, _unit(emb), names)


def cosine(q_QxE: Any, keys_NxE: Any) -> jax.Array:
    """Cosine similarities ``[Q, N]`` (or ``[N]`` for one query ``[E]``)."""
    q, k = jnp.asarray(q_QxE, jnp.float32), jnp.asarray(keys_NxE, jnp.float32)
    if k.ndim != 2 or q.shape[-1] != k.shape[-1] or q.ndim not in (1, 2):
        raise ValueError(f"cosine: query {q.shape} and keys {k.shape} must be [E] or [Q, E] and [N, E]")
    return _unit(q) @ _unit(k).T


def similarity_weights(keys_NxE: Any, q_E: Any, temperature: float = 0.1, top_k: int | None = None) -> jax.Array:
    """``[N]`` weights: softmax of cosine similarities / temperature over the ``top_k`` nearest experts."""
    k = jnp.asarray(keys_NxE)
    if k.ndim != 2 or k.shape[0] == 0:
        raise ValueError(f"similarity_weights: the library is empty or not [N, E] (got {k.shape})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = k.shape[0]
    top_k = n if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    c = cosine(q_E, k)
    if c.ndim != 1:
        raise ValueError(f"similarity_weights takes one query [E], got {jnp.shape(q_E)}")
    kth = jax.lax.top_k(c, min(top_k, n))[0][-1]
    logits = jnp.where(c >= kth, c / temperature, -jnp.inf)
    return jax.nn.softmax(logits)
