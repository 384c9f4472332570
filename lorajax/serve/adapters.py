"""Adapters for serving: a host store of named adapters and a device pool of LRU slots.

Every adapter is reduced to one *serving form* per adapted ``nn.Dense`` (module
name ``model.layers.0.self_attn.q_proj``): ``A [in, r]``, ``B [r, out]``, a
scale ``s`` and a per-output gain ``g [out]``, so that the layer computes::

    y = g ⊙ (x W + s · (x A) B) + b

Plain LoRA and rsLoRA (``Variant.factors.exact``): ``g = 1``. DoRA and any
variant whose merged weight is a per-output-column rescaling of ``W + s·A·B``
(``factors`` declared, not exact): ``g = m / ‖W + s·A·B‖`` is read off the
variant's own merged weight ``W'`` as the least-squares column factor
``g_j = Σ_i W'_ij V_ij / Σ_i V_ij²`` (``V = W + s·A·B``), and refused unless
``W' = g ⊙ V`` holds (so DoRA's magnitude/norm is exact at inference: the norm
is fixed once the adapter is). Variants whose update is not of that form
(VeRA, MiSS, routing variants, ...) are refused with the reason.

The device pool holds ``slots`` adapters stacked per target: ``A [slots, in, R]``,
``B [slots, R, out]``, ``scale [slots]``, ``gain [slots, out]``, with ``R`` the
pool's rank for that target; a smaller rank is zero-padded (A's extra columns
and B's extra rows are zero, so ``(x A) B`` is unchanged) and a target an
adapter lacks is all zeros with gain 1 (no change). Slot 0 is the base model
(the zero adapter) and is never evicted. `DevicePool.acquire` returns the slot
of a named adapter, loading it from the host store into a free slot, or in place
of the least recently used unpinned adapter, when it is not resident (S-LoRA's
adapter paging); slots in use by a running request are pinned. A load moves one
flat host array per adapter, packed once in the pool's padded layout, and the
loads queued before a step are written by one jitted, in-place scatter;
`DevicePool.prefetch` starts the loads of waiting requests' adapters early
(S-LoRA prefetches the adapters of the next batch while the current one runs).

References:
  Y. Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters",
  MLSys 2024, arXiv:2311.03285 (adapters in host memory, fetched to a device
  pool on demand; official code ``S-LoRA/slora/server/router/manager.py`` and
  ``slora/models/peft/lora_unordered_batch_infer.py``). L. Chen et al.,
  "Punica: Multi-Tenant LoRA Serving", arXiv:2310.18547 (one batch, per-row
  adapter gather). DoRA: S.-Y. Liu et al., arXiv:2402.09353 (PEFT
  ``tuners/lora/dora.py``: ``(m / ‖W + s·B A‖) (x Wᵀ + s·x Aᵀ Bᵀ)``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import peft
from lorajax.paths import module_name
from lorajax.plan import make_plan
from lorajax.spec import Spec
from lorajax.variants.base import EVAL

__all__ = ["ServingAdapter", "serving_form", "AdapterStore", "DevicePool"]

#: relative tolerance of the check that a variant's merged weight is ``g ⊙ (W + s·A·B)``
GAIN_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class ServingAdapter:
    """One adapter in serving form: ``{module name: {"A": [in, r], "B": [r, out], "scale": s, "gain": [out] | None}}``
    (host numpy arrays; ``gain`` None means 1) and where it came from."""

    name: str
    targets: dict
    source: str

    @property
    def ranks(self) -> dict[str, int]:
        return {m: e["A"].shape[1] for m, e in self.targets.items()}

    @property
    def nbytes(self) -> int:
        return sum(e["A"].nbytes + e["B"].nbytes for e in self.targets.values())


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def serving_form(spec: Spec, params: Any, adapters: Any, *, name: str = "adapter") -> dict:
    """``{module name: {"A", "B", "scale", "gain"}}`` (numpy float32) of ``adapters`` (``spec``) for ``params``.

    Raises ValueError naming ``name`` and the reason: adapters that do not fit
    ``params`` (a target the model lacks), shared model-level state, a target
    that is not a 2-D Dense kernel, a variant without an ``s·A·B`` term, or one
    whose merged weight is not a per-column rescaling of ``W + s·A·B``.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"adapter {name!r}: spec must be a lorajax.Spec, got {type(spec).__name__}")
    try:
        plan = make_plan(spec, params, adapters)
    except ValueError as e:
        raise ValueError(f"adapter {name!r} does not fit the served model: {e}") from None
    variant = plan.variant
    f = variant.factors
    if f is None or f.scale is None or variant.adapted is None:
        raise ValueError(
            f"adapter {name!r}: variant {spec.variant!r} has no mergeable s·A·B factors; the serving engine "
            "runs LoRA-form adapters (LoRA, rsLoRA, DoRA): merge it into the base and serve that, or convert it to LoRA"
        )
    if plan.shared:
        raise ValueError(f"adapter {name!r}: variant {spec.variant!r} has model-level shared state; not servable")
    out = {}
    for t in plan.targets:
        adapter = plan.adapter(t)
        if t.keys[-1] != "kernel" or len(t.shape) != 2 or t.in_axes != 1:
            raise ValueError(
                f"adapter {name!r}: target {'/'.join(t.keys)} is not a 2-D Dense kernel (shape {t.shape}); "
                "the serving engine adapts nn.Dense layers only"
            )
        a = np.asarray(adapter[f.a], np.float32)
        b = np.asarray(adapter[f.b], np.float32)
        s = float(f.scale(t))
        gain = None
        if not f.exact:
            w = jnp.asarray(_get(params, t.keys), jnp.float32)
            merged = np.asarray(variant.adapted(w, adapter, t, EVAL), np.float64)
            v = np.asarray(w, np.float64) + s * (a.astype(np.float64) @ b.astype(np.float64))
            gain = np.sum(merged * v, axis=0) / np.maximum(np.sum(v * v, axis=0), 1e-30)
            err = np.max(np.abs(merged - gain[None, :] * v))
            if err > GAIN_RTOL * max(np.max(np.abs(merged)), 1e-30):
                raise ValueError(
                    f"adapter {name!r}: variant {spec.variant!r} at {t.name}: the merged weight is not a per-output "
                    f"rescaling of W + s·A·B (max error {err:.3g}); the serving engine runs LoRA and DoRA-form "
                    "adapters only"
                )
            gain = gain.astype(np.float32)
        out[module_name(t.keys)] = {"A": a, "B": b, "scale": s, "gain": gain}
    if not out:
        raise ValueError(f"adapter {name!r} adapts no weight of the served model")
    return out


class AdapterStore:
    """Host memory: named adapters in serving form for one base model's ``params``.

    ``add(name, source)``: ``source`` is a PEFT adapter folder (path; read by
    `lorajax.peft.load`) or a ``(spec, adapters)`` pair (e.g. from `lorajax.init`
    and training, or an orbax checkpoint). Names are unique; ``"base"`` / None
    mean the base model and cannot be added.
    """

    def __init__(self, params: Any):
        self.params = params
        self._adapters: dict[str, ServingAdapter] = {}

    def add(self, name: str, source: Any) -> ServingAdapter:
        if not isinstance(name, str) or not name or name == "base":
            raise ValueError(f"adapter name must be a non-empty string other than 'base', got {name!r}")
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the store")
        if isinstance(source, (str, os.PathLike)):
            spec, adapters = peft.load(source, self.params)
            where = str(Path(source))
        elif isinstance(source, tuple) and len(source) == 2:
            spec, adapters = source
            where = "(spec, adapters)"
        else:
            raise TypeError(
                f"adapter {name!r}: source must be a PEFT folder path or a (spec, adapters) pair, "
                f"got {type(source).__name__}"
            )
        entry = ServingAdapter(name, serving_form(spec, self.params, adapters, name=name), where)
        self._adapters[name] = entry
        return entry

    def remove(self, name: str) -> ServingAdapter:
        """Drop adapter ``name`` from the store (a KeyError when absent); returns it."""
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; the store has {sorted(self._adapters)}")
        return self._adapters.pop(name)

    def __getitem__(self, name: str) -> ServingAdapter:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; the store has {sorted(self._adapters)}")
        return self._adapters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return list(self._adapters)


def _write_slots(pool: dict, slot_K: jax.Array, w_K: tuple, s_KxT: jax.Array, *, layout: tuple, traces: list) -> dict:
    """``pool`` with slots ``slot_K [K]`` overwritten by the flat host entries ``w_K`` (K arrays ``[N]``: every
    target's padded A, B, gain) and their scales ``s_KxT``; an index ``>= slots`` is dropped."""
    traces.append(slot_K.shape[0])  # runs once per trace, i.e. per compilation
    w_KxN = jnp.stack(w_K)
    K = w_KxN.shape[0]
    out = {}
    for t, (m, off, i, r, o) in enumerate(layout):
        vals = {
            "A": w_KxN[:, off : off + i * r].reshape(K, i, r),
            "B": w_KxN[:, off + i * r : off + (i + o) * r].reshape(K, r, o),
            "gain": w_KxN[:, off + (i + o) * r : off + (i + o) * r + o],
            "scale": s_KxT[:, t],
        }  # one scatter per leaf, in place
        out[m] = {key: pool[m][key].at[slot_K].set(vals[key], mode="drop") for key in pool[m]}
    return out


class DevicePool:
    """``slots`` device slots of stacked adapters (slot 0 = base), filled from an `AdapterStore` with LRU eviction.

    Args:
      store: the host store.
      slots: number of device slots including the base slot 0 (>= 2).
      shapes: ``{module name: (in, out)}`` of the Dense kernels that may be adapted.
      ranks: ``{module name: R}`` the pool's rank per target (adapters of larger rank are refused).
      dtype: dtype of A, B and gains on the device.
      max_loads: adapters written by one device call (default ``slots - 1``: every load
        between two steps); more pending loads take several calls.

    ``pool`` is the device pytree ``{module: {"A": [slots, in, R], "B": [slots, R, out],
    "scale": [slots], "gain": [slots, out]}}``. ``acquire(name)`` pins and returns a
    slot (loading the adapter when it is not resident; ``None`` when every
    non-base slot is pinned); ``release(slot)`` unpins it; ``prefetch(names)``
    loads adapters without pinning them, never evicting a pinned one.

    A load is cheap: the first load of an adapter packs it, once, into its *host
    entry*: one flat array ``[N]`` of the pool's dtype (every target's A, B and
    gain, zero-padded to the pool's rank, in the pool's layout) and one float32
    ``[T]`` of scales, kept (``host_bytes``) while the adapter is in the store.
    Loads are queued on the host and written by `flush` (reading ``pool`` flushes):
    one host -> device transfer of the queued entries and one jitted scatter of
    them into their slots, with the pool's buffers donated (written in place) and
    the slot list padded to ``max_loads`` (an index past the pool is dropped), so
    the write compiles once (``write_compiles``). JAX dispatch is asynchronous:
    `flush` returns before the copy and the write are done. ``loads`` counts
    adapters written, ``writes`` device calls, ``prefetched`` loads by `prefetch`.
    """

    def __init__(
        self,
        store: AdapterStore,
        slots: int,
        shapes: dict,
        ranks: dict,
        dtype: Any = jnp.float32,
        max_loads: int | None = None,
    ):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 2:
            raise ValueError(f"slots must be an int >= 2 (slot 0 is the base model), got {slots!r}")
        max_loads = slots - 1 if max_loads is None else max_loads
        if isinstance(max_loads, bool) or not isinstance(max_loads, int) or max_loads < 1:
            raise ValueError(f"max_loads must be a positive int, got {max_loads!r}")
        self.store, self.slots, self.shapes, self.ranks = store, slots, dict(shapes), dict(ranks)
        self.max_loads = max_loads
        self._pool = {
            m: {
                "A": jnp.zeros((slots, i, self.ranks[m]), dtype),
                "B": jnp.zeros((slots, self.ranks[m], o), dtype),
                "scale": jnp.zeros((slots,), jnp.float32),
                "gain": jnp.ones((slots, o), dtype),
            }
            for m, (i, o) in self.shapes.items()
        }
        # the host entry's layout: per target (in the pool's order, from ``offset``) A [in, R], B [R, out], gain [out]
        layout: list[tuple[str, int, int, int, int]] = []
        off = 0
        for m, (i, o) in self.shapes.items():
            r = self.ranks[m]
            layout.append((m, off, i, r, o))
            off += (i + o) * r + o
        self._layout = tuple(layout)
        self._blank = np.zeros((off,), np.dtype(dtype))  # the zero adapter: A = B = 0, gain = 1
        for _, off, i, r, o in self._layout:
            self._blank[off + (i + o) * r : off + (i + o) * r + o] = 1
        self._write_traces: list[int] = []
        self._write = jax.jit(
            functools.partial(_write_slots, layout=self._layout, traces=self._write_traces), donate_argnums=0
        )
        self._host: dict[str, tuple[ServingAdapter, np.ndarray, np.ndarray]] = {}
        self._pending: dict[int, str] = {}  # slot -> adapter name, written by the next flush
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order, oldest first
        self.pins = [0] * slots
        self.loads = self.writes = self.prefetched = 0

    @property
    def pool(self) -> dict:
        """The device pytree, with every queued load written (see `flush`)."""
        self.flush()
        return self._pool

    @property
    def write_compiles(self) -> int:
        """Traces (= compilations) of the batched slot write so far (one for a fixed ``max_loads``)."""
        return len(self._write_traces)

    def check(self, adapter: ServingAdapter) -> None:
        """Raise ValueError when ``adapter`` does not fit the pool (unknown target, rank above the pool's)."""
        for m, e in adapter.targets.items():
            if m not in self.shapes:
                raise ValueError(
                    f"adapter {adapter.name!r} adapts {m}, which the engine's adapter pool does not hold "
                    f"(pool targets: {sorted(self.shapes)[:4]}...); add every adapter to the store before "
                    "building the Engine, or pass targets= covering it"
                )
            if e["A"].shape[1] > self.ranks[m]:
                raise ValueError(
                    f"adapter {adapter.name!r} has rank {e['A'].shape[1]} at {m}, above the pool's rank "
                    f"{self.ranks[m]}; build the Engine with max_rank >= {e['A'].shape[1]}"
                )

    def host_entry(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(w [N], scales [T])``: adapter ``name`` packed in the pool's layout (built on first use, then cached;
        rebuilt when the store's adapter of that name is a different one)."""
        adapter = self.store[name]
        cached = self._host.get(name)
        if cached is not None and cached[0] is adapter:
            return cached[1], cached[2]
        self.check(adapter)
        w = self._blank.copy()
        scales = np.zeros((len(self._layout),), np.float32)
        for t, (m, off, i, r, o) in enumerate(self._layout):
            e = adapter.targets.get(m)
            if e is None:
                continue  # zeros and gain 1: no change
            k = e["A"].shape[1]
            w[off : off + i * r].reshape(i, r)[:, :k] = e["A"]
            w[off + i * r : off + (i + o) * r].reshape(r, o)[:k, :] = e["B"]
            if e["gain"] is not None:
                w[off + (i + o) * r : off + (i + o) * r + o] = e["gain"]
            scales[t] = e["scale"]
        self._host[name] = (adapter, w, scales)
        return w, scales

    @property
    def host_bytes(self) -> int:
        """Host bytes of the cached host entries."""
        return sum(w.nbytes + s.nbytes for _, w, s in self._host.values())

    def _slot_for(self, keep: frozenset | set = frozenset()) -> int | None:
        """A free non-base slot, else the least recently used unpinned one not in ``keep`` (evicted), else None."""
        used = set(self.resident.values())
        free = next((s for s in range(1, self.slots) if s not in used), None)
        if free is not None:
            return free
        victim = next((n for n, s in self.resident.items() if self.pins[s] == 0 and n not in keep), None)
        return None if victim is None else self.resident.pop(victim)

    def _load(self, name: str, slot: int) -> None:
        self.host_entry(name)  # packed now (once), so flush only transfers
        self._pending[slot] = name
        self.resident[name] = slot

    def acquire(self, name: str | None) -> int | None:
        if name is None:
            return 0
        if name in self.resident:
            slot = self.resident[name]
            self.resident.move_to_end(name)
            self.pins[slot] += 1
            return slot
        self.check(self.store[name])
        free = self._slot_for()
        if free is None:
            return None
        self._load(name, free)
        self.pins[free] += 1
        return free

    def release(self, slot: int) -> None:
        if slot:
            if self.pins[slot] <= 0:
                raise ValueError(f"adapter slot {slot} is not pinned")
            self.pins[slot] -= 1

    def can_acquire(self, name: str | None) -> bool:
        """Whether `acquire` would succeed now (resident, a free slot, or an unpinned one to evict)."""
        if name is None or name in self.resident:
            return True
        return len(self.resident) < self.slots - 1 or any(self.pins[s] == 0 for s in self.resident.values())

    def prefetch(self, names: Iterable[str | None]) -> list[str]:
        """Start loading the adapters ``names`` (in order; None and resident ones skipped) into free slots or
        by evicting least recently used unpinned adapters not in ``names``, without pinning them; stops at
        the first that finds no slot. Never evicts a pinned adapter (one a running request uses). The
        writes are dispatched (`flush`), not waited for. Returns the names loaded."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        keep = set(wanted)
        loaded = []
        for name in wanted:
            if name in self.resident or name not in self.store:
                continue
            try:
                self.check(self.store[name])
            except ValueError:
                continue  # acquire raises it for the request that asks for it
            slot = self._slot_for(keep)
            if slot is None:
                break
            self._load(name, slot)
            loaded.append(name)
        self.prefetched += len(loaded)
        self.flush()
        return loaded

    def flush(self) -> None:
        """Write every queued load: one transfer of the host entries and one jitted write per ``max_loads``."""
        # a queued slot whose adapter was evicted or forgotten since is skipped (its new owner is queued)
        todo = [(s, n) for s, n in self._pending.items() if self.resident.get(n) == s]
        self._pending.clear()
        for c in range(0, len(todo), self.max_loads):
            chunk = todo[c : c + self.max_loads]
            entries = [self.host_entry(n) for _, n in chunk]
            dev_w = jax.device_put([w for w, _ in entries])  # the one transfer of the entries' weights
            slot_K = np.full((self.max_loads,), self.slots, np.int32)  # past the pool: dropped
            slot_K[: len(chunk)] = [s for s, _ in chunk]
            s_KxT = np.zeros((self.max_loads, len(self._layout)), np.float32)
            s_KxT[: len(chunk)] = [s for _, s in entries]
            # the padding repeats the first entry's device array (no copy; its writes are dropped)
            pad = dev_w[:1] * (self.max_loads - len(chunk))
            self._pool = self._write(self._pool, slot_K, tuple(dev_w + pad), s_KxT)
            self.loads += len(chunk)
            self.writes += 1

    def forget(self, name: str) -> None:
        """Drop adapter ``name`` from the pool (its slot is free) and its host entry; it must not be pinned."""
        slot = self.resident.get(name)
        if slot is not None and self.pins[slot]:
            raise ValueError(f"adapter {name!r} is pinned by {self.pins[slot]} running request(s)")
        self.resident.pop(name, None)
        self._host.pop(name, None)

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self._pool))
