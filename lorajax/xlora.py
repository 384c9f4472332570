"""X-LoRA: frozen LoRA experts mixed per token by a classifier over the base model's last hidden state.

Paper: E. L. Buehler & M. J. Buehler, "X-LoRA: Mixture of Low-Rank Adapter
Experts, a Flexible Framework for Large Language Models", arXiv:2402.07148.
Reference implementation (every default and the parity tests): PEFT
``src/peft/tuners/xlora/{config,classifier,layer,model}.py``
(`../shared/specs/adapters.md` §10b).

One call is two passes of the same model:

1. **Scaling pass**: the model with every expert weighted by
   ``scaling_pass_value`` (default 0: the experts add nothing, this pass *is*
   the base model); its last hidden state ``h [B, S, D]`` (after the final
   norm: HF's ``hidden_states[-1]``). No gradient flows through it (PEFT runs
   it under ``no_grad``).
2. **Classifier**: depth 1: ``logits = h W + b``; depth > 1:
   ``Linear(D, size) → ReLU → Dropout(p) → … → Linear(size, ·)``. Outputs ``n``
   logits per token, broadcast to every adapted layer, or ``n·L`` with
   ``layerwise_scalings`` (L = the number of adapted modules, numbered in torch
   registration order, `lorajax.peft.TORCH_MODULE_ORDER`), then a softmax over
   the experts at ``softmax_temperature``: scalings ``λ [B, S, L, n]``.
3. **Real pass**: at adapted module ``ℓ``, per token ``t``::

       y = x W + b + g · Σ_i s_i · ((x ⊙ λ_{t,ℓ,i}) A_i) B_i

   with ``s_i`` expert ``i``'s own ``α/r``, ``g = global_scaling_weight``;
   ``top_k_lora = k`` keeps each token's ``k`` largest ``λ`` (the rest 0) and
   ``enable_softmax_topk`` re-normalises the kept ones with a softmax. Computed
   factored: ``(x A_i)`` for every expert, ``[T, n, r]``, weighted, then summed
   through ``B``; no ``ΔW`` is formed.

Experts are ``lora`` adapters with the same targets (ranks and alphas may
differ), stacked with `lorajax.multi_adapter.stack_adapters`. The classifier is
a tuple of ``{"kernel": [in, out], "bias": [out]}`` layers (torch's
``nn.Linear`` transposed). Differences from PEFT: the experts' own LoRA dropout
is not applied in training (PEFT applies each expert's ``lora_dropout`` to
``x ⊙ λ``); PEFT 0.21's ``save_pretrained`` of an X-LoRA model does not round-trip
its classifier (checked: the reloaded scalings differ), so `save` / `load` write
and read PEFT's ``XLoraConfig`` JSON with the classifier under PEFT's parameter
names (``internal_xlora_classifier.layers.{j}.weight``, ``[out, in]``) and the
experts as ordinary PEFT LoRA folders.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax import xlora
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
  ...                    num_attention_heads=2, num_key_value_heads=1)
  >>> model = llama.LlamaForCausalLM(cfg)
  >>> ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> spec = lorajax.Spec("lora", rank=2, targets=["q_proj", "v_proj"], init_weights=False)
  >>> experts = [lorajax.init(spec, params, jax.random.key(i)) for i in range(3)]
  >>> config = xlora.Config(hidden_size=16)
  >>> clf = xlora.init_classifier(config, n_experts=3, n_layers=4, key=jax.random.key(9))
  >>> fwd = xlora.adapt(model.apply, spec, config)
  >>> logits, lam = fwd({"params": params}, xlora.stack(spec, experts), clf, ids, return_scalings=True)
  >>> logits.shape, lam.shape
  ((2, 5, 32), (2, 5, 4, 3))
  >>> bool(jnp.allclose(lam.sum(-1), 1.0))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import atomic, registry
from lorajax.adapt import check_reached, make_interceptor
from lorajax.adapters import resolve
from lorajax.jsonfile import read_object
from lorajax.multi_adapter import stack_adapters
from lorajax.spec import Spec
from lorajax.variants import lora
from lorajax.variants.base import EVAL
from lorajax.variants.unilora import layout_order

__all__ = ["Config", "init_classifier", "classifier_scalings", "select_top_k", "stack", "adapt", "save", "load"]

#: PEFT's parameter-name prefix of the classifier layers in a saved X-LoRA model
CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier.layers."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class Config:
    """PEFT's ``XLoraConfig`` fields and defaults (``adapters`` is given separately: the experts)."""

    hidden_size: int
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self):
        if self.hidden_size < 1:
            raise ValueError(f"X-LoRA hidden_size must be >= 1, got {self.hidden_size}")
        if self.xlora_depth < 1:
            raise ValueError(f"X-LoRA xlora_depth must be >= 1, got {self.xlora_depth}")
        if self.xlora_depth > 1 and self.xlora_size < 1:
            raise ValueError(f"X-LoRA xlora_size must be >= 1, got {self.xlora_size}")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"X-LoRA xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p}")
        if not self.softmax_temperature > 0:
            raise ValueError(f"X-LoRA softmax_temperature must be > 0, got {self.softmax_temperature}")
        if self.top_k_lora is not None and self.top_k_lora < 1:
            raise ValueError(f"X-LoRA top_k_lora must be None or >= 1, got {self.top_k_lora}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("X-LoRA enable_softmax_topk needs top_k_lora (it re-normalises the top-k scalings)")

    def to_peft(self, adapters: dict[str, str]) -> dict:
        """PEFT's ``adapter_config.json`` of an ``XLoraConfig`` with these experts (name -> folder)."""
        return {"peft_type": "XLORA", "task_type": "CAUSAL_LM", "adapters": dict(adapters), **dataclasses.asdict(self)}

    @classmethod
    def from_peft(cls, config: dict) -> "Config":
        """From PEFT's ``adapter_config.json`` (unknown fields refused, PEFT's bookkeeping fields ignored)."""
        if config.get("peft_type") != "XLORA":
            raise ValueError(f"not an X-LoRA config: peft_type={config.get('peft_type')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = {"peft_type", "task_type", "adapters", "auto_mapping", "base_model_name_or_path", "revision",
                   "inference_mode", "peft_version"}  # fmt: skip
        unknown = sorted(set(config) - fields - ignored)
        if unknown:
            raise ValueError(f"X-LoRA config has fields lorajax does not know: {unknown}")
        return cls(**{k: v for k, v in config.items() if k in fields})


def _out_features(config: Config, n_experts: int, n_layers: int) -> int:
    return n_experts * n_layers if config.layerwise_scalings else n_experts


def init_classifier(config: Config, n_experts: int, n_layers: int, key: jax.Array, dtype: Any = jnp.float32) -> tuple:
    """The classifier's layers, each ``{"kernel": [in, out], "bias": [out]}``, as torch's ``nn.Linear`` initialises
    them (``U(±1/√in)`` for both). ``n_layers``: the number of adapted modules (used with ``layerwise_scalings``)."""
    if n_experts < 1 or n_layers < 1:
        raise ValueError(f"X-LoRA needs >= 1 expert and >= 1 adapted module, got {n_experts} and {n_layers}")
    widths = [config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1)
    widths.append(_out_features(config, n_experts, n_layers))
    layers = []
    for k, (d_in, d_out) in zip(jax.random.split(key, len(widths) - 1), zip(widths[:-1], widths[1:])):
        kw, kb = jax.random.split(k)
        bound = 1.0 / math.sqrt(d_in)
        layers.append(
            {
                "kernel": jax.random.uniform(kw, (d_in, d_out), dtype, -bound, bound),
                "bias": jax.random.uniform(kb, (d_out,), dtype, -bound, bound),
            }
        )
    return tuple(layers)


def _check_classifier(config: Config, classifier: Sequence[dict], n_experts: int, n_layers: int) -> None:
    if len(classifier) != config.xlora_depth:
        raise ValueError(f"X-LoRA classifier has {len(classifier)} layers; xlora_depth={config.xlora_depth}")
    want_in = config.hidden_size
    for j, layer in enumerate(classifier):
        k = layer["kernel"]
        want_out = _out_features(config, n_experts, n_layers) if j == len(classifier) - 1 else config.xlora_size
        if k.shape != (want_in, want_out) or layer["bias"].shape != (want_out,):
            raise ValueError(
                f"X-LoRA classifier layer {j}: kernel {k.shape}, bias {layer['bias'].shape}; expected "
                f"[{want_in}, {want_out}] and [{want_out}] ({n_experts} experts, {n_layers} adapted modules, "
                f"layerwise_scalings={config.layerwise_scalings})"
            )
        want_in = want_out


def classifier_scalings(
    config: Config,
    classifier: Sequence[dict],
    h_BxSxD: jax.Array,
    n_layers: int,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """``λ [B, S, L, n]`` from the scaling pass's last hidden state ``h [B, S, D]`` (PEFT's ``XLoraClassifier``).

    ``dropout_rng``: a key for the hidden layers' dropout in training (None: evaluation, no dropout).
    """
    B, S, D = h_BxSxD.shape
    if D != config.hidden_size:
        raise ValueError(f"X-LoRA: the hidden state has width {D}, config.hidden_size is {config.hidden_size}")
    x = h_BxSxD
    for j, layer in enumerate(classifier):
        x = x @ layer["kernel"].astype(x.dtype) + layer["bias"].astype(x.dtype)[None, None, :]
        if j < len(classifier) - 1:
            x = jax.nn.relu(x)
            if dropout_rng is not None and config.xlora_dropout_p > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, j), 1 - config.xlora_dropout_p, x.shape)
                x = jnp.where(keep, x / (1 - config.xlora_dropout_p), 0)
    n = x.shape[-1] // n_layers if config.layerwise_scalings else x.shape[-1]
    if config.layerwise_scalings:
        scal = x.reshape(B, S, n_layers, n)
    else:
        scal = jnp.broadcast_to(x[:, :, None, :], (B, S, n_layers, n))
    if config.enable_softmax:
        scal = jax.nn.softmax(scal / config.softmax_temperature, axis=-1)
    return scal


def select_top_k(config: Config, lam_xn: jax.Array) -> jax.Array:
    """One module's scalings ``[..., n]`` after ``top_k_lora`` (keep each token's k largest, zero the rest; ties
    keep the lower expert index) and ``enable_softmax_topk`` (softmax over the kept non-zero ones)."""
    out = lam_xn
    if config.top_k_lora is not None:
        k = min(config.top_k_lora, lam_xn.shape[-1])
        _, idx = jax.lax.top_k(lam_xn, k)
        keep = jnp.any(jax.nn.one_hot(idx, lam_xn.shape[-1], dtype=bool), axis=-2)
        out = jnp.where(keep, lam_xn, jnp.zeros_like(lam_xn))
    if config.enable_softmax_topk:
        nonzero = out != 0
        soft = jax.nn.softmax(jnp.where(nonzero, out, -jnp.inf), axis=-1)
        out = jnp.where(nonzero, soft, jnp.zeros_like(out))
    return out


def stack(spec: Spec | Sequence[Spec], experts: Sequence[dict]) -> dict:
    """The experts (``lora`` adapter trees, same targets) as one pool (`lorajax.multi_adapter.stack_adapters`)."""
    if len(experts) < 1:
        raise ValueError("X-LoRA needs at least one expert adapter")
    return stack_adapters(spec, experts)


def _xlora_apply(x2d: jax.Array, w: jax.Array, entry: dict, t, ctx: Any = None, *, weight: float) -> jax.Array:
    """``x W + g Σ_i s_i λ_i (x A_i) B_i`` on ``x [T, in]`` with ``entry["lam"] [T, n]``."""
    a, b, s, lam = entry["lora_A"], entry["lora_B"], entry["scale"], entry["lam"]
    if lam.shape[0] != x2d.shape[0]:
        raise ValueError(
            f"X-LoRA: module {t.name} sees {x2d.shape[0]} token rows but the scalings cover {lam.shape[0]} "
            "(the model must flatten tokens batch-major, [B·S, in])"
        )
    xa_Txnxr = jnp.einsum("ti,nir->tnr", x2d, a.astype(x2d.dtype))
    coef_Txn = (lam * (s * weight)[None, :]).astype(x2d.dtype)
    return x2d @ w + jnp.einsum("tnr,nro->to", xa_Txnxr * coef_Txn[:, :, None], b.astype(x2d.dtype))


def _hidden_of(apply_fn: Callable) -> Callable:
    """The default last-hidden-state call: ``apply_fn(..., return_hidden=True)`` (lorajax's Llama)."""

    def hidden(params, *args, **kwargs):
        return apply_fn(params, *args, return_hidden=True, **kwargs)

    return hidden


def adapt(
    apply_fn: Callable,
    spec: Spec,
    config: Config,
    *,
    hidden_fn: Callable | None = None,
    module_order: Sequence[str] | None = None,
) -> Callable:
    """Wrap ``apply_fn(params, *a, **kw)`` as ``fn(params, pool, classifier, *a, **kw)``: X-LoRA's two passes.

    Args:
      apply_fn: a linen ``apply`` whose adapted layers are ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum``
        with token rows flattened batch-major (``[B·S, in]``, as lorajax's models do).
      spec: a ``lora`` `Spec` selecting the experts' targets (ranks and scales come from the pool).
      config: the X-LoRA `Config`.
      hidden_fn: ``(params, *a, **kw) -> h [B, S, D]``, the last hidden state (default: ``apply_fn(...,
        return_hidden=True)``, lorajax's Llama); it is intercepted like ``apply_fn`` when
        ``scaling_pass_value != 0``.
      module_order: torch registration order of the adapted modules' name suffixes, which numbers them for
        ``layerwise_scalings`` (default `lorajax.peft.TORCH_MODULE_ORDER`).

    The returned function takes keyword-only ``return_scalings=False`` (also return ``λ [B, S, L, n]``, before
    top-k) and ``dropout_rng=None`` (the classifier's dropout in training).
    """
    from lorajax.peft import TORCH_MODULE_ORDER

    registry.plain_lora(spec.variant, "X-LoRA experts")
    hidden_fn = hidden_fn or _hidden_of(apply_fn)
    order = tuple(module_order) if module_order is not None else TORCH_MODULE_ORDER
    variant = dataclasses.replace(
        lora.VARIANT, apply=functools.partial(_xlora_apply, weight=float(config.global_scaling_weight))
    )

    def call(fn, params, index, ordered, lam_BxSxLxn, args, kwargs):
        B, S = lam_BxSxLxn.shape[:2]
        table = {}
        for ell, t in enumerate(ordered):
            lam = select_top_k(config, lam_BxSxLxn[:, :, ell, :]).reshape(B * S, -1)
            table[t.name] = (t, {**index[t.keys], "lam": lam}, EVAL)
        used: set[str] = set()
        with nn.intercept_methods(make_interceptor(variant, table, used, {})):
            out = fn(params, *args, **kwargs)
        check_reached(table, used, "X-LoRA", "nn.Dense / nn.DenseGeneral / nn.Einsum")
        return out

    @functools.wraps(apply_fn)
    def xlora_fn(params, pool, classifier, *args, return_scalings=False, dropout_rng=None, **kwargs):
        selected, index, _ = resolve(spec, params, pool)
        ordered = layout_order(list(selected), order)
        counts = {entry["lora_A"].shape[0] for entry in index.values()}
        if len(counts) != 1:
            raise ValueError(f"X-LoRA: pool entries hold different numbers of experts {sorted(counts)}")
        (n,) = counts
        n_layers = len(ordered)
        _check_classifier(config, classifier, n, n_layers)
        ids = args[0] if args else None
        if ids is None or getattr(ids, "ndim", 0) != 2:
            raise ValueError("X-LoRA: the first positional argument must be the [B, S] token ids")
        B, S = ids.shape
        if config.scaling_pass_value == 0:  # the experts add nothing: the base model
            h = hidden_fn(params, *args, **kwargs)
        else:
            dummy = jnp.full((B, S, n_layers, n), config.scaling_pass_value, jnp.float32)
            h = call(hidden_fn, params, index, ordered, dummy, args, kwargs)
        h = jax.lax.stop_gradient(h)  # PEFT: the scaling pass runs under no_grad
        lam = classifier_scalings(config, classifier, h, n_layers, dropout_rng=dropout_rng)
        out = call(apply_fn, params, index, ordered, lam, args, kwargs)
        return (out, lam) if return_scalings else out

    return xlora_fn


def save(folder: str | os.PathLike, config: Config, classifier: Sequence[dict], expert_dirs: dict[str, str]) -> Path:
    """Write ``adapter_config.json`` (PEFT's ``XLoraConfig``, ``adapters`` = ``expert_dirs``, name -> a PEFT LoRA
    folder, e.g. from `lorajax.peft.save`) and ``adapter_model.safetensors`` (the classifier under PEFT's
    parameter names, torch layout ``weight [out, in]``)."""
    import safetensors.numpy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not expert_dirs:
        raise ValueError("X-LoRA save: no experts (expert_dirs is empty)")
    tensors = {}
    for j, layer in enumerate(classifier):
        tensors[f"{CLASSIFIER_PREFIX}{j}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        tensors[f"{CLASSIFIER_PREFIX}{j}.bias"] = np.asarray(layer["bias"])
    atomic.write_bytes(folder / WEIGHTS_NAME, safetensors.numpy.save(tensors))
    atomic.write_text(folder / CONFIG_NAME, json.dumps(config.to_peft(expert_dirs), indent=2))
    return folder


def load(folder: str | os.PathLike) -> tuple[Config, tuple, dict[str, str]]:
    """``(config, classifier, expert_dirs)`` from a folder written by `save` (PEFT's X-LoRA config and classifier
    names). Expert folders given relative to ``folder`` are resolved against it."""
    import safetensors.numpy

    folder = Path(folder)
    raw = read_object(folder / CONFIG_NAME, " (an X-LoRA folder written by lorajax.xlora.save)")
    config = Config.from_peft(raw)
    adapters = raw.get("adapters") or {}
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"{folder / CONFIG_NAME}: 'adapters' must map expert names to LoRA folders")
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no X-LoRA classifier weights")
    try:
        tensors = safetensors.numpy.load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    layers = []
    for j in range(config.xlora_depth):
        w, b = f"{CLASSIFIER_PREFIX}{j}.weight", f"{CLASSIFIER_PREFIX}{j}.bias"
        if w not in tensors or b not in tensors:
            raise ValueError(f"{path}: missing classifier tensor {w if w not in tensors else b}")
        layers.append({"kernel": jnp.asarray(tensors.pop(w).T), "bias": jnp.asarray(tensors.pop(b))})
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:3]}")
    dirs = {str(k): str(v if Path(v).is_absolute() else folder / v) for k, v in adapters.items()}
    return config, tuple(layers), dirs
