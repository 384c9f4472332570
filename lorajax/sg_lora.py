"""SG-LoRA: LoRA parameters generated from a task description, guided by a library of expert adapters.

Paper: "Semantic-guided LoRA Parameter Generation" (SG-LoRA), arXiv:2509.10535; official code
github.com/keepgoingjkg/SG-LoRA. Spec: ``../shared/specs/adapters.md`` §14. No training on the new
task: embed its description in the text space of the experts' descriptions, weight the experts by
semantic proximity, and sample adapter parameters from a generative model of the library's
parameter distribution conditioned on that guidance.

What lorajax implements (pure functions; `lorajax.adapter_library` for the codec and library)::

    w(q)   = softmax(cos(q, e_j) / τ) over the top-k experts          [N]   (similarity prior)
    v_i    = flatten(expert i) = m + U h_i                            [P]   (library basis, h_i [K])
    c(q)   = Σ_j w_j(q) h_j                                           [K]   (prior coefficients)
    CVAE:  q(z | h, c) = N(μ, diag σ²),  [μ, log σ²] = [h, c] W_e + b_e       z [Z]
           ĥ = c + [z, c] W_d + b_d      (decoder: a residual around the prior)
    loss   = mean_i ||ĥ_i − h_i||² + β KL(q(z | h_i, c_i) || N(0, I)),  c_i = c(e_i)
    generate(q) = unflatten(m + U ĥ),  ĥ = decoder(z, c(q)),  z = 0 (the mean) or z ~ N(0, I)

``m`` is the library mean and ``U [P, K]`` an orthonormal basis of the centred expert vectors (thin
SVD, ``K <= N``), so the generative model works on ``K``-dimensional coefficients, never on
``P``-dimensional vectors (P = every adapter parameter).

UNVERIFIED (github.com/keepgoingjkg/SG-LoRA could not be obtained here — "no snapshot" — on
2026-12-05, nor its paper text; what was read is the abstract as summarised in the spec): the
generator family (the abstract says it "models the target task's LoRA parameter distribution";
here a conditional VAE, linear encoder/decoder, in the library's PCA coefficient space), the
residual-around-the-prior decoder, the condition (prior coefficients, not the raw text embedding),
β, the training temperature, and the text encoder (here all-MiniLM-L6-v2 via
`lorajax.models.bert`; the paper's is not confirmed). All are lorajax design choices.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax import adapter_library, sg_lora
  >>> experts = [{"w": {"lora_A": jax.random.normal(jax.random.key(i), (4, 2)), "lora_B": jnp.ones((2, 3))}}
  ...            for i in range(3)]
  >>> lib = adapter_library.build(experts, jnp.eye(3))
  >>> gen = sg_lora.fit(lib, jax.random.key(0), temperature=0.01, steps=200)
  >>> out = sg_lora.generate(gen, lib, jnp.array([0.0, 1.0, 0.0]), temperature=0.01)
  >>> bool(jnp.allclose(out["w"]["lora_A"], experts[1]["w"]["lora_A"], atol=1e-3))
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorajax.adapter_library import Library, similarity_weights

__all__ = ["Generator", "basis", "prior", "fit", "generate", "generate_vector"]


@dataclasses.dataclass(frozen=True)
class Generator:
    """A fitted SG-LoRA generator: the library basis (``mean [P]``, ``U [P, K]``, coefficients ``h [N, K]``) and
    the CVAE weights ``params`` (``enc``: ``{"kernel": [2K, 2Z], "bias": [2Z]}``, ``dec``: ``[Z+K, K]``, ``[K]``)."""

    mean: jax.Array
    U: jax.Array
    h: jax.Array
    params: dict
    latent: int
    top_k: int | None


def _check(lib: Library) -> None:
    if not isinstance(lib, Library):
        raise TypeError(f"expected an adapter_library.Library, got {type(lib).__name__}")
    if len(lib) == 0:
        raise ValueError("SG-LoRA: the adapter library is empty")


def basis(lib: Library, tol: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m [P], U [P, K], h [N, K])`` with ``v_i = m + U h_i``: the centred library's thin SVD, components with
    singular value > ``tol``·max kept (``K = 0`` for a one-expert library)."""
    _check(lib)
    m = lib.vectors.mean(0)
    X = lib.vectors - m[None, :]
    _, s, vt = jnp.linalg.svd(X, full_matrices=False)
    keep = int(jnp.sum(s > tol * jnp.maximum(s.max(), 1e-30)))
    U = vt[:keep].T
    return m, U, X @ U


def prior(lib: Library, h_NxK: jax.Array, q_E: Any, temperature: float, top_k: int | None) -> jax.Array:
    """Prior coefficients ``c(q) = Σ_j w_j(q) h_j`` ``[K]`` (`adapter_library.similarity_weights`)."""
    return similarity_weights(lib.embeddings, q_E, temperature, top_k) @ h_NxK


def _encode(params: dict, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = jnp.concatenate([h, c], -1) @ params["enc"]["kernel"] + params["enc"]["bias"][None, :]
    mu, logvar = jnp.split(out, 2, axis=-1)
    return mu, logvar


def _decode(params: dict, z: jax.Array, c: jax.Array) -> jax.Array:
    """``c + [z, c] W_d + b_d`` for ``z [..., Z]``, ``c [..., K]``."""
    b = params["dec"]["bias"].reshape((1,) * (c.ndim - 1) + (-1,))
    return c + jnp.concatenate([z, c], -1) @ params["dec"]["kernel"] + b


def fit(
    lib: Library,
    key: jax.Array,
    *,
    latent: int = 4,
    temperature: float = 0.1,
    top_k: int | None = None,
    beta: float = 1e-3,
    steps: int = 500,
    learning_rate: float = 1e-2,
) -> Generator:
    """Fit the CVAE on the library: expert ``i``'s condition is the prior of its own description embedding."""
    _check(lib)
    if latent < 1 or steps < 0:
        raise ValueError(f"SG-LoRA fit: latent must be >= 1 and steps >= 0, got {latent} and {steps}")
    m, U, h = basis(lib)
    K = h.shape[1]
    c = jnp.stack([prior(lib, h, e, temperature, top_k) for e in lib.embeddings])
    scale = jnp.maximum(jnp.std(h), 1e-12) if K else 1.0
    hn, cn = h / scale, c / scale  # unit-scale coefficients for the optimiser
    ke, kd, kz = jax.random.split(key, 3)
    params = {
        "enc": {"kernel": 0.1 * jax.random.normal(ke, (2 * K, 2 * latent)), "bias": jnp.zeros(2 * latent)},
        "dec": {"kernel": 0.1 * jax.random.normal(kd, (latent + K, K)), "bias": jnp.zeros(K)},
    }

    def loss(p, k):
        mu, logvar = _encode(p, hn, cn)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(k, mu.shape)
        rec = jnp.mean(jnp.sum((_decode(p, z, cn) - hn) ** 2, -1))
        kl = jnp.mean(0.5 * jnp.sum(jnp.exp(logvar) + mu**2 - 1.0 - logvar, -1))
        return rec + beta * kl

    tx = optax.adam(learning_rate)

    def step(carry, k):
        p, s = carry
        g = jax.grad(loss)(p, k)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    if K and steps:
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(kz, steps))
    # undo the coefficient scale: decoder on raw coefficients (the residual form is scale-equivariant in c)
    params = {
        "enc": params["enc"],
        "dec": {"kernel": params["dec"]["kernel"].at[:latent].multiply(scale), "bias": params["dec"]["bias"] * scale},
    }
    return Generator(m, U, h, params, latent, top_k)


def generate_vector(
    gen: Generator, lib: Library, q_E: Any, *, temperature: float = 0.1, key: jax.Array | None = None
) -> jax.Array:
    """The generated flat adapter ``[P]`` for a description embedding ``q [E]`` (``key=None``: z = 0, the mean)."""
    _check(lib)
    c = prior(lib, gen.h, q_E, temperature, gen.top_k)
    z = jnp.zeros(gen.latent) if key is None else jax.random.normal(key, (gen.latent,))
    return gen.mean + gen.U @ _decode(gen.params, z, c)


def generate(gen: Generator, lib: Library, q_E: Any, *, temperature: float = 0.1, key: jax.Array | None = None) -> Any:
    """The generated adapter tree (`generate_vector` through the library's codec)."""
    return lib.codec.unflatten(generate_vector(gen, lib, q_E, temperature=temperature, key=key))
