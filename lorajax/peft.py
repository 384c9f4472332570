"""Hugging Face PEFT adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

`load(adapter_dir, params) -> (spec, adapters)` reads PEFT's LoRA (with
``use_rslora``, ``use_dora``, ``rank_pattern``, ``alpha_pattern``,
``layers_to_transform``, ``layers_pattern``, ``exclude_modules``,
``target_modules`` as list, regex or ``"all-linear"``, ``fan_in_fan_out``),
VeRA, MiSS (and the older Bone), SHiRA, RandLoRA and Uni-LoRA formats, frozen
buffers included (projections, indices). A field that would change the maths and that
lorajax does not implement (``lora_bias``, ``modules_to_save``,
``layer_replication``, ``use_qalora``, ...) raises: never a silent difference.
`save(adapter_dir, spec, adapters, params)` writes files that
``peft.PeftModel.from_pretrained`` loads.

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

Only safetensors and JSON are read; pickles (``adapter_model.bin``) are refused.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax
from safetensors import SafetensorError

from lorajax import adapters as adapters_lib
from lorajax import registry
from lorajax.jsonfile import read_object
from lorajax import targets as targets_lib
from lorajax.spec import Spec
from lorajax.variants import unilora
from lorajax.variants.base import SHARED_KEY

__all__ = ["load", "save", "spec_from_config", "config_from_spec", "TORCH_MODULE_ORDER"]

#: Registration order of the linear layers in Hugging Face's Llama- and
#: BERT-style blocks (PEFT's ``model.modules()`` order within a layer). BERT's
#: ``attention.output.dense`` precedes ``intermediate.dense`` and ``output.dense``.
TORCH_MODULE_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Fields that only describe the file, training-time behaviour, or defaults with no effect on the maths.
_IGNORED = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "init_lora_weights", "init_weights", "lora_dropout", "vera_dropout", "miss_dropout", "bone_dropout",
    "randlora_dropout", "megatron_core", "qalora_group_size", "loftq_config", "ensure_weight_tying",
    "fan_in_fan_out", "save_projection", "random_seed", "unilora_dropout", "save_indices",
    "lora_ga_config", "corda_config", "eva_config",  # describe the init only (the base it expects: see the warning)
}
_SELECTION = {"peft_type", "r", "target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "bias"}
# config fields each PEFT type reads (beyond the selection ones)
_USED = {
    "LORA": {"lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"},
    "VERA": {"projection_prng_key", "d_initial"},
    "MISS": {"init_weights", "mini_r"},
    "BONE": {"init_weights"},
    "SHIRA": {"mask_type"},
    "RANDLORA": {"randlora_alpha", "projection_prng_key", "sparse", "very_sparse"},
    "UNILORA": {"theta_d_length", "proj_seed", "init_theta_d_bound", "init_weights"},
}

# per-target tensors: (lorajax leaf, PEFT suffix, transform) with transform "T" (2-D transpose),
# "swap" (reverse the rows: SHiRA's [2, K] (out, in) indices) or None (as is)
_TENSORS = {
    "lora": [("lora_A", "lora_A.weight", "T"), ("lora_B", "lora_B.weight", "T")],
    "dora": [("lora_A", "lora_A.weight", "T"), ("lora_B", "lora_B.weight", "T"),
             ("magnitude", "lora_magnitude_vector", None)],
    "vera": [("vera_lambda_b", "vera_lambda_b", None), ("vera_lambda_d", "vera_lambda_d", None)],
    "miss": [("miss_block", "miss_block", None)],
    "shira": [("shira_weight", "shira_weight", None), ("shira_indices", "shira_indices", "swap")],
    "randlora": [("randlora_lambda", "randlora_lambda", None), ("randlora_gamma", "randlora_gamma", None)],
    "unilora": [],  # everything is model-level: see _load_unilora / save
}
# model-level tensors under ``base_model.``: (lorajax _shared leaf, PEFT name, transform)
_SHARED = {
    "vera": [("vera_A", "base_model.vera_A", "T"), ("vera_B", "base_model.vera_B", "T")],
    "randlora": [("randlora_A", "base_model.randlora_A", None), ("randlora_B", "base_model.randlora_B", None)],
}
# per-module copies of shared buffers that PEFT also writes (dropped on load)
_DUPLICATES = {"randlora": ("randlora_A", "randlora_B")}


def _transform(arr: Any, kind: str | None) -> Any:
    if kind == "T":
        return arr.T
    if kind == "swap":
        return arr[::-1]
    return arr


def _read_config(adapter_dir: Path) -> dict:
    return read_object(adapter_dir / CONFIG_NAME,
                       f" (a PEFT adapter folder has {CONFIG_NAME} and {WEIGHTS_NAME})")


def _is_default(value: Any) -> bool:
    return value in (None, False, 0, "none", "", {}, [])


def _effective_targets(target_modules: Any, params: Any) -> Any:
    """PEFT semantics: a list matches if any entry matches; drop entries this model lacks."""
    if isinstance(target_modules, str) or target_modules is None:
        return target_modules
    names = [targets_lib.module_name(k) for k, _ in targets_lib.weight_leaves(params)]
    kept = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not kept:
        raise ValueError(f"target_modules {sorted(target_modules)} match no weight of params; "
                         f"weights found: {names[:8]}...")
    return kept


def spec_from_config(config: dict, params: Any | None = None, *, unilora_order: Any = TORCH_MODULE_ORDER) -> Spec:
    """A `Spec` equal in meaning to a PEFT ``adapter_config.json`` dict.

    ``unilora_order`` becomes a Uni-LoRA Spec's ``target_order``.

    Raises ValueError for an unsupported PEFT type or a field that lorajax
    does not implement with a non-default value.
    """
    peft_type = config.get("peft_type")
    if peft_type not in _USED:
        raise ValueError(f"unsupported peft_type {peft_type!r}: lorajax.peft reads {sorted(_USED)} adapters")
    used = _SELECTION | _USED[peft_type]
    for key, value in config.items():
        if key in used or key in _IGNORED or _is_default(value):
            continue
        raise ValueError(f"unsupported PEFT field {key}={value!r}: lorajax would compute something different")
    if config.get("bias", "none") != "none":
        raise ValueError(f"unsupported PEFT field bias={config['bias']!r}: only 'none' is supported")
    if config.get("target_modules") is None:
        raise ValueError("adapter_config.json has no target_modules (target_parameters is not supported)")
    if peft_type == "LORA" and config.get("init_lora_weights") not in (True, False, "gaussian", None):
        warnings.warn(f"adapter made with init_lora_weights={config['init_lora_weights']!r}: it expects the "
                      "base weights that initialiser produced (e.g. the PiSSA residual)", stacklevel=2)
    targets = config["target_modules"]
    if params is not None:
        targets = _effective_targets(targets, params)
    common = dict(
        rank=int(config["r"]), targets=targets, exclude=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"),
    )
    if peft_type == "VERA":
        return Spec("vera", **common, projection_prng_key=int(config.get("projection_prng_key", 0)),
                    d_initial=float(config.get("d_initial", 0.1)))
    if peft_type in ("MISS", "BONE"):
        extra = {"mini_r": int(config.get("mini_r", 1))} if peft_type == "MISS" else {}
        return Spec("miss", **common, init_weights=config.get("init_weights", True), **extra)
    if peft_type == "SHIRA":
        return Spec("shira", **common, mask_type=config.get("mask_type", "random"))
    if peft_type == "UNILORA":
        if config.get("init_weights", True) is not True:
            raise ValueError("unsupported PEFT field init_weights=False for Uni-LoRA (θ_d ~ N(0, 1))")
        return Spec("unilora", **common, theta_d_length=int(config.get("theta_d_length", 256)),
                    proj_seed=int(config.get("proj_seed", 42)),
                    init_theta_d_bound=float(config.get("init_theta_d_bound", 0.02)),
                    target_order=None if unilora_order is None else tuple(unilora_order))
    if peft_type == "RANDLORA":
        return Spec("randlora", alpha=float(config.get("randlora_alpha", 640)), **common,
                    projection_prng_key=int(config.get("projection_prng_key", 0)),
                    sparse=bool(config.get("sparse", False)), very_sparse=bool(config.get("very_sparse", False)))
    return Spec(
        "dora" if config.get("use_dora") else "lora", alpha=float(config.get("lora_alpha", 8)), **common,
        rank_pattern=config.get("rank_pattern") or None, alpha_pattern=config.get("alpha_pattern") or None,
        use_rslora=bool(config.get("use_rslora", False)),
    )


def _read_tensors(path: Path) -> dict:
    if not path.exists():
        bin_path = path.with_name("adapter_model.bin")
        hint = f" ({bin_path.name} exists, but pickles are never loaded: convert it to safetensors)" \
            if bin_path.exists() else ""
        raise FileNotFoundError(f"{path} not found{hint}")
    try:
        return safetensors.flax.load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or malformed?): {e}") from e


def _put(name: str, tensors: dict, leaf: str, like: Any, kind: str | None) -> Any:
    arr = tensors.pop(name, None)
    if arr is None:
        raise ValueError(f"adapter file lacks tensor {name!r} (needed for {leaf})")
    arr = _transform(arr, kind)
    if arr.shape != like.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(_transform(arr, kind).shape)}, "
                         f"expected {tuple(_transform(jnp.zeros(like.shape), kind).shape)}")
    if jnp.issubdtype(like.dtype, jnp.integer) and not bool(jnp.all(arr == jnp.round(arr))):
        raise ValueError(f"tensor {name!r} must hold integers")
    return jnp.asarray(arr, dtype=like.dtype)


def load(adapter_dir: str | os.PathLike, params: Any, *, dtype: Any = None,
         unilora_order: Any = TORCH_MODULE_ORDER) -> tuple[Spec, dict]:
    """Read a PEFT adapter folder into ``(spec, adapters)`` for ``params``.

    Args:
      adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base params the adapter is for (HF-named, e.g. from
        `lorajax.models.from_pretrained`).
      dtype: adapter dtype (default float32, or the weight's if wider).
      unilora_order: for Uni-LoRA files saved without indices: the torch
        registration order of the adapted modules (name suffixes, see
        `TORCH_MODULE_ORDER`); ignored when the file has the indices.

    Raises:
      FileNotFoundError / ValueError naming the missing file, the missing,
      unknown or wrongly shaped tensor, or the unsupported config field.
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    tensors = _read_tensors(adapter_dir / WEIGHTS_NAME)
    has_indices = any(k.endswith(".unilora_indices_A") for k in tensors)
    spec = spec_from_config(config, params, unilora_order=None if has_indices else unilora_order)
    if dtype is not None:
        spec = spec.replace(dtype=jnp.dtype(dtype).name)
    selected = targets_lib.select(spec, params)
    if spec.variant == "unilora":
        return spec, _load_unilora(spec, params, selected, tensors, has_indices)
    template = adapters_lib.init(spec, params, 0)
    flat = {}
    for t in selected:
        node = template
        for k in t.keys:
            node = node[k]
        flat[t.keys] = {leaf: _put(f"{PREFIX}{t.name}.{suffix}", tensors, f"{t.name}/{leaf}", node[leaf], kind)
                        for leaf, suffix, kind in _TENSORS[spec.variant]}
    out = adapters_lib._nest(flat)
    for leaf in _DUPLICATES.get(spec.variant, ()):
        for t in selected:
            tensors.pop(f"{PREFIX}{t.name}.{leaf}", None)
    if spec.variant in _SHARED:
        shared = {}
        for leaf, name, kind in _SHARED[spec.variant]:
            arr = tensors.pop(name, None)
            if arr is None:
                raise ValueError(f"adapter file lacks {name!r}: save the PEFT adapter with save_projection=True")
            like = template[SHARED_KEY][leaf]
            arr = _transform(arr, kind)
            # VeRA's projections may be larger than needed (sliced per weight); the rank axis must match
            ok = arr.shape == like.shape or (spec.variant == "vera" and arr.ndim == 2 and all(
                a >= b for a, b in zip(arr.shape, like.shape)) and arr.shape[1 if leaf == "vera_A" else 0]
                == like.shape[1 if leaf == "vera_A" else 0])
            if not ok:
                raise ValueError(f"tensor {name!r} has shape {tuple(_transform(arr, kind).shape)}, expected "
                                 f"{tuple(_transform(jnp.zeros(like.shape), kind).shape)}")
            shared[leaf] = jnp.asarray(arr, dtype=like.dtype)
        out[SHARED_KEY] = shared
    if tensors:
        extra = sorted(tensors)
        raise ValueError(f"adapter file has {len(extra)} tensors lorajax did not expect, e.g. {extra[:3]} "
                         "(does adapter_config.json match these weights, and params this model?)")
    return spec, out


def _load_unilora(spec: Spec, params: Any, selected: list, tensors: dict, has_indices: bool) -> dict:
    """θ_d from the file; the index blocks imported (``save_indices=True``) or regenerated."""
    try:
        template = adapters_lib.init(spec, params, 0)
    except ValueError as e:
        raise ValueError(f"{e}. The Uni-LoRA file has no indices: pass unilora_order=[...] (the torch "
                         "registration order of the adapted modules) or save it with save_indices=True") from e
    shared = dict(template[SHARED_KEY])
    like = shared["unilora_theta_d"]
    shared["unilora_theta_d"] = _put("base_model.unilora_theta_d", tensors, "_shared/unilora_theta_d", like, None)
    d = like.shape[0]
    if has_indices:
        blocks, scales = {}, {}
        for t in selected:
            old = shared["unilora_indices"][t.name]
            pre = f"{PREFIX}{t.name}.unilora_"
            blocks[t.name] = {f"unilora_indices_{x}": _put(pre + f"indices_{x}", tensors, f"{t.name}/indices_{x}",
                                                          old[f"unilora_indices_{x}"], "T") for x in "AB"}
            scales[t.name] = {x: tensors.pop(pre + f"scales_{x}", None) for x in "AB"}
        flat_idx = np.concatenate([np.asarray(b[k]).ravel() for b in blocks.values() for k in sorted(b)])
        if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= d):
            raise ValueError(f"Uni-LoRA indices out of range [0, {d}) (theta_d_length={d})")
        norm = unilora.column_scale(flat_idx, d)
        for name, per in scales.items():
            for x, saved in per.items():
                if saved is None:
                    continue
                want = norm[np.asarray(blocks[name][f"unilora_indices_{x}"])].T
                if saved.shape != want.shape or not np.allclose(np.asarray(saved, np.float64), want, rtol=1e-5):
                    raise ValueError(f"{PREFIX}{name}.unilora_scales_{x} disagrees with 1/sqrt(count) of the "
                                     "saved indices: the file is inconsistent")
        shared["unilora_indices"] = blocks
        shared["unilora_norm"] = jnp.asarray(norm, like.dtype)
    if tensors:
        extra = sorted(tensors)
        raise ValueError(f"adapter file has {len(extra)} tensors lorajax did not expect, e.g. {extra[:3]}")
    out = {k: v for k, v in template.items() if k != SHARED_KEY}
    out[SHARED_KEY] = shared
    return out


def config_from_spec(spec: Spec, params: Any, base_model_name_or_path: str | None = None,
                     task_type: str | None = None) -> dict:
    """The PEFT ``adapter_config.json`` dict for ``spec`` on ``params``."""
    selected = targets_lib.select(spec, params)
    names = [t.name for t in selected]
    if any(not n for n in names):
        raise ValueError("cannot save an adapter on a root-level weight (empty module name) in PEFT's format")
    common = {
        "base_model_name_or_path": base_model_name_or_path, "task_type": task_type, "inference_mode": True,
        "r": spec.rank, "target_modules": names, "bias": "none", "fan_in_fan_out": False,
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "revision": None,
    }
    opts = spec.options
    variant = registry.get(spec.variant).name  # aliases ("bone") share their variant's format
    if variant == "vera":
        return {**common, "peft_type": "VERA", "projection_prng_key": opts["projection_prng_key"],
                "d_initial": opts["d_initial"], "save_projection": True, "vera_dropout": 0.0}
    if variant == "miss":
        return {**common, "peft_type": "MISS", "init_weights": opts["init_weights"], "mini_r": opts["mini_r"],
                "miss_dropout": 0.0}
    if variant == "shira":
        if opts.get("scale", 1.0) != 1.0:
            raise ValueError("PEFT's SHiRA format has no scale: save with scale=1.0")
        return {**common, "peft_type": "SHIRA", "mask_type": "random", "random_seed": None}
    if variant == "randlora":
        if opts["scaling"] != "peft":
            raise ValueError("PEFT's RandLoRA format uses scaling='peft' (alpha / r)")
        return {**common, "peft_type": "RANDLORA", "randlora_alpha": spec.alpha, "save_projection": True,
                "projection_prng_key": opts["projection_prng_key"], "sparse": opts["sparse"],
                "very_sparse": opts["very_sparse"], "randlora_dropout": 0.0}
    if variant == "unilora":
        return {**common, "peft_type": "UNILORA", "theta_d_length": opts["theta_d_length"],
                "proj_seed": opts["proj_seed"], "init_theta_d_bound": opts["init_theta_d_bound"],
                "save_indices": True, "unilora_dropout": 0.0, "init_weights": True}
    if variant not in ("lora", "dora"):
        raise ValueError(f"lorajax.peft has no PEFT format for variant {spec.variant!r} "
                         f"(supported: lora, dora, vera, miss, shira, randlora, unilora)")
    rank_pattern = {re.escape(t.name): t.rank for t in selected if t.rank != spec.rank}
    alpha_pattern = {re.escape(t.name): t.alpha for t in selected if t.alpha != spec.alpha}
    return {**common, "peft_type": "LORA", "lora_alpha": spec.alpha, "use_rslora": bool(opts["use_rslora"]),
            "use_dora": spec.variant == "dora", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "lora_dropout": 0.0, "init_lora_weights": True, "exclude_modules": None}


def save(adapter_dir: str | os.PathLike, spec: Spec, adapters: dict, params: Any, *,
         base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write ``adapters`` as a PEFT adapter folder; returns the folder.

    ``params`` (the base the adapters are for) fixes the module names and checks
    that ``adapters`` fits. Tensors are written in the adapters' dtype.
    """
    adapter_dir = Path(adapter_dir)
    config = config_from_spec(spec, params, base_model_name_or_path, task_type)
    selected, index, shared = adapters_lib.resolve(spec, params, adapters)
    variant = registry.get(spec.variant).name
    tensors = {}
    for t in selected:
        a = index[t.keys]
        for leaf, suffix, kind in _TENSORS[variant]:
            tensors[f"{PREFIX}{t.name}.{suffix}"] = _transform(jnp.asarray(a[leaf]), kind)
        for leaf in _DUPLICATES.get(variant, ()):
            tensors[f"{PREFIX}{t.name}.{leaf}"] = jnp.asarray(shared[leaf])
    for leaf, name, kind in _SHARED.get(variant, []):
        tensors[name] = _transform(jnp.asarray(shared[leaf]), kind)
    if variant == "unilora":
        tensors["base_model.unilora_theta_d"] = jnp.asarray(shared["unilora_theta_d"])
        norm = jnp.asarray(shared["unilora_norm"], jnp.float32)
        for t in selected:
            for x in "AB":
                idx = jnp.asarray(shared["unilora_indices"][t.name][f"unilora_indices_{x}"])
                tensors[f"{PREFIX}{t.name}.unilora_indices_{x}"] = idx.T.astype(jnp.int32)
                tensors[f"{PREFIX}{t.name}.unilora_scales_{x}"] = norm[idx].T
    adapter_dir.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in tensors.items() if not bool(jnp.all(jnp.isfinite(jnp.asarray(v, jnp.float32))))]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite adapter tensors: {bad[:3]}")
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()},
                               str(adapter_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (adapter_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return adapter_dir

