"""Place params, adapters, optimiser state and batches on a device mesh (XLA SPMD).

lorajax does not partition anything itself: it puts every array on a
``jax.sharding.NamedSharding`` and lets XLA's SPMD partitioner propagate the
shardings through the unchanged, single-device code (a jitted train step, the
adapted forward, generation). The mesh uses **Auto axes**
(``jax.sharding.AxisType.Auto``) deliberately: jax 0.10's explicit-sharding
mode (``AxisType.Explicit``, sharding in types) would require ``out_sharding``
annotations at the model's reshapes and einsums; with Auto axes the same model
code runs on one device and on a pod. ``jax.set_mesh(mesh)`` is not needed
(shardings come from the placed inputs) but is harmless.

Mesh axes (any subset, any order): ``data`` (batch), ``fsdp`` (batch and one
axis of every large weight: ZeRO-3 style), ``tensor`` (Megatron column/row
splits of attention and MLP).

Rules are an ordered list of ``(regex, PartitionSpec)``; a leaf's name is its
dict path joined by dots without the ``params`` collection, the same grammar
as `lorajax.Spec` targets plus the leaf name, e.g.
``model.layers.0.self_attn.q_proj.kernel``; ``re.fullmatch``, first rule wins.
Mesh axes a spec names but the mesh lacks are dropped, so one rule set serves
every mesh. Leaves no rule matches are replicated.

Adapters follow the weight they adapt (a rule on ``…q_proj.kernel`` also
places ``…q_proj.kernel.lora_A``): a factor axis of the weight's input size
(axis 0) takes the weight's input sharding, an axis of the output size (last)
its output sharding, the rank axis and everything else (vectors, VeRA's shared
projections) are replicated; a factor axis that the mesh does not divide is
replicated rather than an error (factors are small). Optimiser state leaves
(Adam's ``mu``/``nu``) carry the same dict path as their parameter and so get
the same sharding; counters are replicated. With ``like``, a state leaf whose
shape differs from its parameter's (GaLore's projector and low-rank moments,
8-bit Adam's per-block scales) is placed as an adapter factor of that weight
rather than by the weight's rule, which does not fit its shape.

A quantised kernel (`lorajax.quant.QuantizedArray`) is placed like the float
weight it encodes: the rule of the kernel's name (checked against its logical
shape) decides its codes' and scales' specs (see `_quantized_entries`: int8
codes as the kernel, int4 by input groups × outputs, NF4's flat arrays over
the mesh axes the weight uses), and adapters under it (``like=`` quantised
params) follow its logical ``[in, out]`` shape.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax import sharding
  >>> mesh = sharding.make_mesh("data=1,fsdp=-1")
  >>> mesh.axis_names
  ('data', 'fsdp')
  >>> params = {"model": {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.ones((4, 8))}}}}}}
  >>> placed = sharding.shard(params, mesh)
  >>> placed["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].sharding.spec
  P('fsdp', None)
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lorajax import paths
from lorajax.selection import Selection

__all__ = [
    "AXES",
    "make_mesh",
    "parse_mesh",
    "LLAMA_RULES",
    "BERT_RULES",
    "default_rules",
    "shardings",
    "shard",
    "shard_batch",
    "batch_sharding",
    "token_sharding",
    "leaf_name",
    "initialize",
]

#: mesh axis names lorajax's rules use
AXES = ("data", "fsdp", "tensor")

#: Llama-style decoders (lorajax.models.llama): FSDP over one axis of every matrix,
#: tensor parallelism column-wise for q/k/v/gate/up and row-wise for o/down.
LLAMA_RULES: tuple = (
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel", P("fsdp", "tensor")),
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias", P("tensor")),
    (r".*(o_proj|down_proj)\.kernel", P("tensor", "fsdp")),
    (r".*embed_tokens\.embedding", P("tensor", "fsdp")),
    (r".*lm_head\.kernel", P("fsdp", "tensor")),
)

#: BERT-style encoders (lorajax.models.bert).
BERT_RULES: tuple = (
    (r".*attention\.self\.(query|key|value)\.kernel", P("fsdp", "tensor")),
    (r".*attention\.self\.(query|key|value)\.bias", P("tensor")),
    (r".*intermediate\.dense\.kernel", P("fsdp", "tensor")),
    (r".*intermediate\.dense\.bias", P("tensor")),
    (r".*(attention\.output|layer\.\d+\.output)\.dense\.kernel", P("tensor", "fsdp")),
    (r".*word_embeddings\.embedding", P("tensor", "fsdp")),
)


def parse_mesh(axes: str | dict[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=4"`` (or a dict) -> ``{"data": 2, "fsdp": 4}``; one size may be -1 (the rest)."""
    if isinstance(axes, str):
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in axes.split(","))):
            name, sep, size_text = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"mesh {axes!r}: expected 'name=size,...', got {part!r}")
            try:
                out[name.strip()] = int(size_text)
            except ValueError:
                raise ValueError(
                    f"mesh {axes!r}: size of axis {name.strip()!r} must be an int, got {size_text!r}"
                ) from None
        axes = out
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"mesh must be 'name=size,...' or a non-empty dict, got {axes!r}")
    for name, size in axes.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"mesh axis name {name!r} is not an identifier")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r}: size must be a positive int or -1, got {size!r}")
    if sum(1 for s in axes.values() if s == -1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may be -1")
    return dict(axes)


def make_mesh(axes: str | dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with Auto axes over ``devices`` (default: all, e.g. every host's in a multi-host job).

    ``axes``: ``"data=2,fsdp=4"`` or ``{"data": 2, "fsdp": 4}``; one size may
    be ``-1`` (whatever is left). The sizes must multiply to the device count.
    """
    sizes = parse_mesh(axes)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n % known:
            raise ValueError(f"mesh {sizes}: {n} devices are not a multiple of {known}")
        sizes = {k: (n // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are {n} "
            f"({jax.process_count()} process(es)); use -1 for one axis to fill"
        )
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


#: a leaf's dotted dict path, as partition rules match it (see `lorajax.paths.dict_path`)
leaf_name = paths.dict_path


def default_rules(tree: Any) -> tuple:
    """`LLAMA_RULES` or `BERT_RULES` by the names found in ``tree``, else no rules (replicate)."""
    names = [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for rules in (LLAMA_RULES, BERT_RULES):
        if any(re.fullmatch(rx, n) for rx, _ in rules for n in names):
            return rules
    return ()


def _fit(spec: P, mesh: Mesh, ndim: int) -> tuple:
    """The spec's entries with axes the mesh lacks dropped, padded to ``ndim``."""
    entries = list(spec) + [None] * (ndim - len(spec))
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the array has axes ({ndim})")
    out = []
    for e in entries:
        axes = (e,) if isinstance(e, str) else tuple(e or ())
        kept = tuple(a for a in axes if a in mesh.shape)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return tuple(out)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))


def _derived(weight_entries: tuple, weight_shape: tuple, leaf_shape: tuple, mesh: Mesh) -> tuple:
    """An adapter leaf's spec from its weight's: input axis first, output axis last, rest replicated."""
    if len(weight_shape) < 2 or len(leaf_shape) < 2:
        return (None,) * len(leaf_shape)
    out = [None] * len(leaf_shape)
    n_in, n_out = weight_shape[0], weight_shape[-1]
    if leaf_shape[0] == n_in and weight_entries[0] is not None:
        out[0] = weight_entries[0]
    if leaf_shape[-1] == n_out and weight_entries[-1] is not None:
        out[-1] = weight_entries[-1]
    return tuple(e if leaf_shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(out))


def _quantized_entries(
    kind: str, field: str, weight_entries: tuple, weight_shape: tuple, leaf_shape: tuple, sizes: Any
) -> tuple:
    """The spec entries of one array of a `lorajax.quant.QuantizedArray`, from its weight's.

    ``weight_entries`` are the rule's entries for the logical kernel ``weight_shape`` (``[*in, *out]``);
    ``sizes`` maps mesh axis names to sizes. ``int8``: ``codes`` (the kernel's shape) take the weight's
    entries, ``scales`` (its output axes) the trailing ones. ``int4`` (``codes [G·g/2, out]``, ``scales
    [G, out]``): the weight's first entry on axis 0, its last on the last axis. ``nf4`` (``codes`` the
    flattened PyTorch ``[out, in]``, ``scales [nb]``): one axis over every mesh axis the weight's entries
    name. ``scales2`` / ``offset`` and any axis the mesh does not divide: replicated.
    """
    out: list[Any] = [None] * len(leaf_shape)
    if kind == "int8" and field == "codes":
        out = list(weight_entries)
    elif kind == "int8" and field == "scales":
        out = list(weight_entries[len(weight_shape) - len(leaf_shape) :])
    elif kind == "int4" and field in ("codes", "scales") and len(leaf_shape) == 2:
        out = [weight_entries[0], weight_entries[-1]]
    elif kind == "nf4" and field in ("codes", "scales") and len(leaf_shape) == 1:
        axes = [a for e in weight_entries if e is not None for a in ((e,) if isinstance(e, str) else e)]
        out = [None if not axes else axes[0] if len(axes) == 1 else tuple(axes)]

    def size(e: Any) -> int:
        return 1 if e is None else math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e))

    return tuple(e if leaf_shape[i] % size(e) == 0 else None for i, e in enumerate(out))


_QUANTIZED_FIELDS = ("codes", "scales", "scales2", "offset")


def _quantized_shardings(q: Any, entries: tuple, mesh: Mesh) -> Any:
    """``q`` (a `lorajax.quant.QuantizedArray`) with a ``NamedSharding`` in place of each of its arrays."""
    new = {}
    for field in _QUANTIZED_FIELDS:
        x = getattr(q, field)
        if x is not None:
            spec = _quantized_entries(q.kind, field, entries, q.shape, tuple(np.shape(x)), mesh.shape)
            new[field] = NamedSharding(mesh, P(*spec))
    return q.replace(**new)


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{dotted name: shape}``; a quantised kernel counts as one leaf of its logical shape."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=paths.is_quantized)[0]
    return {leaf_name(p): tuple(x.shape if paths.is_quantized(x) else np.shape(x)) for p, x in flat}


def shardings(
    tree: Any, mesh: Mesh, rules: Iterable | None = None, *, like: Any = None, strict: bool | None = None
) -> Any:
    """A tree of ``NamedSharding`` like ``tree`` (arrays or ``ShapeDtypeStruct``s).

    Args:
      tree: params, adapters, optimiser state, or a tuple/dict of them.
      mesh: from `make_mesh`.
      rules: ordered ``(pattern, PartitionSpec)`` pairs; a pattern is a regex
        (``re.fullmatch`` on the leaf's dotted name) or a `lorajax.Selection`
        (the kernels it selects, with the grammar of a Spec's targets); None =
        `default_rules` (of ``like`` when given, else of ``tree``).
      like: the base params, when ``tree`` holds adapters (or their optimiser
        state) without the weights: adapter factors then follow their weight.
      strict: raise if a rule matches no leaf (default: True for rules you pass).

    Raises:
      ValueError naming the leaf when a rule's mesh axes do not divide its
      dimension, or (strict) naming a rule that matches nothing.
    """
    if rules is None:
        rules, strict = default_rules(tree if like is None else like), bool(strict)
    elif strict is None:
        strict = True
    rules = [
        (_matcher(rx, tree if like is None else like), spec if isinstance(spec, P) else P(*spec)) for rx, spec in rules
    ]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=paths.is_quantized)
    like_shapes = {} if like is None else _shapes(like)
    weights = _shapes(tree) if like is None else {**like_shapes, **_shapes(tree)}
    used = [False] * len(rules)

    def rule_for(name: str):
        for i, ((_, matches), spec) in enumerate(rules):
            if matches(name):
                used[i] = True
                return spec
        return None

    out = []
    for path, leaf in leaves:
        name = leaf_name(path)
        shape = tuple(leaf.shape if paths.is_quantized(leaf) else np.shape(leaf))
        spec = rule_for(name) if name else None
        entries = (None,) * len(shape)
        if spec is not None and like_shapes.get(name, shape) != shape:
            # optimiser state of another shape under a weight's path (GaLore's projector and low-rank
            # moments, 8-bit Adam's block scales): follow the weight as an adapter factor does
            w_shape = like_shapes[name]
            entries = _derived(_fit(spec, mesh, len(w_shape)), w_shape, shape, mesh)
        elif spec is not None:
            entries = _fit(spec, mesh, len(shape))
            for dim, (size, e) in enumerate(zip(shape, entries)):
                if size % _axis_size(mesh, e):
                    raise ValueError(
                        f"{name}: dimension {dim} of shape {shape} is not divisible by mesh axis "
                        f"{e} of size {_axis_size(mesh, e)} (rule {spec})"
                    )
        else:  # an adapter leaf (or its optimiser state) under a weight: follow the weight
            parts = name.split(".")
            for cut in range(len(parts) - 1, 0, -1):
                parent = ".".join(parts[:cut])
                if parent in weights and parent != name:
                    spec_w = rule_for(parent)
                    if spec_w is not None:
                        w_shape = weights[parent]
                        entries = _derived(_fit(spec_w, mesh, len(w_shape)), w_shape, shape, mesh)
                    break
        if paths.is_quantized(leaf):  # its codes and scales placed like the (logical) weight they encode
            out.append(_quantized_shardings(leaf, entries, mesh))
        else:
            out.append(NamedSharding(mesh, P(*entries)))
    if strict:
        unused = [rules[i][0][0] for i, u in enumerate(used) if not u]
        if unused:
            raise ValueError(f"sharding rule(s) {unused} match no leaf (leaf names look like {list(weights)[:3]})")
    return jax.tree_util.tree_unflatten(treedef, out)


def _matcher(pattern: Any, tree: Any) -> tuple[Any, Callable[[str], bool]]:
    """``(label, matches(leaf name))`` of a rule's pattern: a regex, or a `Selection` resolved on ``tree``."""
    if isinstance(pattern, Selection):
        try:
            weights = pattern.resolve(tree)
        except ValueError:  # selects nothing here: the rule is unused (strict mode names it)
            weights = []
        names = {".".join(w.keys[1:] if w.keys[0] == "params" else w.keys) for w in weights}
        return pattern, names.__contains__
    rx = re.compile(pattern)
    return pattern, lambda name: rx.fullmatch(name) is not None


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place ``x`` (the same global value on every process) with ``sharding``, multi-host too."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # each process supplies the slices its own devices hold
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard(tree: Any, mesh: Mesh, rules: Iterable | None = None, *, like: Any = None) -> Any:
    """Place every leaf of ``tree`` with `shardings` (same arguments).

    In a multi-host job every process passes the same (global) values, e.g.
    the params each host loaded from the checkpoint; each keeps only its shards.
    """
    return jax.tree.map(_put, tree, shardings(tree, mesh, rules, like=like))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over the mesh's ``data`` and ``fsdp`` axes, the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


def token_sharding(mesh: Mesh) -> NamedSharding:
    """``[tokens, features]`` activations: tokens over ``data`` × ``fsdp``, features replicated.

    Pass it to a model's ``token_sharding`` (`lorajax.models.llama`) so that
    FSDP gathers weights, not activations.
    """
    return batch_sharding(mesh, 2)


def shard_batch(batch: Any, mesh: Mesh, *, local: bool = False) -> Any:
    """Put a batch with its leading axis split over ``data`` × ``fsdp``.

    ``local=False``: ``batch`` is the global batch (the same on every process).
    ``local=True`` (multi-host data loading): each process passes only its own
    rows, ``global batch / process_count`` of them, and the global array is
    assembled with ``jax.make_array_from_process_local_data``.
    Raises ValueError when the batch size is not divisible by data × fsdp.
    """
    n = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)

    def put(x):
        if x is None:
            return None
        if not isinstance(x, jax.Array) or not x.is_fully_addressable:
            x = np.asarray(x)
        if x.ndim == 0:
            return _put(x, NamedSharding(mesh, P()))
        rows = x.shape[0] * (jax.process_count() if local else 1)
        if rows % n:
            raise ValueError(f"batch size {rows} is not divisible by data x fsdp = {n}")
        if local:
            return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), np.asarray(x))
        return _put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """Start a multi-host job: ``jax.distributed.initialize`` (once, before any other jax call).

    On TPU pods and under SLURM (and other clusters jax detects) call it with
    no arguments; elsewhere give the coordinator ``host:port``, the number of
    processes and this process's id. On CPU hosts the cross-process
    collectives use ``cpu_collectives`` (gloo). After it, ``jax.devices()``
    lists every process's devices and `make_mesh` spans them all.
    """
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    given = (("coordinator_address", coordinator_address), ("num_processes", num_processes), ("process_id", process_id))
    kwargs: dict[str, Any] = {k: v for k, v in given if v is not None}
    jax.distributed.initialize(**kwargs)
