"""Typed variant options: a frozen dataclass per variant, validated when built.

Each variant declares its options as a subclass of `Options`, one field per
option, each made with `option(default, check)`; the comment beside a field is
its documentation::

    @dataclasses.dataclass(frozen=True)
    class Options(options.Options):
        use_rslora: bool = option(False, checks.boolean)    # scale α/√r instead of α/r
        dtype: str | None = option(None, checks.dtype)     # adapter dtype; None: f32 or the weight's if wider

`Spec(variant, **options)` builds it with `Options.build(variant, **kw)`:
unknown keys raise a ``TypeError`` naming the closest options, and every field's
check runs (then the class's own cross-field `check`), raising ``ValueError``
naming the option. Values that are dicts or lists are frozen into tuples, so an
`Options` is hashable and can sit in a jit-static `Spec`.

An `Options` also reads like a mapping (``opts["use_rslora"]``,
``opts.get(...)``, ``dict(opts)``), so a `Spec`'s options can be passed on as
keywords (``Spec(**spec.options)``).

The checks shared by all variants are in `checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import jax.numpy as jnp

__all__ = ["Options", "NoOptions", "option", "checks", "freeze"]

_CHECK = "lorajax_check"


def freeze(value: Any) -> Any:
    """Dicts and lists as (sorted) tuples, recursively, so that the value can be hashed."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def option(default: Any, check: Callable[[str, Any], None] | None = None) -> Any:
    """A dataclass field with a default and a check ``check(name, value)`` that raises on a bad value."""
    return dataclasses.field(default=default, metadata={_CHECK: check})


@dataclasses.dataclass(frozen=True)
class Options(Mapping):
    """Base of every variant's options (see the module docstring)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = freeze(getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            check = f.metadata.get(_CHECK)
            if check is not None:
                check(f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks; override in a variant's `Options` (raise ValueError)."""

    @classmethod
    def build(cls, variant: str, **values: Any) -> "Options":
        """The options of ``variant`` from keywords; unknown keys raise naming the closest ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise TypeError(
                    f"unknown option {key!r} for variant {variant!r}.{hint} "
                    f"Options of {variant!r}: {sorted(known) or 'none'}"
                )
        return cls(**values)

    def replace(self, **changes: Any) -> "Options":
        """A copy with some options changed (checked again)."""
        return dataclasses.replace(self, **changes)

    # read-only mapping view: opts["x"], opts.get("x"), dict(opts), **opts
    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A variant without options."""


class checks:  # noqa: N801 -- a namespace of check functions, used as ``checks.boolean``
    """Checks shared by the variants' options: ``check(name, value)`` raises ValueError/TypeError."""

    @staticmethod
    def boolean(name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")

    @staticmethod
    def integer(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")

    @staticmethod
    def positive_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    @staticmethod
    def nonneg_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @staticmethod
    def finite(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")

    @staticmethod
    def positive(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @staticmethod
    def nonneg(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @staticmethod
    def probability(name: str, value: Any) -> None:
        """A probability in ``[0, 1)`` (a dropout rate: 1 would drop everything)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    @staticmethod
    def nonzero(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            raise ValueError(f"{name} must be a finite non-zero number, got {value!r}")

    @staticmethod
    def dtype(name: str, value: Any) -> None:
        """``None`` or anything `jnp.dtype` accepts (``"float32"``, ``"bfloat16"``, …)."""
        if value is None:
            return
        try:
            jnp.dtype(value)
        except TypeError as e:
            raise TypeError(f"{name}={value!r} is not a dtype: {e}") from None

    @staticmethod
    def one_of(*choices: Any) -> Callable[[str, Any], None]:
        """A check that the value is one of ``choices`` (compared with ``==`` and type, so 1 is not True)."""

        def check(name: str, value: Any) -> None:
            if not any(value == c and type(value) is type(c) for c in choices):
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

        return check

    @staticmethod
    def optional(inner: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        """``None`` or a value passing ``inner``."""

        def check(name: str, value: Any) -> None:
            if value is not None:
                inner(name, value)

        return check
