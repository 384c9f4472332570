"""Ordered target rules: per-group rank, alpha and learning rate; LoRA, full training or frozen per module.

CDDM (Liu et al., ECCV 2024, arXiv 2503.06973; official code UnicomAI/UnicomBenchmark
``CDDMBench/Qwen-VL/finetune.py``) trains LoRA on a VLM's vision encoder, projector
and language model at once. What such a recipe needs from the library:

* `Rules`: an ordered list of `Rule` (``match``, ``group``, ``kind``, ``rank``,
  ``alpha``, ``lr_mult``); the **first** rule whose ``match`` selects a module
  claims it (a Python list, so no set-order pairing of patterns and scales).
  ``match`` is the `lorajax.selection` grammar on dotted module names (the
  params path without ``params`` and the leaf name): a list of PEFT-style
  suffixes (``["q_proj", "attn.out_proj"]``), a regex (``re.fullmatch``), or
  ``"all-linear"``. Modules no rule claims are frozen.
* ``kind``: ``"lora"`` (an adapter on the module's weight: a ``kernel`` with >= 2
  axes or a table named by a suffix list; its bias stays frozen, PEFT's
  ``bias="none"``), ``"full"`` (every leaf of the module trained: kernels,
  biases, LayerNorm scales) or ``"frozen"``. The partition is explicit: nothing
  later re-freezes a group (the ``fix_vit`` / PEFT conflict in CDDM's script).
* `Rules.apply` compiles the LoRA rules into **one** `lorajax.Spec` whose
  ``targets`` are the claimed module names and whose ``rank_pattern`` /
  ``alpha_pattern`` hold each module's rank and alpha (``^name`` keys, so a
  module's entry never matches a longer name ending in it), so `lorajax.init`,
  `lorajax.adapt`, `lorajax.merge` and `lorajax.peft.save` work unchanged.
* Labels ``{group}/{role}`` over the trainable tree ``{"lora": adapters,
  "full": leaves}``: role ``A`` / ``B`` (`lorajax.optim.labels.ROLES`) for
  adapter factors, ``full`` for fully trained leaves; `grouped_tx` makes one
  ``optax.multi_transform`` with ``lr · mult`` per label (LoRA+ is
  ``mults={"lm/B": 16}``).
* `Report`: module names per rule, trainable counts per group, rules that
  matched nothing (``strict=True``: ValueError naming the rule).

Shapes: a LoRA factor of a kernel ``[in, out]`` is ``lora_A: [in, r]``,
``lora_B: [r, out]``; a LoRA rule with rank ``r`` over modules ``i`` adds
``Σ_i r · (in_i + out_i)`` trainable parameters.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from lorajax.groups import Rule, Rules, grouped_tx
  >>> params = {"params": {"vision": {"kernel": jnp.ones((4, 4))}, "lm": {"kernel": jnp.ones((4, 4))}}}
  >>> rules = Rules([Rule(["vision"], "vision", rank=2, lr_mult=0.1), Rule(["lm"], "lm", rank=1)])
  >>> g = rules.apply(params, jax.random.key(0))
  >>> g.report.counts
  {'vision': 16, 'lm': 8}
  >>> tx = grouped_tx(g.labels, optax.sgd, 1e-2, rules.mults())
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from lorajax import adapters as adapters_lib
from lorajax import paths
from lorajax.optim.labels import ROLES
from lorajax.selection import EMBEDDING_NAMES, check_targets, matches
from lorajax.spec import Spec

__all__ = ["Rule", "Rules", "Grouping", "Report", "grouped_tx", "overlay", "KINDS", "FROZEN"]

#: the kinds a rule can give its modules
KINDS = ("lora", "full", "frozen")
#: the label of leaves that get no update (`grouped_tx` gives them ``optax.set_to_zero()``)
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
    """One ordered rule: modules ``match`` selects (and no earlier rule claimed) join ``group``.

    Args:
      match: suffix list, regex or ``"all-linear"`` (the `lorajax.selection` grammar).
      group: a name for the group (no ``/``); several rules may share one (same ``lr_mult``).
      rank, alpha: the LoRA rank ``r`` and ``α`` of this rule's modules (``kind="lora"``).
      lr_mult: the group's learning-rate multiplier (`grouped_tx`), finite and >= 0.
      kind: ``"lora"``, ``"full"`` or ``"frozen"``.
      variant, **options: the adapter variant and its options; every LoRA rule of one
        `Rules` must agree on them (they compile into one `lorajax.Spec`).

    Raises:
      ValueError: a bad kind, group, rank, alpha or lr_mult, naming it.
    """

    match: Any
    group: str
    rank: int
    alpha: float
    lr_mult: float
    kind: str
    variant: str
    options: tuple

    def __init__(
        self,
        match: str | Sequence[str],
        group: str,
        rank: int = 8,
        alpha: float = 8.0,
        lr_mult: float = 1.0,
        kind: str = "lora",
        variant: str = "lora",
        **options: Any,
    ):
        if kind not in KINDS:
            raise ValueError(f"Rule kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(group, str) or not group or "/" in group or group == FROZEN:
            raise ValueError(f"Rule group must be a non-empty name without '/' and not {FROZEN!r}, got {group!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"Rule {group!r}: rank must be a positive int, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"Rule {group!r}: alpha must be a finite number, got {alpha!r}")
        if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or not (0 <= lr_mult < math.inf):
            raise ValueError(f"Rule {group!r}: lr_mult must be a finite number >= 0, got {lr_mult!r}")
        set_ = object.__setattr__
        set_(self, "match", check_targets(match, "match"))
        set_(self, "group", group)
        set_(self, "rank", rank)
        set_(self, "alpha", float(alpha))
        set_(self, "lr_mult", float(lr_mult))
        set_(self, "kind", kind)
        set_(self, "variant", variant)
        set_(self, "options", tuple(sorted(options.items())))

    def describe(self) -> str:
        """A short name for messages and reports: ``group:kind:match``."""
        what = self.match if isinstance(self.match, str) else list(self.match)
        return f"{self.group}:{self.kind}:{what}"


@dataclasses.dataclass(frozen=True)
class Report:
    """The dry run of `Rules.apply`.

    Attributes:
      matched: ``{rule.describe(): [module names]}`` in rule order.
      counts: ``{group: trainable parameter count}`` (adapter factors + fully trained leaves).
      unmatched_rules: descriptions of rules that claimed nothing.
      frozen: module names no trainable rule claimed.
    """

    matched: dict
    counts: dict
    unmatched_rules: list
    frozen: list

    def table(self) -> str:
        """A markdown table: rule, modules matched, and the group's trainable count."""
        rows = ["| rule | modules | group trainable |", "|---|---|---|"]
        for rule, names in self.matched.items():
            group = rule.split(":", 1)[0]
            rows.append(f"| `{rule}` | {len(names)} | {self.counts.get(group, 0):,} |")
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """What `Rules.apply` gives.

    Attributes:
      spec: the compiled `lorajax.Spec` of the LoRA rules (None when there are none).
      adapters: `lorajax.init`'s adapter tree for ``spec`` (``{}`` when none).
      full: the fully trained leaves, a nested dict in ``params``' layout (``{}`` when none).
      labels: ``{"lora": ..., "full": ...}`` like `trainable`, each leaf ``"{group}/{role}"``.
      param_labels: a tree like ``params``: ``"{group}/full"`` or ``"frozen"`` per leaf.
      report: the `Report`.
    """

    spec: Spec | None
    adapters: Any
    full: Any
    labels: Any
    param_labels: Any
    report: Report

    @property
    def trainable(self) -> dict:
        """``{"lora": trainable adapter leaves (None at frozen buffers), "full": full}``: differentiate this."""
        lora = adapters_lib.partition(self.spec, self.adapters)[0] if self.spec is not None else {}
        return {"lora": lora, "full": self.full}

    def unpack(self, params: Any, trainable: Any) -> tuple[Any, Any]:
        """``(params with the fully trained leaves put in, adapters)`` from a ``trainable`` tree."""
        adapters = trainable["lora"]
        if self.spec is not None:
            adapters = adapters_lib.combine(adapters, adapters_lib.partition(self.spec, self.adapters)[1])
        return overlay(params, trainable["full"]), adapters


def overlay(params: Any, sub: Any) -> Any:
    """``params`` with the leaves of ``sub`` (a nested dict in the same layout, a subset of its paths) put in."""
    if not isinstance(sub, Mapping) or not sub:
        return params if isinstance(sub, Mapping) else sub
    out = dict(params)
    for k, v in sub.items():
        if k not in out:
            raise ValueError(f"overlay: key {k!r} is not in params (keys: {sorted(out)[:8]})")
        out[k] = overlay(out[k], v)
    return out


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for keys, leaf in flat.items():
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return tree


def _size(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape"))


class Rules:
    """An ordered sequence of `Rule`; the first rule matching a module claims it.

    Raises:
      ValueError: no rules; two rules of one group with different ``lr_mult``;
        LoRA rules that disagree on variant or options.
    """

    def __init__(self, rules: Sequence[Rule]):
        rules = list(rules)
        if not rules:
            raise ValueError("Rules needs at least one Rule")
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"Rules takes Rule objects, got {type(r).__name__}")
        mults: dict[str, float] = {}
        for r in rules:
            if mults.setdefault(r.group, r.lr_mult) != r.lr_mult:
                raise ValueError(f"group {r.group!r} has two lr_mult values: {mults[r.group]} and {r.lr_mult}")
        lora = [r for r in rules if r.kind == "lora"]
        for r in lora[1:]:
            if (r.variant, r.options) != (lora[0].variant, lora[0].options):
                raise ValueError(
                    f"LoRA rules must share variant and options (one Spec): {lora[0].describe()} has "
                    f"{lora[0].variant} {dict(lora[0].options)}, {r.describe()} has {r.variant} {dict(r.options)}"
                )
        self.rules = tuple(rules)

    def mults(self) -> dict[str, float]:
        """``{group: lr_mult}`` for `grouped_tx`."""
        return {r.group: r.lr_mult for r in self.rules}

    def claim(self, params: Any) -> list[tuple[Rule | None, tuple, str, list]]:
        """Per module in pytree order: ``(rule or None, module keys, name, [(leaf keys, leaf)])``."""
        only_params = paths.is_variables(params)
        modules: dict[tuple, list] = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            keys = paths.key_names(path)
            if only_params and keys[0] != "params":
                continue
            modules.setdefault(keys[:-1], []).append((keys, leaf))
        out: list[tuple[Rule | None, tuple, str, list]] = []
        for mkeys, leaves in modules.items():
            name = paths.module_name(mkeys + ("",))
            weight = [
                (k, x)
                for k, x in leaves
                if (k[-1] in paths.WEIGHT_NAMES and getattr(x, "ndim", 0) >= 2)
                or (k[-1] in EMBEDDING_NAMES and getattr(x, "ndim", 0) == 2)
            ]
            owner = None
            for rule in self.rules:
                if rule.kind == "lora":
                    if weight and matches(rule.match, name, weight[0][1].ndim, weight[0][0][-1] in EMBEDDING_NAMES):
                        owner = rule
                        break
                else:
                    ndim = weight[0][1].ndim if weight else max(getattr(x, "ndim", 0) for _, x in leaves)
                    if matches(rule.match, name, ndim, bool(weight) and weight[0][0][-1] in EMBEDDING_NAMES):
                        owner = rule
                        break
            out.append((owner, mkeys, name, leaves))
        return out

    def apply(self, params: Any, key: jax.Array | int, *, strict: bool = True) -> Grouping:
        """Claim modules, compile the LoRA rules into one Spec, init its adapters, label everything.

        Args:
          params: linen params or variables (only ``params`` is searched).
          key: PRNG key or int seed for `lorajax.init`.
          strict: raise for a rule that matched nothing.

        Raises:
          ValueError: (strict) a rule that matched nothing, naming it and the module names found.
        """
        claimed = self.claim(params)
        matched: dict[str, list[str]] = {r.describe(): [] for r in self.rules}
        lora_names: dict[str, Rule] = {}
        full_flat: dict[tuple, Any] = {}
        full_group: dict[tuple, str] = {}
        frozen: list[str] = []
        for rule, _, name, leaves in claimed:
            if rule is None:
                frozen.append(name)
                continue
            matched[rule.describe()].append(name)
            if rule.kind == "lora":
                lora_names[name] = rule
            elif rule.kind == "full":
                for k, x in leaves:
                    full_flat[k] = x
                    full_group[k] = rule.group
            else:
                frozen.append(name)
        unmatched = [d for d, names in matched.items() if not names]
        if strict and unmatched:
            shown = [n for _, _, n, _ in claimed][:16]
            raise ValueError(f"rules matched nothing: {unmatched}. Modules found: {shown}")

        spec, adapters = self._spec(params, lora_names), {}
        if spec is not None:
            adapters = adapters_lib.init(spec, params, key)
        lora_labels = self._lora_labels(spec, adapters, lora_names)
        full = _nest(full_flat)
        labels = {"lora": lora_labels, "full": _nest({k: f"{full_group[k]}/full" for k in full_flat})}

        def param_label(path, _):
            keys = paths.key_names(path)
            return f"{full_group[keys]}/full" if keys in full_group else FROZEN

        param_labels = jax.tree_util.tree_map_with_path(param_label, params)
        counts = {r.group: 0 for r in self.rules if r.kind != "frozen"}
        trainable = adapters_lib.partition(spec, adapters)[0] if spec is not None else {}
        for (path, leaf), lab in zip(
            jax.tree_util.tree_flatten_with_path(trainable)[0], jax.tree_util.tree_leaves(lora_labels)
        ):
            counts[lab.split("/")[0]] += math.prod(leaf.shape)
        for k, x in full_flat.items():
            counts[full_group[k]] += math.prod(x.shape)
        report = Report(matched=matched, counts=counts, unmatched_rules=unmatched, frozen=frozen)
        return Grouping(spec, adapters, full, labels, param_labels, report)

    def _spec(self, params: Any, lora_names: dict[str, Rule]) -> Spec | None:
        if not lora_names:
            return None
        first = next(iter(lora_names.values()))
        tables = [n for n in lora_names if _is_table(params, n)]
        # a regex never selects embedding tables (lorajax.selection): name them in a list then
        targets: Any = list(lora_names) if tables else "(" + "|".join(re.escape(n) for n in lora_names) + ")"
        spec = Spec(
            first.variant,
            rank=first.rank,
            alpha=first.alpha,
            targets=targets,
            rank_pattern={"^" + re.escape(n): r.rank for n, r in lora_names.items()},
            alpha_pattern={"^" + re.escape(n): r.alpha for n, r in lora_names.items()},
            **dict(first.options),
        )
        got = [w.name for w in spec.selection.resolve(params)]
        if got != list(lora_names):
            extra = sorted(set(got) - set(lora_names))
            raise ValueError(f"the compiled Spec would also adapt {extra}: name LoRA embedding tables by full name")
        return spec

    @staticmethod
    def _lora_labels(spec: Spec | None, adapters: Any, lora_names: dict[str, Rule]) -> Any:
        if spec is None:
            return {}
        trainable = adapters_lib.partition(spec, adapters)[0]

        def label(path, _):
            keys = paths.key_names(path)
            for i in range(len(keys), 0, -1):
                name = paths.module_name(keys[:i])
                if name in lora_names:
                    role = ROLES.get(keys[-1], keys[-1])
                    return f"{lora_names[name].group}/{role}"
            raise ValueError(f"adapter leaf {'.'.join(keys)} belongs to no LoRA rule")

        return jax.tree_util.tree_map_with_path(label, trainable)


def _is_table(params: Any, name: str) -> bool:
    return any(paths.module_name(k) == name and k[-1] in EMBEDDING_NAMES for k, _ in _leaves(params))


def _leaves(params: Any) -> list:
    return [(paths.key_names(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def grouped_tx(
    labels: Any,
    make_tx: Callable[[float], optax.GradientTransformation],
    lr: float,
    mults: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """One ``optax.multi_transform`` over ``labels``: ``make_tx(lr · mult)`` per distinct label.

    Args:
      labels: a label tree (`Grouping.labels` or `Grouping.param_labels`; ``None`` leaves allowed).
      make_tx: ``lr -> optax.GradientTransformation`` (e.g. ``optax.adam``, a schedule-wrapping lambda).
      lr: the base learning rate.
      mults: ``{group or "group/role": mult}``; the ``group/role`` key wins over the group's;
        default 1. ``"{group}/full"`` labels (fully trained leaves) get a plain ``make_tx``;
        ``"frozen"`` leaves get ``optax.set_to_zero()``.

    Raises:
      ValueError: a ``mults`` key naming a group or label not in ``labels``; a negative or non-finite mult.
    """
    present = sorted({x for x in jax.tree_util.tree_leaves(labels) if isinstance(x, str)})
    groups = {lab.split("/", 1)[0] for lab in present if lab != FROZEN}
    mults = dict(mults or {})
    for k, v in mults.items():
        if k not in groups and k not in present:
            raise ValueError(f"mults key {k!r} is not a group or label of the tree; groups: {sorted(groups)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf):
            raise ValueError(f"mults[{k!r}] must be a finite number >= 0, got {v!r}")
    transforms: dict[str, optax.GradientTransformation] = {}
    for lab in present:
        if lab == FROZEN:
            transforms[lab] = optax.set_to_zero()
            continue
        mult = mults.get(lab, mults.get(lab.split("/", 1)[0], 1.0))
        transforms[lab] = make_tx(lr * mult)
    return optax.multi_transform(transforms, labels)
