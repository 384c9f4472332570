"""Hugging Face checkpoints in and out: ``config.json`` + safetensors, for every model family.

A family module (``lorajax.models.llama``, ``lorajax.models.bert``) provides:

* ``Config.from_hf(config_dict) -> Config`` and ``Config.to_hf() -> dict``;
* ``build(cfg) -> nn.Module`` whose ``cfg`` attribute is the Config;
* ``param_map(cfg) -> {hf_name: (flax_path, kind)}``: where each HF tensor goes;
  ``kind`` is ``"linear"`` (torch ``[out, in]`` -> Flax kernel ``[in, out]``)
  or ``"copy"``;
* ``IGNORED``: a regex of HF tensor names that are not parameters (buffers);
* ``PREFIXES``: name prefixes a checkpoint may add (``"bert."``) and that are
  stripped when a name is not found as is;
* ``RENAMES`` (optional): ``[(regex, replacement)]`` applied to HF names
  before lookup, for older spellings (BERT's ``LayerNorm.gamma`` / ``.beta``);
* ``example_inputs(cfg) -> tuple``: small inputs for ``model.init`` (used with
  ``jax.eval_shape`` to know every parameter's shape without allocating it).

`from_pretrained` and `save_pretrained` are written once on top of that, with
strict checks: a missing, unexpected or wrongly shaped tensor, a truncated
file or a malformed config raises, naming the tensor or file. Tensors are read
one at a time (``safe_open``), so loading holds about one copy of the weights.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import safetensors.flax
from safetensors import SafetensorError, safe_open

from lorajax import atomic
from lorajax.jsonfile import read_object

__all__ = ["from_pretrained", "save_pretrained", "FAMILIES", "load_config"]

#: HF ``model_type`` -> family module under lorajax.models
FAMILIES = {
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "bert": "bert",
    "roberta": "bert",
    "vit": "vit",
}

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def load_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder as a dict (clear errors when missing or malformed)."""
    cfg_path = Path(path) / "config.json"
    config = read_object(cfg_path, ": a HF checkpoint folder has config.json and safetensors")
    if "model_type" not in config:
        raise ValueError(f"{cfg_path} has no model_type")
    return config


def family(model_type: str):
    """The family module for a HF ``model_type``."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return importlib.import_module(f"lorajax.models.{FAMILIES[model_type]}")


def _shard_path(folder: Path, index_file: Path, name: Any) -> Path:
    """``folder / name`` for a shard ``name`` of ``index_file``, checked to stay inside ``folder``.

    Raises:
      ValueError: ``name`` is not a string, is empty, absolute, has a ``..``
        component, or resolves (after symbolic links) outside ``folder``.
    """
    bad = f"{index_file}: shard {name!r} in weight_map"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{bad} is not a file name")
    if os.path.isabs(name) or Path(name).is_absolute():
        raise ValueError(f"{bad} is an absolute path: shard names must be relative to the model folder")
    if ".." in Path(name).parts or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{bad} has a '..' component: shard names must stay inside the model folder")
    root = folder.resolve()
    target = (folder / name).resolve()
    if target == root or root not in target.parents:
        raise ValueError(f"{bad} resolves to {target}, outside the model folder {root} (a symbolic link?)")
    return folder / name


def _index_shards(path: Path) -> list[Path]:
    """The shard files named by ``path``'s ``model.safetensors.index.json``, checked (see `_shard_path`)."""
    index_file = path / INDEX
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_file} is malformed: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file} is malformed: it needs a weight_map object {{tensor name: shard file}}")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{index_file} is malformed: weight_map[{bad[0][0]!r}] = {bad[0][1]!r} is not a file name")
    return [_shard_path(path, index_file, name) for name in sorted(set(weight_map.values()))]


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        files = _index_shards(path)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"shards named in {INDEX} are missing: {missing}")
        return files
    if (path / SINGLE).exists():
        return [path / SINGLE]
    bins = sorted(p.name for p in path.glob("*.bin"))
    hint = f" ({bins} exist, but pickles are never loaded: convert to safetensors)" if bins else ""
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}{hint}")


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def param_shapes(model: Any, example_inputs: tuple) -> dict[tuple, tuple]:
    """``{flax_path: shape}`` of the ``params`` collection, computed abstractly (no allocation)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs))
    flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    return {tuple(str(k.key) for k in p): tuple(leaf.shape) for p, leaf in flat}


def from_pretrained(path: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, dict]:
    """Load a local HF checkpoint folder as ``(model, params)``.

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``).
      dtype: cast parameters to this dtype (default: keep the checkpoint's).

    Returns:
      ``model`` (a linen Module; ``model.apply({"params": params}, ...)``) and ``params``.
    """
    path = Path(path)
    config = load_config(path)
    fam = family(config["model_type"])
    cfg = fam.Config.from_hf(config)
    model = fam.build(cfg)
    mapping = fam.param_map(cfg)
    shapes = param_shapes(model, fam.example_inputs(cfg))
    ignored = re.compile(fam.IGNORED) if fam.IGNORED else None
    params: dict = {}
    loaded, unexpected = set(), []
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    key = name
                    for pattern, repl in getattr(fam, "RENAMES", ()):
                        key = re.sub(pattern, repl, key)
                    if key not in mapping:
                        key = next(
                            (key[len(p) :] for p in fam.PREFIXES if key.startswith(p) and key[len(p) :] in mapping), key
                        )
                    if key not in mapping:
                        if ignored is None or not ignored.fullmatch(key):
                            unexpected.append(name)
                        continue
                    flax_path, kind = mapping[key]
                    arr = f.get_tensor(name)
                    if kind == "linear":
                        arr = arr.T
                    if dtype is not None:
                        arr = arr.astype(dtype)
                    if tuple(arr.shape) != tuple(shapes[flax_path]):
                        want = shapes[flax_path][::-1] if kind == "linear" else shapes[flax_path]
                        raise ValueError(
                            f"{file.name}: tensor {name!r} has shape "
                            f"{tuple(arr.T.shape if kind == 'linear' else arr.shape)}, "
                            f"config.json implies {tuple(want)}"
                        )
                    _set(params, flax_path, arr)
                    loaded.add(key)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or malformed?): {e}") from e
    missing = sorted(set(mapping) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensors this {config['model_type']} model does not "
            f"use, e.g. {unexpected[:3]}"
        )
    return model, params


def to_hf_tensors(model: Any, params: dict) -> dict[str, jax.Array]:
    """``{hf_name: array}`` in PyTorch layout for ``params`` of a lorajax model."""
    fam = importlib.import_module(type(model).__module__)
    out = {}
    for name, (flax_path, kind) in fam.param_map(model.cfg).items():
        try:
            arr = _get(params, flax_path)
        except (KeyError, TypeError):
            raise ValueError(f"params lack {'/'.join(flax_path)} (for {name})") from None
        out[name] = jnp.asarray(arr.T if kind == "linear" else arr)
    return out


_SHARD_RE = re.compile(r"model-\d+-of-\d+\.safetensors")


def _export_files(path: Path) -> set[str]:
    """Names in an existing folder ``path`` that a previous export wrote (and a new one replaces).

    ``config.json``, the weights (``model.safetensors``, its index, HF-style
    shards ``model-00001-of-00002.safetensors`` and the shards the old index
    names). A stale index must not survive next to new weights: loaders prefer it.
    """
    own = {"config.json", SINGLE, INDEX}
    if path.is_dir():
        own |= {p.name for p in path.iterdir() if _SHARD_RE.fullmatch(p.name)}
        try:
            own |= {f.name for f in _index_shards(path) if f.parent == path}
        except (OSError, ValueError):
            pass  # unreadable or unsafe old index: it is replaced, shards it names stay as user files
    return own


def save_pretrained(path: str | os.PathLike, model: Any, params: dict, *, dtype: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads.

    The folder is written atomically (`lorajax.atomic.directory`): a process
    killed mid-export leaves the previous folder (or none), never a
    ``config.json`` without its weights. Into an existing folder, the previous
    export's files (``config.json``, ``model.safetensors``, an index and its
    shards) are replaced and every other file (tokenizer, README, ...) is kept.

    Args:
      path: output folder (created; parents too).
      model: a model from `from_pretrained` (or built from a family Config).
      params: its params, e.g. after `lorajax.merge`.
      dtype: cast tensors to this dtype before writing (default: as they are).

    Returns:
      ``path``.
    """
    path = Path(path)
    tensors = to_hf_tensors(model, params)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    dtypes = {str(v.dtype) for v in tensors.values()}
    config = model.cfg.to_hf()
    if len(dtypes) == 1:
        # transformers 5 reads "dtype"; older versions "torch_dtype"
        config["dtype"] = config["torch_dtype"] = {
            "float32": "float32",
            "bfloat16": "bfloat16",
            "float16": "float16",
        }.get(dtypes.pop(), "float32")
    own = _export_files(path.resolve()) if path.exists() else set()
    with atomic.directory(path, keep=lambda name: name not in own) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        safetensors.flax.save_file(
            {k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / SINGLE), metadata={"format": "pt"}
        )
    return path
