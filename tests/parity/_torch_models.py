"""Helpers for the PEFT parity tests: a tiny torch model, its linen twin, and weight transfer.

The torch model has module names like PEFT sees on a Hugging Face decoder
(``model.layers.0.q_proj``). Its linen twin has the same parameter paths
(``params/model/layers/0/q_proj/kernel``) with ``style="dot"``, or linen's
list naming (``params/model/layers_0/q_proj/kernel``) with
``style="underscore"``. Weights cross the boundary transposed: torch
``weight [out, in]`` is the Flax ``kernel [in, out]``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from torch import nn  # noqa: E402

import lorajax  # noqa: E402

D_MODEL, D_HIDDEN, VOCAB = 16, 24, 12
#: Per-layer ``use_bias``: layer 0 has biases, layer 1 has none.
BIASES = (True, False)
#: Relative tolerance of every comparison (float32 on both sides).
TOL = 1e-5


# ----------------------------------------------------------------------------- torch side
class TorchBlock(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(D_MODEL, D_HIDDEN, bias=bias)
        self.v_proj = nn.Linear(D_MODEL, D_HIDDEN, bias=bias)
        self.o_proj = nn.Linear(D_HIDDEN, D_MODEL, bias=bias)

    def forward(self, x):
        return x + self.o_proj(torch.relu(self.q_proj(x) + self.v_proj(x)))


class TorchInner(nn.Module):
    def __init__(self, biases):
        super().__init__()
        self.layers = nn.ModuleList([TorchBlock(b) for b in biases])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TorchNet(nn.Module):
    """``model.layers.{i}.{q,v,o}_proj`` (+ ``lm_head`` with ``head=True``)."""

    def __init__(self, biases=BIASES, head: bool = False):
        super().__init__()
        self.model = TorchInner(biases)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False) if head else None

    def forward(self, x):
        h = self.model(x)
        return self.lm_head(h) if self.lm_head is not None else h


def make_torch_net(seed: int = 0, **kw) -> TorchNet:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = TorchNet(**kw)
    with torch.no_grad():  # non-zero biases, so that dropping one would show
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return net.eval()


# ----------------------------------------------------------------------------- linen twin
class FlaxBlock(fnn.Module):
    bias: bool

    @fnn.compact
    def __call__(self, x):
        q = fnn.Dense(D_HIDDEN, use_bias=self.bias, name="q_proj")(x)
        v = fnn.Dense(D_HIDDEN, use_bias=self.bias, name="v_proj")(x)
        return x + fnn.Dense(D_MODEL, use_bias=self.bias, name="o_proj")(fnn.relu(q + v))


class FlaxLayerList(fnn.Module):
    """Blocks named ``"0"``, ``"1"``, ... so that paths equal torch's ModuleList names."""

    biases: tuple

    @fnn.compact
    def __call__(self, x):
        for i, b in enumerate(self.biases):
            x = FlaxBlock(b, name=str(i))(x)
        return x


class FlaxInner(fnn.Module):
    biases: tuple
    style: str

    @fnn.compact
    def __call__(self, x):
        if self.style == "dot":
            return FlaxLayerList(self.biases, name="layers")(x)
        for i, b in enumerate(self.biases):
            x = FlaxBlock(b, name=f"layers_{i}")(x)
        return x


class FlaxNet(fnn.Module):
    biases: tuple = BIASES
    head: bool = False
    style: str = "dot"  # "dot": model.layers.0.q_proj; "underscore": model.layers_0.q_proj

    @fnn.compact
    def __call__(self, x):
        h = FlaxInner(tuple(self.biases), self.style, name="model")(x)
        return fnn.Dense(VOCAB, use_bias=False, name="lm_head")(h) if self.head else h


def plain_forward(params, x, biases=BIASES):
    """The same network as a plain function of a bare (non-linen) params dict."""

    def dense(p, h):
        y = h @ p["kernel"]
        return y + p["bias"].reshape((1,) * (y.ndim - 1) + (-1,)) if "bias" in p else y

    for i in range(len(biases)):
        blk = params["model"]["layers"][str(i)]
        x = x + dense(blk["o_proj"], jax.nn.relu(dense(blk["q_proj"], x) + dense(blk["v_proj"], x)))
    return x


# ----------------------------------------------------------------------------- names and transfer
def flax_name(torch_name: str, style: str = "dot") -> str:
    return torch_name if style == "dot" else re.sub(r"\blayers\.(\d+)\b", r"layers_\1", torch_name)


def torch_name(lorajax_name: str) -> str:
    return re.sub(r"\blayers_(\d+)\b", r"layers.\1", lorajax_name)


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def linear_weights(module) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{name: (W [out, in], b or None)}`` for every Linear, looking through PEFT wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrappers = {}, []
    for name, mod in module.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # base_layer, lora_A.default, ... inside a PEFT layer
        if isinstance(mod, BaseTunerLayer):
            wrappers.append(name)
            mod = mod.get_base_layer()
        if isinstance(mod, nn.Linear):
            out[name] = (to_np(mod.weight), None if mod.bias is None else to_np(mod.bias))
    return out


def flax_variables(module, style: str = "dot") -> dict:
    """Linen ``{"params": ...}`` with every torch Linear's weight transposed into ``kernel``."""
    params: dict = {}
    for name, (w, b) in linear_weights(module).items():
        node = params
        for k in flax_name(name, style).split("."):
            node = node.setdefault(k, {})
        node["kernel"] = jnp.asarray(w.T)
        if b is not None:
            node["bias"] = jnp.asarray(b)
    return {"params": params}


def get_leaf_dict(tree: dict, keys: tuple) -> dict:
    node = tree
    for k in keys:
        node = node[k]
    return node


def set_adapter(adapters: dict, keys: tuple, values: dict) -> dict:
    """Copy of ``adapters`` with the leaves at ``keys`` replaced; shapes must not change."""
    old = get_leaf_dict(adapters, keys)
    assert set(values) == set(old), (keys, sorted(values), sorted(old))
    new = {}
    for k, v in values.items():
        v = jnp.asarray(v, old[k].dtype)
        assert v.shape == old[k].shape, (keys, k, v.shape, old[k].shape)
        new[k] = v
    out = dict(adapters)
    node = out
    for k in keys[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[keys[-1]] = new
    return out


def peft_module(peft_model, name: str):
    return peft_model.base_model.model.get_submodule(torch_name(name))


def peft_adapted_names(peft_model) -> list[str]:
    """Module names (relative to the wrapped model) that PEFT put an adapter on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer))


def lorajax_names(spec, variables) -> list[str]:
    return sorted(torch_name(t.name) for t in lorajax.select(spec, variables))


def import_lora(spec, variables, peft_model, *, dora: bool = False) -> dict:
    """lorajax adapters (made by ``lorajax.init``) overwritten with PEFT's LoRA / DoRA values."""
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    structure = jax.tree_util.tree_structure(adapters)
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        values = {
            "lora_A": to_np(mod.lora_A["default"].weight).T,  # [r, in] -> [in, r]
            "lora_B": to_np(mod.lora_B["default"].weight).T,  # [out, r] -> [r, out]
        }
        if dora:
            values["magnitude"] = to_np(mod.lora_magnitude_vector["default"].weight)
        adapters = set_adapter(adapters, t.keys, values)
    assert jax.tree_util.tree_structure(adapters) == structure
    return adapters


# ----------------------------------------------------------------------------- comparisons
def assert_close(actual, desired, tol: float = TOL, what: str = ""):
    """``|a - d| <= tol * (|d| + max|d|)``: relative, with the scale of the whole array as floor."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
    scale = max(float(np.max(np.abs(desired))) if desired.size else 0.0, 1e-30)
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale, err_msg=what)


def assert_weights_match(variables, torch_module, style: str = "dot"):
    """Every kernel/bias of ``variables`` equals the torch Linear weights (transposed), and no extras."""
    weights = linear_weights(torch_module)
    params = variables["params"] if "params" in variables else variables
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        name = torch_name(".".join(keys[:-1]))
        w, b = weights[name]
        if keys[-1] == "kernel":
            assert_close(leaf, w.T, what=f"{name}.kernel")
        else:
            assert keys[-1] == "bias" and b is not None, (name, keys)
            assert_close(leaf, b, what=f"{name}.bias")
        seen.add(name)
    assert seen == set(weights), sorted(set(weights) ^ seen)


def torch_out(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return to_np(model(torch.from_numpy(x)))


def inputs(seed: int = 0, shape=(3, 5, D_MODEL)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
