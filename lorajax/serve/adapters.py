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
of a named adapter, loading it from the host store into the least recently used
free slot when it is not resident (S-LoRA's adapter paging); slots in use by a
running request are pinned.

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
import os
from pathlib import Path
from typing import Any

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


def _set_slot(pool: dict, slot: jax.Array, entry: dict) -> dict:
    return {
        m: {k: pool[m][k].at[slot].set(entry[m][k]) for k in pool[m]}  # one dynamic row per leaf
        for m in pool
    }


class DevicePool:
    """``slots`` device slots of stacked adapters (slot 0 = base), filled from an `AdapterStore` with LRU eviction.

    Args:
      store: the host store.
      slots: number of device slots including the base slot 0 (>= 2).
      shapes: ``{module name: (in, out)}`` of the Dense kernels that may be adapted.
      ranks: ``{module name: R}`` the pool's rank per target (adapters of larger rank are refused).
      dtype: dtype of A, B and gains on the device.

    ``pool`` is the device pytree ``{module: {"A": [slots, in, R], "B": [slots, R, out],
    "scale": [slots], "gain": [slots, out]}}``. ``acquire(name)`` pins and returns a
    slot (loading the adapter when it is not resident; ``None`` when every
    non-base slot is pinned); ``release(slot)`` unpins it. ``loads`` counts host
    → device copies.
    """

    def __init__(self, store: AdapterStore, slots: int, shapes: dict, ranks: dict, dtype: Any = jnp.float32):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 2:
            raise ValueError(f"slots must be an int >= 2 (slot 0 is the base model), got {slots!r}")
        self.store, self.slots, self.shapes, self.ranks = store, slots, dict(shapes), dict(ranks)
        self.pool = {
            m: {
                "A": jnp.zeros((slots, i, self.ranks[m]), dtype),
                "B": jnp.zeros((slots, self.ranks[m], o), dtype),
                "scale": jnp.zeros((slots,), jnp.float32),
                "gain": jnp.ones((slots, o), dtype),
            }
            for m, (i, o) in self.shapes.items()
        }
        self._set = jax.jit(_set_slot, donate_argnums=0)
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order, oldest first
        self.pins = [0] * slots
        self.loads = 0

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

    def _entry(self, adapter: ServingAdapter) -> dict:
        entry = {}
        for m, (i, o) in self.shapes.items():
            r = self.ranks[m]
            dt = self.pool[m]["A"].dtype
            a, b = np.zeros((i, r), np.float32), np.zeros((r, o), np.float32)
            scale, gain = 0.0, np.ones((o,), np.float32)
            e = adapter.targets.get(m)
            if e is not None:
                k = e["A"].shape[1]
                a[:, :k], b[:k, :], scale = e["A"], e["B"], e["scale"]
                if e["gain"] is not None:
                    gain = e["gain"]
            entry[m] = {
                "A": jnp.asarray(a, dt),
                "B": jnp.asarray(b, dt),
                "scale": jnp.float32(scale),
                "gain": jnp.asarray(gain, dt),
            }
        return entry

    def acquire(self, name: str | None) -> int | None:
        if name is None:
            return 0
        if name in self.resident:
            slot = self.resident[name]
            self.resident.move_to_end(name)
            self.pins[slot] += 1
            return slot
        adapter = self.store[name]
        self.check(adapter)
        used = set(self.resident.values())
        free = [s for s in range(1, self.slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((n for n, s in self.resident.items() if self.pins[s] == 0), None)
            if victim is None:
                return None
            slot = self.resident.pop(victim)
        self.pool = self._set(self.pool, jnp.int32(slot), self._entry(adapter))
        self.loads += 1
        self.resident[name] = slot
        self.pins[slot] += 1
        return slot

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

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.pool))
