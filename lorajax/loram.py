"""LoRAM: train LoRA on a structurally pruned Llama, then recover it to the full model ("train small, infer large").

Pipeline (pure functions over Flax params / adapters pytrees)::

    keep = select(cfg, params, mlp_ratio=0.5, head_ratio=0.5)   # which units every layer keeps
    small_cfg, small_params = prune(cfg, params, keep)            # a plain, smaller llama.Config
    ... train LoRA on llama.LlamaForCausalLM(small_cfg) ...
    adapters = recover(small_adapters, keep, cfg)                 # LoRA for the full model
    ... infer with the full model + adapters (lorajax.adapt / lorajax.merge) ...

Units (per decoder layer; Flax kernels ``[in, out]``, ``H`` query heads, ``K``
kv heads, ``G = H/K`` query heads per kv head, head dim ``d``, ``I`` MLP neurons):

* MLP neuron ``j``: column ``j`` of ``gate_proj`` and ``up_proj`` ``[D, I]``
  (and their bias entries), row ``j`` of ``down_proj`` ``[I, D]``.
* KV head ``h`` with its GQA group of query heads: columns ``[h·d, (h+1)·d)``
  of ``k_proj`` / ``v_proj`` ``[D, K·d]``, columns ``[h·G·d, (h+1)·G·d)`` of
  ``q_proj`` ``[D, H·d]``, rows ``[h·G·d, (h+1)·G·d)`` of ``o_proj``
  ``[H·d, D]`` (q/k/v biases follow their columns; ``o_proj`` / ``down_proj``
  biases are ``[D]`` and stay whole).

Every layer keeps the same counts, ``max(1, round((1 - ratio)·n))`` (Python's
``round``: half to even) of its ``n = I`` neurons and ``n = K`` kv heads, so
the pruned model is a plain `llama.Config` with ``intermediate_size = I'``,
``num_key_value_heads = K'``, ``num_attention_heads = K'·G`` and the same
``head_dim``; which units are kept differs per layer (`Keep`).

``criterion="magnitude"`` scores (the ``k`` highest scores are kept, ties to the
lower index):

* neuron ``j``: ``Σ gate[:, j]² + Σ up[:, j]² + Σ down[j, :]²`` (every kernel
  weight touching it; biases are not counted);
* kv head ``h``: ``Σ k[:, cols_h]² + Σ v[:, cols_h]² + Σ q[:, qcols_h]² +
  Σ o[qcols_h, :]²`` with ``cols_h = [h·d, (h+1)·d)`` and
  ``qcols_h = [h·G·d, (h+1)·G·d)``.

The paper takes the pruned index lists from external pruners (LLM-Pruner,
SparseGPT); any index lists can be given as a `Keep`.

Recovery (spec §13b; PyTorch ``lora_B [out, r]`` gets zero ROWS, ``lora_A
[r, in]`` zero COLUMNS; here the transposes): for modules whose outputs were
pruned (q/k/v: pruned heads; gate/up: pruned neurons) ``lora_B [r, out]`` gets
zero COLUMNS at the pruned outputs; for modules whose inputs were pruned
(o_proj, down_proj) ``lora_A [in, r]`` gets zero ROWS at the pruned inputs
(``norm_a=True``: ``N(0, (1/r)²)`` draws instead, the official ``normA``);
trained values stay at the kept indices. So with ``ΔW = s·A·B [in, out]``::

    ΔW_full[kept_in][:, kept_out] == ΔW_pruned
    ΔW_full[:, pruned_out] == 0          (q/k/v, gate/up)
    ΔW_full[pruned_in, :]  == 0          (o/down; zeroA only: normA makes these rows nonzero, acting on
                                          units the pruned model never had)

`prune_adapters` goes the other way (full-model adapters -> the pruned model's:
the kept columns of ``lora_B`` / rows of ``lora_A``), e.g. for LoRAPrune's final
physical pruning (`lorajax.loraprune`).

Example:
  >>> import jax, lorajax
  >>> from lorajax import loram
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
  ...                    num_attention_heads=4, num_key_value_heads=2)
  >>> params = llama.build(cfg).init(jax.random.key(0), *llama.example_inputs(cfg))["params"]
  >>> keep = loram.select(cfg, params, mlp_ratio=0.5, head_ratio=0.5)
  >>> small_cfg, small = loram.prune(cfg, params, keep)
  >>> small_cfg.intermediate_size, small_cfg.num_key_value_heads, small_cfg.num_attention_heads
  (12, 1, 2)
  >>> spec = lorajax.Spec("lora", rank=2, targets="all-linear")
  >>> adapters = loram.recover(lorajax.init(spec, small, jax.random.key(1)), keep, cfg)
  >>> adapters["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]["lora_A"].shape
  (24, 2)

References:
  J. Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for
  Large Language Models" (LoRAM), ICLR 2025, arXiv:2502.13533. Official code
  ``junzhang-zj/LoRAM``: ``loram/3_recovered_low_rank_matrix_generation.py``
  (recovery; ``normA`` there draws ``N(0, (1/8)²)`` with ``r = 8`` hard-coded:
  here the std is ``1/r``, equal to it at ``r = 8``). lorajax spec
  ``adapters.md`` §13b.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import atomic, paths, registry
from lorajax.jsonfile import read_object
from lorajax.plan import adapter_paths, nest
from lorajax.variants.base import SHARED_KEY

__all__ = [
    "CRITERIA",
    "Keep",
    "select",
    "prune",
    "recover",
    "prune_adapters",
    "pruned_config",
    "kept_columns",
    "neuron_scores",
    "kv_head_scores",
    "kept_count",
]

#: pruning criteria of `select`
CRITERIA = ("magnitude",)
#: ``(block, module) -> (pruned side, unit)``: which axis of a module's kernel loses units, and which units
#: (``"q"``: query columns of the kept kv heads' groups, ``"kv"``: kv head columns, ``"mlp"``: neurons)
MODULES = {
    ("self_attn", "q_proj"): ("out", "q"),
    ("self_attn", "k_proj"): ("out", "kv"),
    ("self_attn", "v_proj"): ("out", "kv"),
    ("self_attn", "o_proj"): ("in", "q"),
    ("mlp", "gate_proj"): ("out", "mlp"),
    ("mlp", "up_proj"): ("out", "mlp"),
    ("mlp", "down_proj"): ("in", "mlp"),
}
#: the leaves of the adapters `recover` handles (plain LoRA)
LORA_LEAVES = frozenset({"lora_A", "lora_B"})
#: the format tag of `Keep.to_json`
FORMAT = "lorajax.loram.Keep"


# ----------------------------------------------------------------------------- Keep


def _index_lists(value: Any, what: str) -> tuple[tuple[int, ...], ...]:
    """``value`` (per layer, a list of unit indices) as sorted tuples of ints; ValueError on duplicates etc."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"Keep.{what} must be a list (one entry per layer) of index lists, got {value!r}")
    out = []
    for layer, idx in enumerate(value):
        arr = np.asarray(idx)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"Keep.{what}[{layer}] must be a 1-D list of integer indices, got {idx!r}")
        if arr.size == 0:
            raise ValueError(f"Keep.{what}[{layer}] is empty: every layer keeps at least one unit")
        if arr.min() < 0:
            raise ValueError(f"Keep.{what}[{layer}] has a negative index {int(arr.min())}")
        uniq, repeats = np.unique(arr, return_counts=True)
        if len(uniq) != len(arr):
            raise ValueError(f"Keep.{what}[{layer}] repeats indices {uniq[repeats > 1].tolist()}")
        out.append(tuple(int(i) for i in uniq))
    counts = {len(x) for x in out}
    if len(counts) > 1:
        per_layer = [len(x) for x in out]
        raise ValueError(
            f"Keep.{what} keeps {per_layer} units per layer: every layer must keep the same number "
            "(the pruned model is one llama.Config)"
        )
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Keep:
    """The units each decoder layer keeps: ``mlp[i]`` neuron indices, ``kv_heads[i]`` kv head indices.

    Indices are into the FULL model (``0 <= j < I``, ``0 <= h < K``), sorted,
    without duplicates, the same count in every layer (checked on
    construction; the ranges against a config by `check`). Lists are
    normalised to sorted tuples of ints. Save it beside the pruned model
    (`save` / `load`): `recover` needs it.
    """

    mlp: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "mlp", _index_lists(self.mlp, "mlp"))
        object.__setattr__(self, "kv_heads", _index_lists(self.kv_heads, "kv_heads"))
        if len(self.mlp) != len(self.kv_heads):
            raise ValueError(
                f"Keep has {len(self.mlp)} layers of mlp indices but {len(self.kv_heads)} of kv_heads indices"
            )
        if not self.mlp:
            raise ValueError("Keep has no layers")

    @property
    def num_layers(self) -> int:
        return len(self.mlp)

    def check(self, cfg: Any) -> None:
        """Raise ValueError unless these lists fit ``cfg`` (the FULL model's `llama.Config`)."""
        if self.num_layers != cfg.num_hidden_layers:
            raise ValueError(f"Keep has {self.num_layers} layers, the model {cfg.num_hidden_layers}")
        for what, lists, n in (
            ("mlp", self.mlp, cfg.intermediate_size),
            ("kv_heads", self.kv_heads, cfg.num_key_value_heads),
        ):
            for layer, idx in enumerate(lists):
                if idx[-1] >= n:
                    raise ValueError(
                        f"Keep.{what}[{layer}] has index {idx[-1]} out of range for the model's {n} "
                        f"{'intermediate neurons' if what == 'mlp' else 'kv heads'} (valid: 0..{n - 1})"
                    )

    def to_json(self) -> dict:
        """``{"format", "layers": {"<i>": {"mlp": [...], "kv_heads": [...]}}}`` (JSON-ready)."""
        layers = {
            str(i): {"mlp": list(m), "kv_heads": list(h)} for i, (m, h) in enumerate(zip(self.mlp, self.kv_heads))
        }
        return {"format": FORMAT, "layers": layers}

    @classmethod
    def from_json(cls, data: dict) -> "Keep":
        """The `Keep` of `to_json`'s dict; ValueError for another layout."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
            raise ValueError(f"not a {FORMAT} dict (keys 'format' = {FORMAT!r} and 'layers'): {str(data)[:200]}")
        layers = data["layers"]
        want = [str(i) for i in range(len(layers))]
        if sorted(layers, key=lambda k: (len(k), k)) != want:
            raise ValueError(f"{FORMAT}: layers must be numbered 0..{len(layers) - 1}, got {sorted(layers)}")
        for k in want:
            if not isinstance(layers[k], dict) or set(layers[k]) != {"mlp", "kv_heads"}:
                raise ValueError(f"{FORMAT}: layer {k} must hold exactly 'mlp' and 'kv_heads' lists")
        return cls(
            mlp=tuple(tuple(layers[k]["mlp"]) for k in want), kv_heads=tuple(tuple(layers[k]["kv_heads"]) for k in want)
        )

    def save(self, path: str | Path) -> None:
        """Write `to_json` to ``path`` (atomically)."""
        atomic.write_text(Path(path), json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Keep":
        """The `Keep` saved at ``path``."""
        return cls.from_json(read_object(Path(path), " (write it with Keep.save)"))


# ----------------------------------------------------------------------------- selection


def _check_ratio(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of units pruned), got {value!r}")
    return float(value)


def kept_count(n: int, ratio: float) -> int:
    """Units kept of ``n`` when pruning ``ratio`` of them: ``max(1, round((1 - ratio)·n))``."""
    return max(1, int(round((1.0 - ratio) * n)))


def _layer(params: Any, i: int) -> dict:
    p = params["params"] if paths.is_variables(params) else params
    try:
        return p["model"]["layers"][str(i)]
    except (KeyError, TypeError):
        raise ValueError(
            f"params has no model.layers.{i}: LoRAM prunes lorajax.models.llama params (unscanned layout)"
        ) from None


def _sq(x: Any) -> np.ndarray:
    return np.square(np.asarray(x, np.float64))


def neuron_scores(layer: dict) -> np.ndarray:
    """``[I]``: ``Σ gate[:, j]² + Σ up[:, j]² + Σ down[j, :]²`` of one layer (gate/up ``[D, I]``, down ``[I, D]``)."""
    mlp = layer["mlp"]
    return (
        _sq(mlp["gate_proj"]["kernel"]).sum(0)
        + _sq(mlp["up_proj"]["kernel"]).sum(0)
        + _sq(mlp["down_proj"]["kernel"]).sum(1)
    )


def kv_head_scores(cfg: Any, layer: dict) -> np.ndarray:
    """``[K]``: squared kernel weights of each kv head's k/v columns, its query group's q columns and o rows."""
    K, d = cfg.num_key_value_heads, cfg.head_dim
    G = cfg.num_attention_heads // K
    attn = layer["self_attn"]
    kv = (_sq(attn["k_proj"]["kernel"]).sum(0) + _sq(attn["v_proj"]["kernel"]).sum(0)).reshape(K, d).sum(1)
    q = _sq(attn["q_proj"]["kernel"]).sum(0).reshape(K, G * d).sum(1)
    o = _sq(attn["o_proj"]["kernel"]).sum(1).reshape(K, G * d).sum(1)
    return kv + q + o


def _top(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """The sorted indices of the ``k`` highest scores (ties: the lower index first)."""
    return tuple(sorted(int(i) for i in np.argsort(-scores, kind="stable")[:k]))


def select(cfg: Any, params: Any, *, mlp_ratio: float, head_ratio: float, criterion: str = "magnitude") -> Keep:
    """The `Keep` of each layer's highest-scoring units (see the module doc for the counts and scores).

    Args:
      cfg: the model's `llama.Config`.
      params: its params (or ``{"params": ...}``), ``model.layers.<i>`` per layer.
      mlp_ratio: fraction of the ``I`` intermediate neurons pruned per layer, in [0, 1).
      head_ratio: fraction of the ``K`` kv heads (each with its ``G`` query heads) pruned per layer, in [0, 1).
      criterion: one of `CRITERIA`.
    """
    mlp_ratio = _check_ratio("mlp_ratio", mlp_ratio)
    head_ratio = _check_ratio("head_ratio", head_ratio)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is unknown; choose one of {list(CRITERIA)}")
    n_mlp = kept_count(cfg.intermediate_size, mlp_ratio)
    n_kv = kept_count(cfg.num_key_value_heads, head_ratio)
    layers = [_layer(params, i) for i in range(cfg.num_hidden_layers)]
    return Keep(
        mlp=tuple(_top(neuron_scores(layer), n_mlp) for layer in layers),
        kv_heads=tuple(_top(kv_head_scores(cfg, layer), n_kv) for layer in layers),
    )


# ----------------------------------------------------------------------------- pruning


def pruned_config(cfg: Any, keep: Keep) -> Any:
    """The `llama.Config` of the pruned model: ``I'`` neurons, ``K'`` kv heads, ``K'·G`` query heads, same head_dim."""
    keep.check(cfg)
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    n_kv = len(keep.kv_heads[0])
    return dataclasses.replace(
        cfg,
        intermediate_size=len(keep.mlp[0]),
        num_key_value_heads=n_kv,
        num_attention_heads=n_kv * G,
        head_dim=cfg.head_dim,
    )


def kept_columns(cfg: Any, keep: Keep, layer: int) -> dict[str, np.ndarray]:
    """Full-model indices kept in ``layer`` (int32): ``"mlp" [I']`` neurons, ``"kv" [K'·d]`` k/v columns,
    ``"q" [K'·G·d]`` q columns = o_proj rows (kv head ``h`` -> ``[h·G·d, (h+1)·G·d)``)."""
    d = cfg.head_dim
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    heads = np.asarray(keep.kv_heads[layer], np.int64)

    def expand(width: int) -> np.ndarray:
        return (heads[:, None] * width + np.arange(width)[None, :]).reshape(-1).astype(np.int32)

    return {"mlp": np.asarray(keep.mlp[layer], np.int32), "kv": expand(d), "q": expand(G * d)}


def _slice_module(module: dict, side: str, idx: np.ndarray) -> dict:
    """A Dense's params with ``kernel [in, out]`` cut to ``idx`` on ``side`` (an output cut also cuts ``bias``)."""
    out = dict(module)
    out["kernel"] = jnp.take(module["kernel"], idx, axis=1 if side == "out" else 0)
    if side == "out" and "bias" in module:
        out["bias"] = jnp.take(module["bias"], idx, axis=0)
    return out


def prune(cfg: Any, params: Any, keep: Keep) -> tuple[Any, Any]:
    """``(pruned_cfg, pruned_params)``: each layer's q/k/v/o and gate/up/down cut to ``keep``'s units.

    ``params`` (bare or ``{"params": ...}``, returned the same way) is not
    modified; embeddings, norms and the output head are shared with it. The
    result runs with ``llama.LlamaForCausalLM(pruned_cfg)``. Kernels: q ``[D, K'·G·d]``,
    k/v ``[D, K'·d]``, o ``[K'·G·d, D]``, gate/up ``[D, I']``, down ``[I', D]``.
    """
    small_cfg = pruned_config(cfg, keep)
    wrapped = paths.is_variables(params)
    p = params["params"] if wrapped else params
    layers = dict(p["model"]["layers"])
    for i in range(cfg.num_hidden_layers):
        layer = _layer(p, i)
        cols = kept_columns(cfg, keep, i)
        new = dict(layer)
        for block in ("self_attn", "mlp"):
            new[block] = dict(layer[block])
        for (block, name), (side, unit) in MODULES.items():
            new[block][name] = _slice_module(layer[block][name], side, cols[unit])
        layers[str(i)] = new
    pruned = {**p, "model": {**p["model"], "layers": layers}}
    return small_cfg, ({**params, "params": pruned} if wrapped else pruned)


# ----------------------------------------------------------------------------- recovery


def _module_of(keys: tuple) -> tuple[int, str, str] | None:
    """``(layer, block, module)`` of an adapter path ending in ``model.layers.<i>.<block>.<module>.kernel``."""
    if len(keys) < 6 or keys[-1] != "kernel" or keys[-6:-4] != ("model", "layers"):
        return None
    if (keys[-3], keys[-2]) not in MODULES or not str(keys[-4]).isdigit():
        return None
    return int(keys[-4]), keys[-3], keys[-2]


def _reinsert(x: jax.Array, axis: int, kept: np.ndarray, n: int, fill: jax.Array | None, where: str) -> jax.Array:
    """``x`` with its ``axis`` grown to ``n``: ``x`` at ``kept``, ``fill`` (or zeros) elsewhere.

    Built on the host (numpy): adapters are small, and eager device ops would compile once per shape.
    """
    if x.shape[axis] != len(kept):
        raise ValueError(
            f"adapter at {where} has {x.shape[axis]} entries on axis {axis} of shape {tuple(x.shape)}, but the Keep "
            f"keeps {len(kept)} units there: were these adapters trained on the model pruned with this Keep?"
        )
    shape = list(x.shape)
    shape[axis] = n
    host = np.asarray(x)
    out = np.zeros(shape, host.dtype) if fill is None else np.array(fill, dtype=host.dtype)
    out[(slice(None),) * axis + (kept,)] = host
    return jnp.asarray(out)


def recover(
    adapters: Any,
    keep: Keep,
    cfg: Any,
    *,
    norm_a: bool = False,
    key: jax.Array | None = None,
    rank: int | None = None,
    spec: Any = None,
) -> Any:
    """The LoRA adapters of the FULL model (config ``cfg``) from ones trained on the model pruned with ``keep``.

    q/k/v and gate/up: ``lora_B [r, out']`` -> ``[r, out]`` with zero columns at
    the pruned outputs. o/down: ``lora_A [in', r]`` -> ``[in, r]`` with zero rows
    at the pruned inputs, or with ``norm_a=True`` rows drawn from
    ``N(0, (1/r)²)`` (``r``: ``rank`` if given, else each adapter's own rank;
    the official ``normA`` uses std ``1/8`` with ``r = 8`` hard-coded, the same
    at ``r = 8``), one key per module folded from ``key`` (required then).
    Trained values stay at the kept indices; adapters on other weights (e.g.
    ``lm_head``) are returned as they are. ``adapters`` may be rooted at the
    params or at ``{"params": ...}`` (as `lorajax.init` made them).

    Raises:
      NotImplementedError: adapters that are not plain LoRA (leaves other than
        ``lora_A`` / ``lora_B``, shared state, or a ``spec.variant`` that is not
        plain LoRA, `lorajax.registry.plain_lora`; truncate a DyLoRA adapter to
        its rank first).
      ValueError: ``keep`` does not fit ``cfg``, or an adapter's size does not
        match ``keep`` (adapters of another pruning).
    """
    modules = _lora_modules(adapters, keep, cfg, spec, "LoRAM recovery")
    if norm_a and key is None:
        raise ValueError("recover(norm_a=True) draws the re-inserted lora_A rows: pass key=jax.random.key(...)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int (the r of normA's std 1/r) or None, got {rank!r}")
    out = {}
    for n, (keys, adapter, module) in enumerate(modules):
        if module is None:
            out[keys] = adapter
            continue
        where, side, kept, full = module
        a, b = adapter["lora_A"], adapter["lora_B"]
        if side == "out":
            b = _reinsert(b, 1, kept, full, None, where + ".lora_B")
        else:
            fill = None
            if norm_a and key is not None:  # (norm_a without a key was refused above)
                r = rank if rank is not None else a.shape[1]
                fill = jax.random.normal(jax.random.fold_in(key, n), (full, a.shape[1]), jnp.float32) / r
            a = _reinsert(a, 0, kept, full, fill, where + ".lora_A")
        out[keys] = {"lora_A": a, "lora_B": b}
    return nest(out)


def prune_adapters(adapters: Any, keep: Keep, cfg: Any, *, spec: Any = None) -> Any:
    """The LoRA adapters of the model pruned with ``keep`` from ones of the FULL model (the inverse of `recover`).

    q/k/v and gate/up: ``lora_B [r, out]`` -> ``[r, out']``, the kept output
    columns; o/down: ``lora_A [in, r]`` -> ``[in', r]``, the kept input rows
    (PyTorch: rows of ``lora_B [out, r]`` / columns of ``lora_A [r, in]``, as
    LoRAPrune's ``prune_fp16_module`` cuts them). So with ``ΔW = s·A·B``::

        ΔW_pruned == ΔW_full[kept_in][:, kept_out]      (the update of the weights `prune` keeps)

    and ``prune_adapters(recover(a, keep, cfg), keep, cfg) == a``. Adapters on
    other weights (e.g. ``lm_head``) are returned as they are; ``adapters`` may be
    rooted at the params or at ``{"params": ...}``.

    Raises:
      NotImplementedError: adapters that are not plain LoRA (see `recover`).
      ValueError: ``keep`` does not fit ``cfg``, or an adapter's size is not the full model's.
    """
    out = {}
    for keys, adapter, module in _lora_modules(adapters, keep, cfg, spec, "prune_adapters"):
        if module is None:
            out[keys] = adapter
            continue
        where, side, kept, full = module
        leaf, axis = ("lora_B", 1) if side == "out" else ("lora_A", 0)
        x = adapter[leaf]
        if x.shape[axis] != full:
            raise ValueError(
                f"adapter at {where}.{leaf} has {x.shape[axis]} entries on axis {axis} of shape {tuple(x.shape)}, but "
                f"the full model has {full} there: prune_adapters takes adapters of the full (unpruned) model"
            )
        out[keys] = {**adapter, leaf: jnp.take(x, jnp.asarray(kept), axis=axis)}
    return nest(out)


def _lora_modules(adapters: Any, keep: Keep, cfg: Any, spec: Any, who: str) -> list[tuple]:
    """Checked ``[(keys, adapter, module)]`` of `recover` / `prune_adapters`: ``module`` is None for an adapter
    on a weight the pruning does not touch (e.g. ``lm_head``), else ``(where, side, kept, full)``: its dotted
    path, the pruned side of its kernel (``"out"`` / ``"in"``), the kept full-model indices on that side and
    the full model's size there.

    Raises NotImplementedError for adapters that are not plain LoRA, ValueError when ``keep`` does not fit
    ``cfg`` or an adapter sits in a layer ``keep`` does not have."""
    keep.check(cfg)
    _check_plain(spec, who)
    if isinstance(adapters, dict) and SHARED_KEY in adapters:
        raise NotImplementedError(
            f"{who} handles plain LoRA adapters; these carry shared state ({SHARED_KEY!r}), "
            f"as VeRA-like variants do{_variant(spec)}"
        )
    out: list[tuple] = []
    for keys, adapter in adapter_paths(adapters).items():
        where = ".".join(keys)
        if set(adapter) != LORA_LEAVES:
            raise NotImplementedError(
                f"{who} handles plain LoRA adapters (leaves {sorted(LORA_LEAVES)}); the adapter at {where} "
                f"has {sorted(adapter)}{_variant(spec)}"
            )
        found = _module_of(keys)
        if found is None:
            out.append((keys, adapter, None))
            continue
        layer, block, name = found
        if layer >= keep.num_layers:
            raise ValueError(f"adapter at {where} is in layer {layer}; the Keep has {keep.num_layers} layers")
        side, unit = MODULES[(block, name)]
        module = (where, side, kept_columns(cfg, keep, layer)[unit], _full_size(cfg, unit))
        out.append((keys, adapter, module))
    return out


def _check_plain(spec: Any, who: str) -> None:
    """``spec``'s adapters are plain LoRA (declared by the variant, `lorajax.registry.plain_lora`), else
    NotImplementedError; None: not checked here (the leaves are)."""
    if spec is None:
        return
    try:
        registry.plain_lora(spec.variant, who)
    except ValueError as e:
        raise NotImplementedError(str(e)) from None


def _variant(spec: Any) -> str:
    return f" (variant {spec.variant!r})" if spec is not None else ""


def _full_size(cfg: Any, unit: str) -> int:
    """The full model's width of ``unit``: ``I``, ``K·d`` or ``H·d``."""
    if unit == "mlp":
        return cfg.intermediate_size
    heads = cfg.num_key_value_heads if unit == "kv" else cfg.num_attention_heads
    return heads * cfg.head_dim
