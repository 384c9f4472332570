"""Hugging Face PEFT adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

`load(adapter_dir, params) -> (spec, adapters)` reads every PEFT format that a
registered variant declares (``Variant(peft=PeftFormat(...))``: today PEFT's
LoRA (with ``use_rslora``, ``use_dora``, ``rank_pattern``, ``alpha_pattern``),
VeRA, MiSS (and the older Bone), SHiRA, RandLoRA and Uni-LoRA), with the
selection fields ``layers_to_transform``, ``layers_pattern``,
``exclude_modules``, ``target_modules`` as list, regex or ``"all-linear"``,
and frozen buffers included (projections, indices). A field that would change
the maths and that lorajax does not implement (``lora_bias``,
``modules_to_save``, ``layer_replication``, ``use_qalora``, ...) raises:
never a silent difference. `save(adapter_dir, spec, adapters, params)` writes
files that ``peft.PeftModel.from_pretrained`` loads.

Nothing here knows a variant by name. A variant's `PeftFormat` declares its
``peft_types``, the config ``fields`` it reads, ``accepts(config)`` where two
variants share a type (LoRA / DoRA: ``use_dora``), ``from_config(config,
common, options)`` and ``to_config(spec, targets)``, its per-target
``tensors`` and model-level ``shared`` tensors (name and transpose),
``duplicates`` (shared tensors PEFT also writes per module), ``shared_fits``
(shared tensors that may be larger than needed: VeRA) and ``load_extra`` /
``save_extra`` for formats that keep more than tensors (Uni-LoRA's indices).
`spec_from_config` picks the one registered variant whose format accepts the
config. ``options`` handed to the hooks: ``module_order`` (``unilora_order``:
the torch registration order of the adapted modules, for formats laid out in
it), ``tensor_names`` (the file's tensor names; empty without a file) and
``dtype``.

Uni-LoRA: PEFT lays the factors of all targets out in the torch module
registration order and, unless saved with ``save_indices=True``, stores only
``θ_d`` and re-derives the indices from that order, which a Flax params tree
does not carry. `load` imports saved indices when the file has them;
otherwise it regenerates them in the order given by ``unilora_order`` (module
name suffixes in registration order; default `TORCH_MODULE_ORDER`, the
order of Hugging Face's Llama- and BERT-style layers) and raises if a target
matches none. `save` always writes the indices (``save_indices=True``).

Names: a lorajax module name (the params path joined by dots, e.g.
``model.layers.0.self_attn.q_proj`` for `lorajax.models` built from HF
checkpoints) is PEFT's module name; tensors are stored as
``base_model.model.<name>.lora_A.weight`` etc. Orientation: PEFT's
``lora_A.weight: [r, in]`` and ``lora_B.weight: [out, r]`` are the transposes
of lorajax's ``lora_A: [in, r]`` and ``lora_B: [r, out]``; VeRA's
``base_model.vera_A: [r, in_max]`` / ``vera_B: [out_max, r]`` likewise.

`save` writes ``target_modules`` as the explicit list of adapted module names
(and per-module ``rank_pattern`` / ``alpha_pattern`` where they differ from
the defaults), so PEFT selects exactly the weights lorajax adapted whatever
the selection grammar was.

Base-shifting initialisers: an adapter saved by PEFT with ``init_lora_weights="pissa"`` or ``"olora"`` (not
converted to a plain LoRA) belongs to the residual base ``W − s·B₀A₀`` that the initialiser made from the
original weights, and PEFT's loader rebuilds that base when it loads it. `load` refuses such a folder (it
returns adapters only) and `load_with_base` returns ``(spec, adapters, params)`` with the residual base
rebuilt the same way (PiSSA's full SVD, OLoRA's QR: deterministic, `lorajax.inits`). Initialisers whose base
cannot be rebuilt here raise: ``pissa_niter_K`` (a randomised SVD drawn from torch's RNG: PEFT's own loader
gives a different base each time), ``lora_ga`` and ``corda`` (data-dependent shifts), ``loftq`` (a quantised
base). ``True``, ``False``, ``"gaussian"``, ``"eva"``, ``"orthogonal"`` and ``"mica"`` leave the base as it is.

Embedding and conv layers (plain LoRA; `lorajax.layer_kinds`): a targeted ``embedding`` table is stored as
PEFT's ``lora_embedding_A: [r, V]`` / ``lora_embedding_B: [d, r]``, a conv kernel (``>= 3`` axes viewed with
``in_axes = ndim - 1``) as ``lora_A.weight: [r, in, *k]`` / ``lora_B.weight: [out, r, 1, …]``. `load` views each
N-D kernel whose file holds a conv-shaped ``lora_A.weight`` as a conv (sets ``in_axes``); other variants on
such layers raise.

Only safetensors and JSON are read; pickles (``adapter_model.bin``) are refused.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax
from safetensors import SafetensorError

from lorajax import adapters as adapters_lib
from lorajax import atomic, layer_kinds, registry
from lorajax import targets as targets_lib
from lorajax.jsonfile import read_object
from lorajax.plan import nest
from lorajax.spec import Spec
from lorajax.variants.base import SHARED_KEY, PeftFormat, Variant

__all__ = ["load", "load_with_base", "save", "spec_from_config", "config_from_spec", "TORCH_MODULE_ORDER"]

#: Registration order of the linear layers in Hugging Face's Llama- and
#: BERT-style blocks (PEFT's ``model.modules()`` order within a layer). BERT's
#: ``attention.output.dense`` precedes ``intermediate.dense`` and ``output.dense``.
TORCH_MODULE_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Fields that only describe the file, training-time behaviour, or defaults with no effect on the maths.
_IGNORED = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "init_lora_weights",
    "init_weights",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "ensure_weight_tying",
    "fan_in_fan_out",
    "save_projection",
    "random_seed",
    "save_indices",
    "lora_ga_config",
    "corda_config",
    "eva_config",  # describe the init only (the base it expects: see the warning)
}
_SELECTION = {"peft_type", "r", "target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "bias"}
# ``init_lora_weights`` values that leave the base as it is (PEFT's loader changes nothing either)
_PLAIN_INITS = (True, False, "gaussian", None, "eva", "orthogonal", "mica")
# initialisers whose adapter is a delta on the residual base they produced, rebuilt by `load_with_base`
_SHIFTING_INITS = ("pissa", "olora")
# initialisers whose shifted base cannot be rebuilt here, and why
_UNREPRODUCIBLE_INITS = {
    "pissa_niter_": "a randomised SVD drawn from torch's RNG (PEFT's own loader rebuilds a different base)",
    "lora_ga": "a shift computed from gradients on training data",
    "corda": "a shift computed from activations on training data",
    "loftq": "a LoftQ-quantised base",
}


def _peft_variants() -> list[Variant]:
    """The registered variants that declare a PEFT format, aliases once, sorted by name."""
    return [registry.get(name) for name in registry.with_capability("peft")]


def _peft_formats() -> list[tuple[str, PeftFormat]]:
    """``(name, format)`` of each registered variant that declares a PEFT format, sorted by name."""
    return [(v.name, v.peft) for v in _peft_variants() if v.peft is not None]


def _format_of(variant: str) -> PeftFormat:
    """The `PeftFormat` of ``variant`` (aliases share their variant's format); else a ValueError."""
    fmt = registry.get(variant).peft
    if fmt is None:
        raise _no_format(variant)
    return fmt


def _transform(arr: Any, kind: str | None) -> Any:
    if kind == "T":
        return arr.T
    if kind == "swap":
        return arr[::-1]
    return arr


def _read_config(adapter_dir: Path) -> dict:
    return read_object(adapter_dir / CONFIG_NAME, f" (a PEFT adapter folder has {CONFIG_NAME} and {WEIGHTS_NAME})")


def _is_default(value: Any) -> bool:
    return value in (None, False, 0, "none", "", {}, [])


def _effective_targets(target_modules: Any, params: Any) -> Any:
    """PEFT semantics: a list matches if any entry matches; drop entries this model lacks."""
    if isinstance(target_modules, str) or target_modules is None:
        return target_modules
    names = [targets_lib.module_name(k) for k, _ in targets_lib.weight_leaves(params)]
    kept = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not kept:
        raise ValueError(
            f"target_modules {sorted(target_modules)} match no weight of params; weights found: {names[:8]}..."
        )
    return kept


def _format_for(config: dict) -> PeftFormat:
    """The `PeftFormat` of the one registered variant that reads ``config``."""
    peft_type = config.get("peft_type")
    formats = _peft_formats()
    of_type = [(name, f) for name, f in formats if peft_type in f.peft_types]
    if not of_type:
        types = sorted({t for _, f in formats for t in f.peft_types})
        raise ValueError(f"unsupported peft_type {peft_type!r}: lorajax.peft reads {types} adapters")
    accepted = [(name, f) for name, f in of_type if f.accepts is None or f.accepts(config)]
    if len(accepted) != 1:
        names = [name for name, _ in (accepted or of_type)]
        what = "several variants accept" if accepted else "no variant accepts"
        raise ValueError(f"{what} this {peft_type} config (variants of {peft_type}: {names})")
    return accepted[0][1]


def spec_from_config(config: dict, params: Any | None = None, *, unilora_order: Any = TORCH_MODULE_ORDER) -> Spec:
    """A `Spec` equal in meaning to a PEFT ``adapter_config.json`` dict.

    ``unilora_order`` is the torch registration order of the adapted modules
    for formats laid out in it (a Uni-LoRA Spec's ``target_order``).

    Raises ValueError for an unsupported PEFT type or a field that lorajax
    does not implement with a non-default value.
    """
    return _spec_from_config(config, params, {"module_order": unilora_order, "tensor_names": (), "dtype": None})


def _spec_from_config(config: dict, params: Any | None, options: dict) -> Spec:
    fmt = _format_for(config)
    if fmt.from_config is None:
        raise ValueError(f"the PEFT format of {config.get('peft_type')!r} declares no from_config: it cannot be read")
    used = _SELECTION | fmt.fields | set(fmt.dropout)
    for key, value in config.items():
        if key in used or key in _IGNORED or _is_default(value):
            continue
        raise ValueError(f"unsupported PEFT field {key}={value!r}: lorajax would compute something different")
    if config.get("bias", "none") != "none":
        raise ValueError(f"unsupported PEFT field bias={config['bias']!r}: only 'none' is supported")
    if config.get("target_modules") is None:
        raise ValueError("adapter_config.json has no target_modules (target_parameters is not supported)")
    _check_init(config.get("init_lora_weights"))
    targets = config["target_modules"]
    if params is not None:
        targets = _effective_targets(targets, params)
    common = dict(
        rank=int(config["r"]),
        targets=targets,
        exclude=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
    )
    spec = fmt.from_config(config, common, options)
    rate = next((config[k] for k in fmt.dropout if config.get(k) is not None), 0.0)
    return spec.replace(dropout=float(rate)) if rate else spec


def _read_tensors(path: Path) -> dict:
    if not path.exists():
        bin_path = path.with_name("adapter_model.bin")
        hint = (
            f" ({bin_path.name} exists, but pickles are never loaded: convert it to safetensors)"
            if bin_path.exists()
            else ""
        )
        raise FileNotFoundError(f"{path} not found{hint}")
    try:
        return safetensors.flax.load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or malformed?): {e}") from e


def _check_finite(tensors: dict, path: Path) -> None:
    """Raise ValueError naming the first tensor of ``tensors`` (read from ``path``) that holds NaN or Inf.

    One ``np.isfinite(...).all()`` per floating tensor, on the host; integer
    tensors (indices) are skipped.
    """
    for name, arr in tensors.items():
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            continue
        host = np.asarray(arr)
        if np.isfinite(host).all():
            continue
        finite = np.isfinite(host)
        bad = int(finite.size - np.count_nonzero(finite))
        nan = int(np.count_nonzero(np.isnan(host)))
        raise ValueError(
            f"{path}: tensor {name!r} has {bad} non-finite values of {host.size} ({nan} NaN, {bad - nan} Inf): "
            "a diverged or corrupted adapter; pass allow_nonfinite=True to load it anyway"
        )


def read_tensor(tensors: dict, name: str, where: str, like: Any, kind: str | None) -> Any:
    """Take tensor ``name`` out of ``tensors``, transformed (``kind``) and checked against ``like``'s shape/dtype.

    ``where`` names the adapter entry in errors. Used by `load` and by formats' ``load_extra`` hooks.
    """
    arr = tensors.pop(name, None)
    if arr is None:
        raise ValueError(f"adapter file lacks tensor {name!r} (needed for {where})")
    arr = _transform(arr, kind)
    if arr.shape != like.shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(_transform(arr, kind).shape)}, "
            f"expected {tuple(_transform(jnp.zeros(like.shape), kind).shape)}"
        )
    if jnp.issubdtype(like.dtype, jnp.integer) and not bool(jnp.all(arr == jnp.round(arr))):
        raise ValueError(f"tensor {name!r} must hold integers")
    return jnp.asarray(arr, dtype=like.dtype)


def _check_init(init: Any) -> None:
    """Raise for an ``init_lora_weights`` whose base lorajax cannot rebuild (see the module docstring)."""
    if any(init == p and type(init) is type(p) for p in _PLAIN_INITS) or init in _SHIFTING_INITS:
        return
    why = next((v for k, v in _UNREPRODUCIBLE_INITS.items() if isinstance(init, str) and init.startswith(k)), None)
    what = f"its base was shifted by {why}, which lorajax cannot rebuild" if why else "an unknown initialiser"
    raise ValueError(
        f"adapter made with init_lora_weights={init!r}: {what}. Convert it to a plain LoRA on the original base in "
        "PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>)), or set "
        "init_lora_weights to true in adapter_config.json if params already are the base it was trained on"
    )


def load(
    adapter_dir: str | os.PathLike,
    params: Any,
    *,
    dtype: Any = None,
    unilora_order: Any = TORCH_MODULE_ORDER,
    allow_nonfinite: bool = False,
) -> tuple[Spec, dict]:
    """Read a PEFT adapter folder into ``(spec, adapters)`` for ``params``.

    Args:
      adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base params the adapter is for (HF-named, e.g. from
        `lorajax.models.from_pretrained`).
      dtype: adapter dtype (default float32, or the weight's if wider).
      unilora_order: for Uni-LoRA files saved without indices: the torch
        registration order of the adapted modules (name suffixes, see
        `TORCH_MODULE_ORDER`); ignored when the file has the indices.
      allow_nonfinite: load tensors holding NaN or Inf (default: refuse them).

    Raises:
      FileNotFoundError / ValueError naming the missing file, the missing,
      unknown, wrongly shaped or non-finite tensor, or the unsupported config field;
      ValueError for an adapter made on a shifted base (``init_lora_weights="pissa"`` /
      ``"olora"``: use `load_with_base`; others: see the module docstring).
    """
    spec, adapters, init = _load(adapter_dir, params, dtype, unilora_order, allow_nonfinite)
    if init in _SHIFTING_INITS:
        raise ValueError(
            f"{Path(adapter_dir) / CONFIG_NAME}: init_lora_weights={init!r}, so these adapters belong to the residual "
            f"base that {init} made from params, not to params: use lorajax.peft.load_with_base(adapter_dir, params) "
            "-> (spec, adapters, residual_params), as PEFT's loader rebuilds that base"
        )
    return spec, adapters


def load_with_base(
    adapter_dir: str | os.PathLike,
    params: Any,
    *,
    dtype: Any = None,
    unilora_order: Any = TORCH_MODULE_ORDER,
    allow_nonfinite: bool = False,
) -> tuple[Spec, dict, Any]:
    """`load`, plus the base the adapters belong to: ``(spec, adapters, base_params)``.

    For ``init_lora_weights="pissa"`` / ``"olora"`` (saved unconverted) the base is
    rebuilt from ``params`` as PEFT's loader does: ``W − s·B₀A₀`` with PiSSA's top-r
    SVD factors (full SVD) or OLoRA's first r QR factors of each targeted weight
    (`lorajax.inits.pissa` / `olora`, PEFT-checked); for every other accepted
    initialiser ``base_params`` is ``params`` itself. Arguments and errors as `load`.
    """
    spec, adapters, init = _load(adapter_dir, params, dtype, unilora_order, allow_nonfinite)
    if init not in _SHIFTING_INITS:
        return spec, adapters, params
    from lorajax import inits  # the initialisers import this module's neighbours; import on use

    lora_spec = spec.replace(variant="lora", use_rslora=spec.options["use_rslora"])  # DoRA's A, B: LoRA's init
    _, base = inits.pissa(lora_spec, params) if init == "pissa" else inits.olora(lora_spec, params)
    return spec, adapters, base


def _load(adapter_dir, params, dtype, unilora_order, allow_nonfinite) -> tuple[Spec, dict, Any]:
    """``(spec, adapters, init_lora_weights)`` of a PEFT folder (see `load`)."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    tensors = _read_tensors(adapter_dir / WEIGHTS_NAME)
    if not allow_nonfinite:
        _check_finite(tensors, adapter_dir / WEIGHTS_NAME)
    options = {"module_order": unilora_order, "tensor_names": tuple(tensors), "dtype": dtype}
    spec = _spec_from_config(config, params, options)
    if dtype is not None:
        spec = spec.replace(dtype=jnp.dtype(dtype).name)
    spec = _with_conv_in_axes(spec, params, tensors)
    fmt, variant = _format_of(spec.variant), registry.get(spec.variant)
    selected = targets_lib.select(spec, params)
    layer_kinds.check_peft(variant, selected)
    template = functools.partial(adapters_lib.init, spec, params, 0)
    if fmt.load_extra is not None:
        out = fmt.load_extra(spec, params, selected, tensors, template, options)
    else:
        out = _load_tensors(fmt, selected, tensors, template(), variant)
    if tensors:
        extra = sorted(tensors)
        raise ValueError(
            f"adapter file has {len(extra)} tensors lorajax did not expect, e.g. {extra[:3]} "
            "(does adapter_config.json match these weights, and params this model?)"
        )
    return spec, out, config.get("init_lora_weights")


def _with_conv_in_axes(spec: Spec, params: Any, tensors: dict) -> Spec:
    """``spec`` with ``in_axes = ndim - 1`` for each N-D kernel whose ``lora_A.weight`` in ``tensors`` is a conv's
    ``[r, in, *k]`` (PEFT's conv LoRA: the kernel viewed as ``[prod(k)·in, out]``, see `lorajax.layer_kinds`)."""
    conv = {}
    for keys, leaf in targets_lib.weight_leaves(params):
        name, ndim = targets_lib.module_name(keys), getattr(leaf, "ndim", 0)
        if ndim >= 3 and getattr(tensors.get(f"{PREFIX}{name}.lora_A.weight"), "ndim", 0) == ndim:
            conv[re.escape(name)] = ndim - 1
    return spec.replace(in_axes=conv) if conv and spec.in_axes == 1 else spec


def _read_layer_tensor(tensors: dict, name: str, t: Any, entry: str, side: str, like: Any) -> Any:
    """`read_tensor` for an embedding / conv target: PEFT's layout converted by `lorajax.layer_kinds.from_peft`."""
    arr = tensors.pop(name, None)
    if arr is None:
        raise ValueError(f"adapter file lacks tensor {name!r} (needed for {t.name}/{entry})")
    want = layer_kinds.peft_shape(like.shape, side, t)
    if tuple(arr.shape) != want:
        raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {want}")
    return jnp.asarray(layer_kinds.from_peft(np.asarray(arr), side, t), dtype=like.dtype)  # host-side layout


def _layer_tensors(variant: Variant | None, t: Any) -> list | None:
    """``[(entry, PEFT suffix, side)]`` of an embedding / conv target (`lorajax.layer_kinds`); None for a linear one."""
    if variant is None or layer_kinds.layer_kind(t) == "linear":
        return None
    return [(entry, suffix, side) for (entry, suffix), side in zip(layer_kinds.peft_tensors(variant, t), "ab")]


def _load_tensors(
    fmt: PeftFormat, selected: list, tensors: dict, template: dict, variant: Variant | None = None
) -> dict:
    """The declared per-target and shared tensors of ``fmt``, shaped as ``template``; taken out of ``tensors``.

    ``variant``: the spec's variant, for embedding / conv targets in PEFT's layouts (`lorajax.layer_kinds`).
    """
    flat = {}
    for t in selected:
        node = template
        for k in t.keys:
            node = node[k]
        special = _layer_tensors(variant, t)
        if special is not None:
            flat[t.keys] = {
                entry: _read_layer_tensor(tensors, f"{PREFIX}{t.name}.{suffix}", t, entry, side, node[entry])
                for entry, suffix, side in special
            }
            continue
        flat[t.keys] = {
            entry: read_tensor(tensors, f"{PREFIX}{t.name}.{suffix}", f"{t.name}/{entry}", node[entry], kind)
            for entry, suffix, kind in fmt.tensors
        }
    out = nest(flat)
    for entry in fmt.duplicates:
        for t in selected:
            tensors.pop(f"{PREFIX}{t.name}.{entry}", None)
    if fmt.shared:
        shared = {}
        for entry, name, kind in fmt.shared:
            arr = tensors.pop(name, None)
            if arr is None:
                raise ValueError(f"adapter file lacks {name!r}: save the PEFT adapter with save_projection=True")
            like = template[SHARED_KEY][entry]
            arr = _transform(arr, kind)
            fits = fmt.shared_fits is not None and fmt.shared_fits(entry, arr, like)
            if arr.shape != like.shape and not fits:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(_transform(arr, kind).shape)}, expected "
                    f"{tuple(_transform(jnp.zeros(like.shape), kind).shape)}"
                )
            shared[entry] = jnp.asarray(arr, dtype=like.dtype)
        out[SHARED_KEY] = shared
    return out


def _no_format(variant: str) -> ValueError:
    supported = ", ".join(v.name for v in _peft_variants())
    return ValueError(f"lorajax.peft has no PEFT format for variant {variant!r} (supported: {supported})")


def config_from_spec(
    spec: Spec, params: Any, base_model_name_or_path: str | None = None, task_type: str | None = None
) -> dict:
    """The PEFT ``adapter_config.json`` dict for ``spec`` on ``params``."""
    fmt = _format_of(spec.variant)  # aliases ("bone") share their variant's format
    if fmt.to_config is None:
        raise ValueError(f"the PEFT format of variant {spec.variant!r} declares no to_config: it cannot be written")
    selected = targets_lib.select(spec, params)
    names = [t.name for t in selected]
    if any(not n for n in names):
        raise ValueError("cannot save an adapter on a root-level weight (empty module name) in PEFT's format")
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        "inference_mode": True,
        "r": spec.rank,
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "revision": None,
    }
    dropout = {fmt.dropout[0]: float(spec.options["dropout"])} if fmt.dropout else {}
    return {**common, **fmt.to_config(spec, selected), **dropout}


def save(
    adapter_dir: str | os.PathLike,
    spec: Spec,
    adapters: dict,
    params: Any,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapters`` as a PEFT adapter folder; returns the folder.

    ``params`` (the base the adapters are for) fixes the module names and checks
    that ``adapters`` fits. Tensors are written in the adapters' dtype; a
    non-finite one raises FloatingPointError before anything is written.

    The folder is written atomically (`lorajax.atomic.directory`): a process
    killed mid-export leaves the previous folder (or none), never a config
    without its weights. Into an existing folder, ``adapter_config.json`` and
    ``adapter_model.safetensors`` are replaced and every other file (README,
    tokenizer, ...) is kept.
    """
    adapter_dir = Path(adapter_dir)
    config = config_from_spec(spec, params, base_model_name_or_path, task_type)
    selected, index, shared = adapters_lib.resolve(spec, params, adapters)
    fmt, variant = _format_of(spec.variant), registry.get(spec.variant)
    layer_kinds.check_peft(variant, selected)
    tensors = {}
    for t in selected:
        a = index[t.keys]
        special = _layer_tensors(variant, t)
        if special is not None:  # embedding / conv: PEFT's own layouts
            for entry, suffix, side in special:
                tensors[f"{PREFIX}{t.name}.{suffix}"] = layer_kinds.to_peft(np.asarray(a[entry]), side, t)
            continue
        for entry, suffix, kind in fmt.tensors:
            tensors[f"{PREFIX}{t.name}.{suffix}"] = _transform(jnp.asarray(a[entry]), kind)
        for entry in fmt.duplicates:
            tensors[f"{PREFIX}{t.name}.{entry}"] = jnp.asarray(shared[entry])
    for entry, name, kind in fmt.shared:
        tensors[name] = _transform(jnp.asarray(shared[entry]), kind)
    if fmt.save_extra is not None:
        tensors.update(fmt.save_extra(spec, selected, index, shared))
    bad = [k for k, v in tensors.items() if not bool(jnp.all(jnp.isfinite(jnp.asarray(v, jnp.float32))))]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite adapter tensors: {bad[:3]}")
    own = {CONFIG_NAME, WEIGHTS_NAME}
    with atomic.directory(adapter_dir, keep=lambda name: name not in own) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        safetensors.flax.save_file(
            {k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}
        )
    return adapter_dir
