"""Label adapter leaves by role, for ``optax.multi_transform`` and ``optax.masked``.

A leaf's role comes from its name (the last key of its path): ``lora_A`` is a
down-projection ("A"), ``lora_B`` an up-projection ("B"), ``gate`` SoRA's gate
("gate"); anything else is "other". Trees from `lorajax.partition` (``None``
where a leaf is frozen) work: ``None`` stays ``None``.

Example:
  >>> import jax.numpy as jnp
  >>> from lorajax.optim import leaf_labels
  >>> tree = {"q": {"kernel": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.zeros((2, 3))}}, "b": jnp.ones(3)}
  >>> leaf_labels(tree)
  {'b': 'other', 'q': {'kernel': {'lora_A': 'A', 'lora_B': 'B'}}}
"""

from __future__ import annotations

from typing import Any

import jax

from lorajax.paths import entry_name

__all__ = ["ROLES", "leaf_labels", "leaf_name"]

#: leaf name -> role
ROLES = {"lora_A": "A", "lora_B": "B", "gate": "gate"}


#: the last key of a pytree path as a string (see `lorajax.paths.entry_name`)
leaf_name = entry_name


def leaf_labels(tree: Any, *, one_d_as: str | None = None) -> Any:
    """A tree like ``tree`` of role labels ("A", "B", "gate", "other").

    ``one_d_as``: label for 1-D leaves that are not a known factor (LoRA+'s
    official grouping puts every 1-D parameter with B: pass ``"B"``).
    """

    def label(path, leaf):
        role = ROLES.get(leaf_name(path))
        if role is not None:
            return role
        if one_d_as is not None and getattr(leaf, "ndim", None) == 1:
            return one_d_as
        return "other"

    return jax.tree_util.tree_map_with_path(label, tree)
