"""The serving engine: continuous batching of requests for many adapters over one Llama-family model.

``Engine(model, params, store, *, max_batch, block_size, num_blocks, slots, max_len)``
serves requests (``add_request``) for any adapter of an `AdapterStore`, or the
base model, in one running batch of ``max_batch`` rows:

* **continuous batching**: each `Engine.step` admits waiting requests into free
  rows (prefill: the prompt through the model, its first token sampled), then
  runs one decode step over every running row; a request leaves its row (and
  its KV blocks and adapter slot) the step it finishes, and the next waiting
  request takes the row on the following step. Requests that do not fit (no
  row, no KV blocks, every adapter slot pinned) wait in FIFO order; a request
  whose adapter is not resident may be overtaken by one whose adapter is.
* **paged KV cache** (`lorajax.serve.kv_cache`): blocks are allocated as a
  sequence grows; when none is free for a decode step the most recently admitted
  request is preempted (its blocks freed, it goes back to the front of the queue
  and is recomputed from prompt + generated tokens when readmitted, vLLM's
  recompute preemption) so the rest keep going.
* **adapters** (`lorajax.serve.adapters`): a device pool of ``slots`` stacked
  adapters (slot 0 = base), loaded from host memory with LRU eviction. Each row
  carries its slot id; at every adapted ``nn.Dense`` the row's own ``A``, ``B``,
  scale and gain are gathered from the pool and applied as
  ``g ⊙ (x W + s (x A) B) + b`` (the rows are ``vmap``-ed, so this is Punica's
  gather + batched matmul). Different ranks share a pool through zero padding,
  different target sets through zero entries; both are exact. The adapters a
  step admits are written to the pool by one device call, and while requests
  wait, the adapters of the next ones are loaded during the decode step
  (``prefetch``; never evicting one a running row uses).
* **static shapes**: one jitted function serves prefill and decode; its shapes
  are ``[rows, tokens]`` = ``[1, bucket]`` for a prefill (prompt padded on the
  right to a power-of-two bucket ``>= min_bucket``, capped at the cache view
  ``max_blocks · block_size``) and ``[max_batch, 1]`` for a decode step, with
  block tables, positions, slot ids, sampling settings as arrays. So the engine
  compiles once per prefill bucket plus once for decoding, and never again in
  steady state (`Engine.compiles` counts traces).
* **sampling** per row: greedy (``temperature == 0``), or ``softmax(logits / T)``
  within the top-``top_p`` nucleus, drawn with ``fold_in(key(seed), t)`` for the
  request's ``t``-th token: the draw of a request depends on its own seed and
  logits only, never on its batch-mates, and equals `lorajax.models.llama.generate`
  on that request alone with ``key=jax.random.key(seed)``.
* **stopping**: ``eos`` ids (kept in the output), ``stop`` token-id sequences
  or strings (strings need ``tokenizer``: ``ids -> str``), ``max_tokens``, and
  ``max_len`` tokens in all (prompt + generated).

Memory: the KV pool and the adapter pool are two fixed device arrays (their
bytes: `Engine.memory`), not one unified pool as in S-LoRA. S-LoRA pages adapter
weights and KV entries in one pool because both are ``hidden``-sized vectors in
its CUDA kernels; here the adapter pool holds per-target ``[in, R]`` / ``[R, out]``
matrices of different widths (q/k/v/o and the MLP), and XLA needs every array
shape fixed at compile time, so a shared page size would mean padding every
rank row to the widest layer and gathering them back per call. The trade-off is
the split of one budget between ``num_blocks`` and ``slots``, set by the caller.

Correctness (tested): greedy tokens of every request equal `llama.generate` on
the base params merged with that request's adapter, whatever else runs in the
batch, and transformers + PEFT greedy generation for a PEFT adapter; evicted and
reloaded adapters give the same tokens.

References:
  W. Kwon et al., "Efficient Memory Management for Large Language Model Serving
  with PagedAttention" (vLLM), arXiv:2309.06180: ``vllm/core/scheduler.py``
  (continuous batching, recompute preemption). G.-I. Yu et al., "Orca", OSDI 2022
  (iteration-level scheduling). Y. Sheng et al., "S-LoRA", arXiv:2311.03285;
  L. Chen et al., "Punica", arXiv:2310.18547.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.models import llama
  >>> from lorajax.serve import AdapterStore, Engine
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
  ...                    num_attention_heads=4, num_key_value_heads=2)
  >>> model = llama.build(cfg)
  >>> params = model.init(jax.random.key(0), *llama.example_inputs(cfg))["params"]
  >>> store = AdapterStore(params)
  >>> spec = lorajax.Spec("lora", rank=2, targets=["q_proj", "v_proj"], init_weights=False)
  >>> _ = store.add("a", (spec, lorajax.init(spec, params, jax.random.key(1))))
  >>> engine = Engine(model, params, store, max_batch=2, block_size=4, num_blocks=8, slots=2, max_len=16)
  >>> rid = engine.add_request([1, 2, 3], adapter="a", max_tokens=3)
  >>> len(engine.run_until_done()[rid])
  3
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax.models import llama
from lorajax.paths import module_name, weight_leaves
from lorajax.serve import kv_cache
from lorajax.serve.adapters import AdapterStore, DevicePool

__all__ = ["Engine", "Output", "Request"]


@dataclasses.dataclass
class Request:
    """A request's settings and state (host side)."""

    id: int
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[tuple[int, ...], ...]
    stop_strs: tuple[str, ...]
    eos: frozenset[int]
    key_data: np.ndarray
    tokens: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    row: int | None = None
    order: int = 0
    finish_reason: str | None = None
    preemptions: int = 0


@dataclasses.dataclass(frozen=True)
class Output:
    """What one `Engine.step` produced for a request: its new tokens, and whether (and why) it finished
    (``"eos"``, ``"stop"``, ``"length"``: max_tokens or max_len reached)."""

    id: int
    tokens: tuple[int, ...]
    finished: bool
    finish_reason: str | None


# ---------------------------------------------------------------------------- traced pieces
def _interceptor(row_adapters: dict, used: set) -> Callable:
    """Per-row adapter at each pooled ``nn.Dense``: ``g ⊙ (x W + s (x A) B) + b`` for ``x: [S, in]``."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        name = ".".join(str(p) for p in module.path)
        e = row_adapters.get(name)
        if e is None:
            return next_fun(*args, **kwargs)
        used.add(name)
        x = args[0] if args else kwargs["inputs"]
        w: Any = module.get_variable("params", "kernel")
        if not isinstance(w, jax.Array):
            raise ValueError(f"serve: {name} has a quantised kernel ({type(w).__name__}); serve a float base")
        dtype = module.dtype or jnp.result_type(x, w)
        x, w = x.astype(dtype), w.astype(dtype)
        a, b = e["A"], e["B"]
        delta = e["scale"] * ((x.astype(a.dtype) @ a) @ b)
        y = (x @ w + delta.astype(dtype)) * e["gain"][None, :].astype(dtype)
        if module.use_bias:
            y = y + module.get_variable("params", "bias").astype(dtype)[None, :]
        return y

    return intercept


def _row_forward(model, params, row_adapters, ids_S, start, table_M, last, kv_pool, used):
    """One sequence: ``S`` tokens at positions ``start ..`` over its paged cache -> (logits at ``last``, new K/V)."""
    S = ids_S.shape[0]
    view = tuple({n: kv_cache.gather(layer[n], table_M)[None] for n in ("k", "v")} for layer in kv_pool)
    pos_1xS = (start + jnp.arange(S, dtype=jnp.int32))[None, :]
    with nn.intercept_methods(_interceptor(row_adapters, used)):
        logits, new = model.apply(
            {"params": params}, ids_S[None, :], position_ids=pos_1xS, cache=view, cache_index=start
        )
    K, d = kv_pool[0]["k"].shape[2:]
    entries = tuple(
        {n: jax.lax.dynamic_slice(layer[n][0], (start, 0, 0), (S, K, d)) for n in ("k", "v")} for layer in new
    )
    return jax.lax.dynamic_index_in_dim(logits[0], last, keepdims=False), entries


def _pick(logits_V, key_data, t, temperature, top_p):
    """One row's next token: argmax when ``temperature == 0``, else a draw as `llama.generate`'s with batch 1."""
    logits_V = logits_V.astype(jnp.float32)
    greedy = jnp.argmax(logits_V, axis=-1).astype(jnp.int32)
    scaled = logits_V / jnp.where(temperature > 0, temperature, 1.0)
    filtered = llama._top_p_filter(scaled[None, :], top_p)[0]
    scaled = jnp.where(top_p < 1.0, filtered, scaled)
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), t)
    drawn = jax.random.categorical(key, scaled[None, :], axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _step(
    params, kv_pool, apool, slot_R, ids_RxS, start_R, table_RxM, last_R, keys_Rx2, t_R, temp_R, top_p_R, *, engine
):
    R, S = ids_RxS.shape
    engine._traces[(R, S)] += 1  # runs once per trace, i.e. per compilation
    row_adapters = jax.tree_util.tree_map(lambda x: x[slot_R], apool)
    used: set[str] = set()
    fwd = functools.partial(_row_forward, engine.model, used=used)
    logits_RxV, new = jax.vmap(fwd, in_axes=(None, 0, 0, 0, 0, 0, None))(
        params, row_adapters, ids_RxS, start_R, table_RxM, last_R, kv_pool
    )
    missing = sorted(set(apool) - used)
    if missing:
        raise ValueError(f"serve: the model never called the pooled Dense layers {missing[:4]}")
    kv_pool = tuple(
        {n: kv_cache.scatter(layer[n], table_RxM, start_R, entry[n]) for n in ("k", "v")}
        for layer, entry in zip(kv_pool, new)
    )
    return jax.vmap(_pick)(logits_RxV, keys_Rx2, t_R, temp_R, top_p_R), kv_pool


# ---------------------------------------------------------------------------- engine
class Engine:
    """Continuous-batching, multi-adapter generation over a Llama-family model (see the module docstring).

    Args:
      model: a `lorajax.models.llama.LlamaForCausalLM` (e.g. from `lorajax.models.from_pretrained`).
      params: its params.
      store: an `AdapterStore` made for ``params``; its adapters (and any added later that fit
        the pool) can be requested by name.
      max_batch: decode rows (requests running at once).
      block_size: tokens per KV block.
      num_blocks: KV blocks in the pool (besides the null block); ``num_blocks · block_size``
        must hold at least one ``max_len`` sequence.
      slots: device adapter slots including the base slot 0 (>= 2).
      max_len: tokens per sequence, prompt + generated (default: the model's
        ``max_position_embeddings``).
      max_rank: the pool's rank for every target (default: per target, the largest
        rank among the store's adapters).
      targets: module names the pool holds (default: every target of the store's adapters).
      min_bucket: smallest prefill length bucket (a power of two).
      tokenizer: ``ids -> str``, needed for ``stop`` strings.
      prefetch: while requests wait, load the adapters of the next ``max_batch`` waiting
        requests during each decode step (into free slots or in place of unpinned adapters
        those requests do not need; never one a running row uses), so that admitting them
        loads nothing.
    """

    def __init__(
        self,
        model: Any,
        params: Any,
        store: AdapterStore,
        *,
        max_batch: int = 8,
        block_size: int = 16,
        num_blocks: int = 64,
        slots: int = 4,
        max_len: int | None = None,
        max_rank: int | None = None,
        targets: Sequence[str] | None = None,
        min_bucket: int = 8,
        tokenizer: Callable[[list[int]], str] | None = None,
        prefetch: bool = True,
    ):
        cfg = getattr(model, "cfg", None)
        if not isinstance(cfg, llama.Config):
            raise TypeError(f"Engine serves lorajax.models.llama models, got {type(model).__name__}")
        if not isinstance(store, AdapterStore):
            raise TypeError(f"store must be a lorajax.serve.AdapterStore, got {type(store).__name__}")
        for name, v in (("max_batch", max_batch), ("block_size", block_size), ("min_bucket", min_bucket)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if min_bucket & (min_bucket - 1):
            raise ValueError(f"min_bucket must be a power of two, got {min_bucket}")
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        self.model, self.params, self.store, self.cfg = model, params, store, cfg
        self.max_batch, self.block_size, self.max_len = max_batch, block_size, max_len
        self.tokenizer, self.prefetch = tokenizer, bool(prefetch)
        self.max_blocks = kv_cache.blocks_needed(max_len, block_size)
        if num_blocks * block_size < max_len:
            raise ValueError(
                f"num_blocks·block_size = {num_blocks}·{block_size} cannot hold one max_len={max_len} sequence; "
                f"use num_blocks >= {self.max_blocks}"
            )
        self.allocator = kv_cache.BlockAllocator(num_blocks)
        dtype = llama._params_dtype(params)
        assert cfg.num_key_value_heads is not None and cfg.head_dim is not None  # filled in by Config
        self.kv = kv_cache.init_pool(
            cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype
        )
        shapes = {module_name(k): tuple(w.shape) for k, w in weight_leaves(params)}
        wanted = list(targets) if targets is not None else sorted({m for n in store.names() for m in store[n].targets})
        unknown = [m for m in wanted if m not in shapes]
        if unknown:
            raise ValueError(f"targets {unknown[:4]} are not Dense kernels of the model (e.g. {sorted(shapes)[:2]})")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        ranks = {m: max_rank or max((store[n].ranks.get(m, 1) for n in store.names()), default=1) for m in wanted}
        # one admission or prefetch loads at most max_batch adapters: one device write
        max_loads = max(1, min(slots - 1, max_batch)) if isinstance(slots, int) else None
        self.adapters = DevicePool(store, slots, {m: shapes[m] for m in wanted}, ranks, dtype, max_loads=max_loads)
        for n in store.names():
            self.adapters.check(store[n])
        self.buckets = [b for b in (min_bucket << i for i in range(40)) if b < self.view_len] + [self.view_len]
        self._traces: collections.Counter = collections.Counter()
        self._fn = jax.jit(functools.partial(_step, engine=self), donate_argnums=1)
        self._ids = itertools.count()
        self._order = itertools.count()
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request | None] = [None] * max_batch
        self.requests: dict[int, Request] = {}

    # ------------------------------------------------------------------ public
    @property
    def view_len(self) -> int:
        """Positions of a sequence's gathered cache view: ``max_blocks · block_size``."""
        return self.max_blocks * self.block_size

    @property
    def compiles(self) -> int:
        """Traces (= compilations) of the step function so far: one per prefill bucket used, one for decoding."""
        return sum(self._traces.values())

    def memory(self) -> dict[str, int]:
        """Device bytes of the KV pool and the adapter pool, and KV blocks in use / free."""
        return {
            "kv_bytes": kv_cache.pool_bytes(self.kv),
            "adapter_bytes": self.adapters.nbytes,
            "kv_blocks_used": self.allocator.num_used,
            "kv_blocks_free": self.allocator.num_free,
        }

    def add_request(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        adapter: str | None = None,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str | Sequence[int]] = (),
        eos: int | Sequence[int] | None = None,
        seed: int = 0,
    ) -> int:
        """Queue a request and return its id. ``adapter``: a store name, or None / ``"base"`` for the base model.

        ``stop``: strings (need the engine's ``tokenizer``) or token-id sequences; the
        request finishes with the token that completes one (kept in the output), as
        with an ``eos`` id. A request beyond ``max_batch`` waits; it is not an error.
        """
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of ints, got shape {ids.shape} {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(
                f"prompt_ids must be in [0, {self.cfg.vocab_size}), got {int(ids.min())}..{int(ids.max())}"
            )
        if ids.size >= self.max_len:
            raise ValueError(
                f"prompt of {ids.size} tokens does not fit max_len={self.max_len} (prompt + generated); "
                f"shorten it or build the Engine with max_len > {ids.size}"
            )
        adapter = None if adapter == "base" else adapter
        if adapter is not None:
            if adapter not in self.store:
                raise ValueError(f"unknown adapter {adapter!r}; the store has {self.store.names()} (or None for base)")
            self.adapters.check(self.store[adapter])
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(stop, str):
            stop = (stop,)
        stop_strs = tuple(s for s in stop if isinstance(s, str))
        stop_ids = tuple(tuple(int(i) for i in s) for s in stop if not isinstance(s, str))
        if stop_strs and self.tokenizer is None:
            raise ValueError(f"stop strings {stop_strs} need the Engine's tokenizer (ids -> str); or pass token ids")
        if any(not s for s in stop_ids + stop_strs):
            raise ValueError("stop sequences must be non-empty")
        eos_set = frozenset() if eos is None else frozenset(int(e) for e in np.atleast_1d(eos))
        rid = next(self._ids)
        req = Request(
            id=rid,
            prompt=[int(i) for i in ids],
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            stop_ids=stop_ids,
            stop_strs=stop_strs,
            eos=eos_set,
            key_data=np.asarray(jax.random.key_data(jax.random.key(int(seed))), np.uint32),
        )
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def step(self) -> list[Output]:
        """Admit and prefill what fits, then one decode step over the running rows. Returns this step's outputs."""
        new: dict[int, list[int]] = collections.defaultdict(list)
        finished: list[Request] = []
        for req in self._admit():
            self._prefill(req)
            self._emit(req, new, finished)
        running = self._reserve_decode()
        toks = self._decode(running) if running else None
        if self.prefetch and self.waiting:  # dispatched while the decode step runs on the device
            self.adapters.prefetch(r.adapter for r in itertools.islice(self.waiting, self.max_batch))
        if running:
            toks_R = np.asarray(toks)
            for req in running:
                assert req.row is not None
                req.tokens.append(int(toks_R[req.row]))
                self._emit(req, new, finished)
        out = [Output(rid, tuple(toks), False, None) for rid, toks in new.items()]
        done = {r.id: r for r in finished}
        return [
            dataclasses.replace(o, finished=True, finish_reason=done[o.id].finish_reason) if o.id in done else o
            for o in out
        ]

    def run_until_done(self, max_steps: int = 100_000) -> dict[int, list[int]]:
        """Step until no request is left; ``{id: generated tokens}`` of every finished request."""
        for _ in range(max_steps):
            if not self.has_work():
                break
            self.step()
        else:
            raise RuntimeError(f"run_until_done: still working after {max_steps} steps")
        return {rid: list(r.tokens) for rid, r in self.requests.items() if r.finish_reason is not None}

    def result(self, rid: int) -> tuple[list[int], str | None]:
        """``(generated tokens, finish reason or None while running)`` of request ``rid``."""
        req = self.requests[rid]
        return list(req.tokens), req.finish_reason

    def abort(self, rid: int) -> None:
        """Stop request ``rid`` now (finish reason ``"abort"``): it leaves the queue or its row, freeing its
        KV blocks and adapter slot. A finished request is left as it is."""
        req = self.requests[rid]
        if req.finish_reason is not None:
            return
        req.finish_reason = "abort"
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def add_adapter(self, name: str, source: Any) -> None:
        """Add an adapter to the store at run time (``AdapterStore.add``'s sources); a ValueError, and the
        store unchanged, when it does not fit the adapter pool (targets, rank)."""
        entry = self.store.add(name, source)
        try:
            self.adapters.check(entry)
        except ValueError:
            self.store.remove(name)
            raise

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter from the store and the device pool; a ValueError while a request uses it."""
        if name not in self.store:
            raise KeyError(f"unknown adapter {name!r}; the store has {self.store.names()}")
        users = [r.id for r in self.requests.values() if r.adapter == name and r.finish_reason is None]
        if users:
            raise ValueError(f"adapter {name!r} is used by {len(users)} unfinished request(s); retry when they end")
        self.adapters.forget(name)  # its slot is free (unpinned: no request uses it)
        self.store.remove(name)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> list[Request]:
        admitted = []
        for req in list(self.waiting):
            if None not in self.rows:
                break
            need = kv_cache.blocks_needed(len(req.prompt) + len(req.tokens), self.block_size)
            if need > self.allocator.num_free:
                break  # memory is FIFO: a long request is not starved by short ones
            if not self.adapters.can_acquire(req.adapter):
                continue  # every slot pinned: a request for a resident adapter may go first
            slot = self.adapters.acquire(req.adapter)
            assert slot is not None
            req.slot, req.blocks = slot, self.allocator.allocate(need)
            req.row, req.order = self.rows.index(None), next(self._order)
            self.rows[req.row] = req
            self.waiting.remove(req)
            admitted.append(req)
        return admitted

    def _release(self, req: Request) -> None:
        self.allocator.free(req.blocks)
        req.blocks = []
        if req.slot is not None:
            self.adapters.release(req.slot)
        req.slot = None
        if req.row is not None:
            self.rows[req.row] = None
        req.row = None

    def _reserve_decode(self) -> list[Request]:
        """Rows to decode, each with a block for its next position (preempting the newest when none is free)."""
        running = sorted((r for r in self.rows if r is not None), key=lambda r: r.order)
        for req in list(running):
            if req not in running:
                continue  # preempted below
            pos = len(req.prompt) + len(req.tokens) - 1  # the last token is not in the cache yet
            while pos // self.block_size >= len(req.blocks):
                if self.allocator.num_free:
                    req.blocks += self.allocator.allocate(1)
                    continue
                victim = running.pop()  # newest admitted
                self._release(victim)
                victim.preemptions += 1
                self.waiting.appendleft(victim)
                if victim is req:
                    break
        return running

    def _table(self, req: Request) -> np.ndarray:
        table = np.full((self.max_blocks,), kv_cache.NULL_BLOCK, np.int32)
        table[: len(req.blocks)] = req.blocks
        return table

    def _run(self, reqs: list[Request | None], ids: np.ndarray, start: np.ndarray, last: np.ndarray) -> jax.Array:
        """Dispatch one step (not waited for); the sampled tokens ``[R]`` on the device."""
        R = len(reqs)
        slot, table = np.zeros((R,), np.int32), np.full((R, self.max_blocks), kv_cache.NULL_BLOCK, np.int32)
        keys, t = np.zeros((R, 2), np.uint32), np.zeros((R,), np.int32)
        temp, top_p = np.zeros((R,), np.float32), np.ones((R,), np.float32)
        for i, req in enumerate(reqs):
            if req is None:
                continue
            assert req.slot is not None
            slot[i], table[i], keys[i], t[i] = req.slot, self._table(req), req.key_data, len(req.tokens)
            temp[i], top_p[i] = req.temperature, req.top_p
        toks, self.kv = self._fn(
            self.params, self.kv, self.adapters.pool, slot, ids, start, table, last, keys, t, temp, top_p
        )  # reading the pool writes the adapters loaded since the last step (one call)
        return toks

    def _prefill(self, req: Request) -> None:
        seq = req.prompt + req.tokens
        n = len(seq)
        bucket = next(b for b in self.buckets if b >= n)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = seq
        tok = self._run([req], ids, np.zeros((1,), np.int32), np.full((1,), n - 1, np.int32))
        req.tokens.append(int(np.asarray(tok)[0]))

    def _decode(self, running: list[Request]) -> jax.Array:
        """Dispatch one decode step over the running rows; their next tokens ``[max_batch]`` (by row)."""
        reqs: list[Request | None] = list(self.rows)
        ids = np.zeros((self.max_batch, 1), np.int32)
        start = np.zeros((self.max_batch,), np.int32)
        for req in running:
            assert req.row is not None
            ids[req.row, 0] = req.tokens[-1]
            start[req.row] = len(req.prompt) + len(req.tokens) - 1
        return self._run(reqs, ids, start, np.zeros((self.max_batch,), np.int32))

    def _emit(self, req: Request, new: dict, finished: list) -> None:
        if req.finish_reason is not None:
            return
        new[req.id].append(req.tokens[-1])
        reason = None
        if req.tokens[-1] in req.eos:
            reason = "eos"
        elif any(len(s) <= len(req.tokens) and tuple(req.tokens[-len(s) :]) == s for s in req.stop_ids):
            reason = "stop"
        elif req.stop_strs and self.tokenizer is not None:
            text = self.tokenizer(req.tokens)
            if any(s in text for s in req.stop_strs):
                reason = "stop"
        if reason is None and (len(req.tokens) >= req.max_tokens or len(req.prompt) + len(req.tokens) >= self.max_len):
            reason = "length"
        if reason is not None:
            req.finish_reason = reason
            self._release(req)
            finished.append(req)
