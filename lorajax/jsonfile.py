"""Reading the JSON files of checkpoint and adapter folders, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path


def read_object(path: Path, missing_hint: str) -> dict:
    """The JSON object in ``path``.

    Raises FileNotFoundError (with ``missing_hint``) when absent, ValueError when
    it is not valid JSON or not an object.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} not found{missing_hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
