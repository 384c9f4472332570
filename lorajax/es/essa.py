"""ESSA: evolution strategies over the singular values of LoRA adapters, the population in one ``jax.vmap``.

Korotyshova et al., "ESSA: Evolutionary Strategies for Scalable Alignment",
arXiv 2507.04453 (v3, 2025-12-22). What is verified (abstract; third-party
summaries): gradient-free alignment with forward inference only; LoRA adapters
put in SVD form and **only the singular values searched**; INT4/INT8 inference;
start from a supervised fine-tune; verifiable rewards (accuracy). No official
code was found, and the method section could not be read (sources tried:
``docs/unverified.md``). Everything below
that goes beyond that is a lorajax design choice, exposed as an option:

==================  =========================================================
option (default)    status
==================  =========================================================
``form``            UNVERIFIED which matrix is decomposed: ``"product"`` (SVD
("product")         of ``s·A·B``, r numbers per weight) or ``"factor"`` (SVD of
                    A and of B, 2r numbers; the abstract's wording "each adapter
                    matrix" leans this way). See `lorajax.es.svd`.
``strategy``        third-party summaries (sciencestack TL;DR; a research note
("cma_es")          reading the paper) name CMA-ES; evosax's ``CMA_ES``.
                    ``"sep_cma_es"`` (diagonal covariance, O(d) memory) for
                    d ≳ 10³ (full CMA-ES keeps a d×d covariance and
                    eigendecomposes it in every ask: ~0.1 s at d = 112 on
                    2 CPU cores, see experiments/results/bench_essa.md);
                    ``"open_es"`` (OpenAI-ES) for antithetic sampling and
                    centred-rank fitness shaping.
``population_size`` UNVERIFIED; default ``max(8, 4 + ⌊3 ln d⌋)`` (CMA-ES's
(None)              textbook default, at least 8) rounded up to even.
``std_init``        UNVERIFIED; default 0.1·RMS(σ₀) of the searched singular
(None)              values (``genome="absolute"``) or 0.1 (``"relative"``).
``genome``          UNVERIFIED: ``"absolute"`` searches σ itself (mean starts at
("absolute")        σ₀); ``"relative"`` searches g with σ = σ₀ ⊙ g (starts at 1).
``fraction`` (1.0)  a third-party note mentions "SVD top-p%": search only the top
                    ⌈fraction·r⌉ singular values of each matrix, keep the rest.
``antithetic``      OpenAI-ES only (evosax has no antithetic CMA-ES): mirrored
(True)              pairs ``μ ± σ·z``; needs an even population.
``fitness_shaping`` OpenAI-ES only (CMA-ES uses its rank weights):
("centered_rank")   ``"centered_rank"``, ``"standardize"``, ``"normalize"``,
                    ``"identity"`` (evosax's functions).
``learning_rate``   OpenAI-ES's Adam learning rate; default ``0.5·std_init``
                    (a design choice: Adam moves every coordinate by about the
                    learning rate per generation; ``std_init`` itself made the
                    64-d toy of the tests oscillate).
==================  =========================================================

The evolution strategies are evosax's (``pip install lorajax[es]``,
evosax 0.3.2); lorajax only maps the genome to adapters, evaluates the
population and handles failed evaluations. evosax minimises; ``fitness_fn``
here returns a reward (**higher is better**) and is negated for evosax.

Evaluation: the population goes through ``jax.vmap`` of ``fitness_fn`` inside
one jit, in chunks of vmapped members run one after the other by
``jax.lax.map``. Under ``vmap`` whatever does not depend on the member stays
unbatched and is computed once (e.g. the first adapted layer's base product x·W
of the shared prompt batch; XLA's loop-invariant code motion moves it out of
the chunk loop - seen in the optimised CPU HLO of experiments/bench_essa.py's
model), and a base matmul of member-dependent activations is one
``[chunk·tokens, n] x [n, m]`` product: the base weights are read once per
chunk, not once per member. Chunk size (``member_chunk``):

* ``None`` (default): chosen automatically, deterministically from shapes (see
  `auto_member_chunk` and `member_bytes`). On CPU, one vmap of a large
  population is *slower* than a Python loop over members (its activations
  outgrow the caches; experiments/results/bench_essa.md), so chunks are sized
  so that one chunk's working set - members × the peak live bytes of one
  member's member-dependent values, read off ``fitness_fn``'s jaxpr without
  compiling - stays within `CPU_CHUNK_BYTES`; among the chunk sizes that fit,
  the largest divisor of the population is taken if it is at least half the
  largest size that fits, else the population is split into equal chunks and
  padded with copies of its last member (their fitness is dropped). On other
  backends the whole population is one vmap (as before).
* an int: that many members per chunk (the last chunk padded when it does not
  divide the population); ``member_chunk >= population_size``: one vmap.

With the member axis sharded over a device mesh (``mesh``) members run in
parallel on the devices, and a chunk is a multiple of the mesh axis; the base
params and the prompts are shared by all members (pass them uncommitted or
replicated on the mesh). The distribution update after the evaluation runs
replicated, so a sharded run gives the single-device result.
``fitness_fn(member, *args) -> scalar`` gets each
member as LoRA adapters (``fitness_input="adapters"``, default), as its SVD
tree (``"svd"``) or as the raw genome vector (``"genome"``); ``args`` (base
params, prompt batch) are passed through unchanged, so they are jit arguments,
not constants baked into the program. Pass the same ``fitness_fn`` object on
every call: it is a static argument, and a new function recompiles.

Failed evaluations: a non-finite fitness (NaN/±inf) is replaced by the worst
finite fitness of the generation minus a small margin, so that member ranks
last; the count is in the step metrics and accumulated in ``State.n_nonfinite``
(the driver logs it). If every member fails, the search distribution is left
unchanged for that generation.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.es import ESSA
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"], init_weights=False)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> def reward(adapters, params, x):  # any black-box scalar; higher is better
  ...     y = x @ lorajax.merge(spec, params, adapters)["dense"]["kernel"]
  ...     return -jnp.mean((y - 1.0) ** 2)
  >>> essa = ESSA(spec, params, adapters, population_size=8)
  >>> state = essa.init(jax.random.key(1))
  >>> state, metrics = essa.step(state, jax.random.key(2), reward, params, jnp.ones((3, 6)))
  >>> essa.num_dims, int(state.generation), sorted(metrics)[:3]
  (2, 1, ['best_fitness', 'fitness_max', 'fitness_mean'])
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lorajax.es import svd as svd_lib
from lorajax.plan import adapter_paths, nest
from lorajax.spec import Spec

__all__ = ["ESSA", "State", "STRATEGIES", "FITNESS_SHAPING", "auto_member_chunk", "member_bytes", "CPU_CHUNK_BYTES"]

STRATEGIES = ("cma_es", "sep_cma_es", "open_es")
FITNESS_SHAPING = ("centered_rank", "standardize", "normalize", "identity")
GENOMES = ("absolute", "relative")
FITNESS_INPUTS = ("adapters", "svd", "genome")

#: Working-set budget of one chunk of members for the automatic chunking on CPU (bytes). Measured on the
#: tiny Llama of experiments/bench_essa.py (~1 MiB per member; 2-core EPYC, 1 MiB L2 per core, 32 MiB L3):
#: chunks of 1-16 members ran alike, 32 members fell to the Python loop's speed and 128 below it.
CPU_CHUNK_BYTES = 8 * 2**20


def _nbytes(aval: Any) -> int:
    try:
        return int(np.prod(aval.shape, dtype=np.int64)) * int(np.dtype(aval.dtype).itemsize)
    except (AttributeError, TypeError):  # tokens, PRNG key types: no plain itemsize
        return 0


def _peak_live_bytes(jaxpr: Any, dependent: list[bool]) -> int:
    """Peak bytes of simultaneously live values of ``jaxpr`` that depend on the invars flagged ``dependent``.

    Values are live from the equation that makes them to their last use; an equation with sub-jaxprs (a
    nested jit, custom derivative, loop or branch) adds its own peak (all its inputs taken as dependent when
    any is) while it runs. Member-independent values are left out: under ``vmap`` they exist once.
    """
    from jax.extend.core import Var, jaxprs_in_params

    dep = {v for v, d in zip(jaxpr.invars, dependent) if d}
    last: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, Var):
            last[v] = len(jaxpr.eqns)
    live = peak = sum(_nbytes(v.aval) for v in dep)
    for i, eqn in enumerate(jaxpr.eqns):
        if not any(isinstance(v, Var) and v in dep for v in eqn.invars):
            continue
        inner = max(
            (_peak_live_bytes(j, [True] * len(j.invars)) for j in jaxprs_in_params(eqn.params)),
            default=0,
        )
        outs = [v for v in eqn.outvars if isinstance(v, Var)]
        dep.update(outs)
        made = sum(_nbytes(v.aval) for v in outs)
        peak = max(peak, live + inner + made)
        live += made
        done = {v for v in [*eqn.invars, *outs] if isinstance(v, Var) and v in dep and last.get(v, -1) <= i}
        live -= sum(_nbytes(v.aval) for v in done)
    return peak


def member_bytes(fn: Callable, member: Any) -> int:
    """Estimated working set of one member: the peak live bytes of ``fn(member)``'s member-dependent values.

    ``member``: arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes are used; ``fn`` is traced to a
    jaxpr, not compiled or run). Everything ``fn`` closes over counts as shared by all members.
    """
    leaves = jax.tree.leaves(member)
    closed = jax.make_jaxpr(lambda *xs: fn(jax.tree.unflatten(jax.tree.structure(member), xs)))(
        *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    )
    return _peak_live_bytes(closed.jaxpr, [True] * len(leaves))


def auto_member_chunk(population_size: int, bytes_per_member: int, budget_bytes: int | None, multiple: int = 1) -> int:
    """Members per chunk for a population (a pure function of its arguments).

    ``cap``: the most members whose working set (``bytes_per_member`` each) fits ``budget_bytes`` (at least
    ``multiple``, and a multiple of it: the mesh axis size). ``budget_bytes=None`` or ``cap >=
    population_size``: the whole population (one vmap). Otherwise the largest divisor of the population
    that is a multiple of ``multiple`` and ``<= cap``, if it is ``>= cap / 2``; else equal chunks of
    ``ceil(P / ceil(P / cap))`` (rounded up to a multiple of ``multiple``; ``<= cap``), the last one padded.
    """
    p, m = population_size, multiple
    if budget_bytes is None:
        return p
    cap = max(m, budget_bytes // max(bytes_per_member, 1) // m * m)
    if cap >= p:
        return p
    divisor = max((c for c in range(m, cap + 1, m) if p % c == 0), default=0)
    if 2 * divisor >= cap:
        return divisor
    n_chunks = -(-p // cap)
    return -(-(-(-p // n_chunks)) // m) * m


def _evosax():
    try:
        from evosax import algorithms
        from evosax.core import fitness_shaping
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lorajax.es.ESSA needs evosax: pip install 'lorajax[es]' (evosax==0.3.2)") from e
    return algorithms, fitness_shaping


def _allow_rank_promotion():
    """evosax broadcasts ``mean [d]`` against ``[P, d]``; allow it under ``jax_numpy_rank_promotion='raise'``."""
    return jax.numpy_rank_promotion("allow")


@struct.dataclass
class State:
    """ESSA's state (a pytree; checkpoint it with `lorajax.train.checkpoint.Checkpointer`).

    Attributes:
      es: evosax's strategy state (mean genome, step size, covariance / optimiser state).
      frozen: the SVD tree (singular vectors and the initial σ₀); never changed.
      generation: generations done.
      n_nonfinite: member evaluations so far that returned a non-finite fitness.
    """

    es: Any
    frozen: Any
    generation: jax.Array
    n_nonfinite: jax.Array


class ESSA:
    """ESSA search over the singular values of ``adapters`` (see the module docstring for every option).

    Args:
      spec: the adapters' `lorajax.Spec` (variant ``"lora"``).
      params: the base params (shapes and names are read; not stored).
      adapters: LoRA adapters (converted to SVD form) or an SVD tree of ``form``.
      population_size: members per generation.
      strategy: ``"cma_es"``, ``"sep_cma_es"`` or ``"open_es"`` (evosax).
      form: ``"product"`` or ``"factor"`` (`lorajax.es.svd`).
      genome: ``"absolute"`` or ``"relative"``.
      fraction: share of each matrix's singular values that is searched (top ones).
      std_init: initial search standard deviation (genome units).
      antithetic: OpenAI-ES mirrored sampling (default True there; CMA-ES: must be None/False).
      fitness_shaping: OpenAI-ES fitness shaping name or an evosax-style function.
      learning_rate / optimizer: OpenAI-ES's update (default ``optax.adam(0.5 * std_init)``).
      member_chunk: members per vmapped chunk (the chunks run one after the other); ``None``:
        chosen automatically (`auto_member_chunk`; the module docstring says how).
      mesh: a `jax.sharding.Mesh` or a `lorajax.sharding.make_mesh` string such as
        ``"data=8"``; the member axis is sharded over ``member_axis``.
      fitness_input: what ``fitness_fn`` receives: ``"adapters"``, ``"svd"`` or ``"genome"``.

    Raises:
      ValueError: unknown option values, an odd population with antithetic
        sampling, a population not divisible by the mesh axis, adapters that
        are not LoRA / SVD trees.
    """

    def __init__(
        self,
        spec: Spec,
        params: Any,
        adapters: Any,
        *,
        population_size: int | None = None,
        strategy: str = "cma_es",
        form: str = "product",
        genome: str = "absolute",
        fraction: float = 1.0,
        std_init: float | None = None,
        antithetic: bool | None = None,
        fitness_shaping: str | Callable | None = None,
        learning_rate: float | None = None,
        optimizer: Any = None,
        member_chunk: int | None = None,
        mesh: Mesh | str | dict | None = None,
        member_axis: str = "data",
        fitness_input: str = "adapters",
    ):
        algorithms, shaping_lib = _evosax()
        for name, value, allowed in (
            ("strategy", strategy, STRATEGIES),
            ("genome", genome, GENOMES),
            ("fitness_input", fitness_input, FITNESS_INPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.spec, self.form, self.strategy_name, self.genome_mode = spec, form, strategy, genome
        self.fitness_input = fitness_input
        self.svd0 = svd_lib.as_svd(spec, params, adapters, form)
        self.scales = svd_lib.scales(spec, params)
        self._slots = []  # (target keys, sigma key, k searched, r)
        entries = adapter_paths(self.svd0)
        for keys, k in svd_lib.sigma_leaves(self.svd0):
            r = int(entries[keys][k].shape[0])
            self._slots.append((keys, k, max(1, math.ceil(fraction * r - 1e-9)), r))
        self.num_dims = sum(s[2] for s in self._slots)
        searched = np.concatenate([np.asarray(entries[keys][k][:n]) for keys, k, n, _ in self._slots])
        self.mean0 = jnp.asarray(searched if genome == "absolute" else np.ones_like(searched), jnp.float32)

        if population_size is None:
            population_size = max(8, 4 + int(3 * math.log(self.num_dims)))
            population_size += population_size % 2
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ValueError(f"population_size must be an int >= 2, got {population_size!r}")
        self.population_size = population_size

        if std_init is None:
            rms = float(np.sqrt(np.mean(np.square(searched)))) if genome == "absolute" else 1.0
            std_init = 0.1 * rms if rms > 0 else 0.1
        if not (isinstance(std_init, (int, float)) and std_init > 0 and math.isfinite(std_init)):
            raise ValueError(f"std_init must be a positive number, got {std_init!r}")
        self.std_init = float(std_init)

        solution = jnp.zeros((self.num_dims,), jnp.float32)
        if strategy == "open_es":
            antithetic = True if antithetic is None else bool(antithetic)
            if population_size % 2:
                raise ValueError(
                    f"population_size={population_size} is odd: "
                    + (
                        "antithetic sampling evaluates mirrored pairs μ ± σz and needs an even population"
                        if antithetic
                        else "evosax's Open_ES requires an even population even without antithetic sampling"
                    )
                )
            import optax

            shaping = fitness_shaping if fitness_shaping is not None else "centered_rank"
            if isinstance(shaping, str):
                if shaping not in FITNESS_SHAPING:
                    raise ValueError(f"fitness_shaping must be one of {FITNESS_SHAPING} or a function, got {shaping!r}")
                shaping = getattr(shaping_lib, f"{shaping}_fitness_shaping_fn")
            if optimizer is None:
                optimizer = optax.adam(0.5 * self.std_init if learning_rate is None else learning_rate)
            elif learning_rate is not None:
                raise ValueError("pass either learning_rate or optimizer, not both")
            self.strategy = algorithms.Open_ES(
                population_size,
                solution,
                use_antithetic_sampling=antithetic,
                optimizer=optimizer,
                std_schedule=optax.constant_schedule(self.std_init),
                fitness_shaping_fn=shaping,
            )
            self.es_params = self.strategy.default_params
        else:
            if antithetic:
                raise ValueError(
                    f"antithetic sampling is an OpenAI-ES option; evosax's {strategy} samples "
                    "independently (use strategy='open_es')"
                )
            if fitness_shaping is not None or learning_rate is not None or optimizer is not None:
                raise ValueError(
                    f"fitness_shaping / learning_rate / optimizer are OpenAI-ES options; {strategy} "
                    "uses CMA-ES's own rank weights and step-size adaptation"
                )
            antithetic = False
            cls = algorithms.CMA_ES if strategy == "cma_es" else algorithms.Sep_CMA_ES
            self.strategy = cls(population_size, solution)
            self.es_params = self.strategy.default_params.replace(std_init=jnp.asarray(self.std_init, jnp.float32))
        self.antithetic = antithetic

        if isinstance(mesh, (str, dict)):
            from lorajax import sharding

            mesh = sharding.make_mesh(mesh)
        if mesh is not None:
            if member_axis not in mesh.shape:
                raise ValueError(f"member_axis {member_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
            n = mesh.shape[member_axis]
            if population_size % n or (member_chunk is not None and member_chunk % n):
                raise ValueError(
                    f"population_size={population_size} (and member_chunk={member_chunk}) must be "
                    f"divisible by the mesh axis {member_axis!r} of size {n}"
                )
        if member_chunk is not None:
            if isinstance(member_chunk, bool) or not isinstance(member_chunk, int) or member_chunk < 1:
                raise ValueError(f"member_chunk must be a positive int or None (automatic), got {member_chunk!r}")
        self.mesh, self.member_axis, self.member_chunk = mesh, member_axis, member_chunk

    # ------------------------------------------------------------------ genome <-> adapters
    def to_svd(self, frozen: Any, genome: jax.Array) -> dict:
        """The SVD tree of one genome (``frozen``: ``state.frozen``)."""
        entries = {keys: dict(e) for keys, e in adapter_paths(frozen).items()}
        off = 0
        for keys, k, n, _ in self._slots:
            sigma0 = entries[keys][k]
            part = genome[off : off + n].astype(sigma0.dtype)
            off += n
            if self.genome_mode == "relative":
                part = sigma0[:n] * part
            entries[keys][k] = jnp.concatenate([part, sigma0[n:]])
        return nest(entries)

    def to_adapters(self, frozen: Any, genome: jax.Array) -> dict:
        """LoRA adapters ``{"lora_A", "lora_B"}`` of one genome."""
        return svd_lib.from_svd(self.spec, None, self.to_svd(frozen, genome), scale=self.scales)

    def _member(self, frozen: Any, genome: jax.Array) -> Any:
        if self.fitness_input == "genome":
            return genome
        if self.fitness_input == "svd":
            return self.to_svd(frozen, genome)
        return self.to_adapters(frozen, genome)

    def mean_adapters(self, state: State) -> dict:
        """Adapters at the search distribution's mean."""
        return self.to_adapters(state.frozen, state.es.mean)

    def best_adapters(self, state: State) -> dict:
        """Adapters of the best member evaluated so far."""
        return self.to_adapters(state.frozen, state.es.best_solution)

    # ------------------------------------------------------------------ the search
    def init(self, key: jax.Array) -> State:
        """Initial state: the distribution's mean at the adapters' own singular values (σ₀)."""
        with _allow_rank_promotion():
            es = self.strategy.init(key, self.mean0, self.es_params)
        return State(es=es, frozen=self.svd0, generation=jnp.zeros((), jnp.int32), n_nonfinite=jnp.zeros((), jnp.int32))

    def ask(self, state: State, key: jax.Array) -> tuple[jax.Array, State]:
        """``(population [P, d], state)`` from evosax's ``ask``."""
        with _allow_rank_promotion():
            population, es = self.strategy.ask(key, state.es, self.es_params)
        return population, state.replace(es=es)  # type: ignore[attr-defined]  # flax.struct.dataclass adds .replace

    def _constrain(self, x: jax.Array, spec: P) -> jax.Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def _one(self, state: State, fitness_fn: Callable, args: tuple) -> Callable:
        def one(genome):
            out = fitness_fn(self._member(state.frozen, genome), *args)
            out = jnp.asarray(out)
            if out.shape != ():
                raise ValueError(f"fitness_fn must return a scalar, got shape {out.shape}")
            return out.astype(jnp.float32)

        return one

    def _platform(self) -> str:
        return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

    def chunk_size(self, state: State, population: jax.Array, fitness_fn: Callable, *args: Any) -> int:
        """Members per chunk that `evaluate` uses for these shapes (``member_chunk`` if set, else automatic)."""
        p = population.shape[0]
        if self.member_chunk is not None:
            return min(self.member_chunk, p)
        budget = CPU_CHUNK_BYTES if self._platform() == "cpu" else None
        if budget is None:
            return p
        nbytes = member_bytes(self._one(state, fitness_fn, args), population[0])
        multiple = 1 if self.mesh is None else self.mesh.shape[self.member_axis]
        return auto_member_chunk(p, nbytes, budget, multiple)

    def evaluate(self, state: State, population: jax.Array, fitness_fn: Callable, *args: Any) -> jax.Array:
        """``fitness [P]``: ``fitness_fn`` of every member, vmapped in chunks (`chunk_size`; sharded if configured)."""
        one = self._one(state, fitness_fn, args)
        ax, p = self.member_axis, population.shape[0]
        c = self.chunk_size(state, population, fitness_fn, *args)
        if c >= p:
            pop = self._constrain(population, P(ax, None))
            return self._constrain(jax.vmap(one)(pop), P(ax))
        pad = -p % c
        if pad:  # copies of the last member; their fitness is dropped
            population = jnp.concatenate([population, jnp.repeat(population[-1:], pad, axis=0)])
        chunks = population.reshape(-1, c, population.shape[-1])
        chunks = self._constrain(chunks, P(None, ax, None))
        fit = jax.lax.map(lambda ch: self._constrain(jax.vmap(one)(ch), P(ax)), chunks)
        return self._constrain(fit.reshape(-1)[:p], P(ax))

    def tell(self, state: State, key: jax.Array, population: jax.Array, fitness: jax.Array) -> tuple[State, dict]:
        """Update the distribution with ``fitness [P]`` (higher is better; non-finite ranked last)."""
        fit = jnp.asarray(fitness, jnp.float32)
        if fit.shape != (self.population_size,):
            raise ValueError(f"fitness must have shape ({self.population_size},), got {fit.shape}")
        finite = jnp.isfinite(fit)
        n_bad = jnp.sum(~finite).astype(jnp.int32)
        any_ok = n_bad < self.population_size
        worst = jnp.min(jnp.where(finite, fit, jnp.inf))
        best = jnp.max(jnp.where(finite, fit, -jnp.inf))
        margin = 1e-3 * jnp.maximum(best - worst, 0.0) + 1e-6 * jnp.maximum(1.0, jnp.abs(worst))
        filled = jnp.where(finite, fit, jnp.where(any_ok, worst - margin, 0.0))
        with _allow_rank_promotion():
            es, _ = self.strategy.tell(key, population, -filled, state.es, self.es_params)
        es = jax.tree.map(lambda new, old: jnp.where(any_ok, new, old), es, state.es)
        n_ok = jnp.maximum(self.population_size - n_bad, 1)
        metrics = {
            "fitness_mean": jnp.where(any_ok, jnp.sum(jnp.where(finite, fit, 0.0)) / n_ok, jnp.nan),
            "fitness_max": jnp.where(any_ok, best, jnp.nan),
            "fitness_min": jnp.where(any_ok, worst, jnp.nan),
            "n_nonfinite": n_bad,
            "std": jnp.mean(es.std),
            "best_fitness": -es.best_fitness,
        }
        # flax.struct.dataclass adds .replace
        new = state.replace(es=es, generation=state.generation + 1, n_nonfinite=state.n_nonfinite + n_bad)  # type: ignore[attr-defined]
        return new, metrics

    @functools.partial(jax.jit, static_argnames=("self", "fitness_fn"))
    def step(self, state: State, key: jax.Array, fitness_fn: Callable, *args: Any) -> tuple[State, dict]:
        """One generation, pure and jitted: ask, evaluate every member (one vmap), tell.

        ``fitness_fn(member, *args) -> scalar`` (higher is better); ``key`` is
        split into the ask and tell keys. Returns ``(state, metrics)``.
        """
        k_ask, k_tell = jax.random.split(key)
        population, state = self.ask(state, k_ask)
        fitness = self.evaluate(state, population, fitness_fn, *args)
        # the update runs replicated, as on one device: the result does not depend on the device count
        # (CMA-ES's eigendecomposition would amplify a different reduction order into other samples)
        fitness = self._constrain(fitness, P())
        population = self._constrain(population, P())
        return self.tell(state, k_tell, population, fitness)
