"""A run's identity: the config that produced an ``out_dir``, stored in ``out_dir/run_config.json``.

The launcher checks it before loading anything (`check`) and the task records
it just before it writes its first file (`record`), so a result in ``out_dir``
is never attributed to a config that did not produce it:

* no ``out_dir`` (or an empty one): a fresh run; ``--resume must`` refuses;
* ``run_config.json`` with the same identity: ``--resume auto`` (the default)
  continues from the newest checkpoint; ``--resume never`` refuses;
* a different identity: refused, naming each differing flag ``old -> new``;
* files of a run but no ``run_config.json`` (older launcher): the identity is
  unknown, refused;
* ``--overwrite``: what a previous run wrote in ``out_dir`` is moved aside to
  ``<out_dir>.replaced-<time>/`` (nothing is deleted) and the run starts afresh.

The identity is every config field except `NOT_IDENTITY`: fields that change
where or how a run is shown, checkpointed or placed, not the numbers it
produces. ``--steps`` is part of it (the learning-rate schedule depends on it),
so extending a finished run is a new run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from experiments.config import RunConfig
from experiments.validate import flag
from lorajax import atomic

__all__ = ["RunConflict", "FILE", "NOT_IDENTITY", "identity", "differences", "check", "record", "previous_run"]

#: the identity file in ``out_dir``
FILE = "run_config.json"
#: fields that do not change a run's results: output place and display, checkpoint cadence (a resume is
#: bitwise equal whatever the period), evaluation cadence (an evaluation runs at the end anyway), the device
#: mesh (the same numbers up to float reassociation; a preempted job may come back on another slice), the
#: remat policy, the scanned layers and the chunked loss (recomputation, loop form and summation order: the
#: same numbers up to float
#: reassociation; a resumed job may need them for memory), and
#: the launcher's own policies
NOT_IDENTITY = frozenset(
    {
        "out_dir",
        "progress",
        "debug",
        "resume",
        "overwrite",
        "ckpt_every",
        "keep",
        "eval_every",
        "mesh",
        "distributed",
        "remat",
        "scan_layers",
        "ce_chunk",
        "diagnose",
    }
)
#: entries of ``out_dir`` that only a run writes (a pre-trained ``base/`` alone may be supplied by hand)
RUN_FILES = (
    FILE,
    "lora",
    "full",
    "pretrain",
    "results.md",
    "results.json",
    "loss.png",
    "head.safetensors",
    "adapters_orbax",
    "peft_adapter",
    "model",
)


class RunConflict(ValueError):
    """``out_dir`` holds another run (or one ``--resume`` forbids); the message is one line with the way out."""


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def as_json(cfg: RunConfig) -> dict:
    """``cfg`` as the JSON object stored in `FILE` (nested like the dataclasses; tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def identity(config: dict) -> dict[str, Any]:
    """The identity fields of a stored config (`as_json`), flat: ``{"spec.rank": 8, ...}``.

    Fields missing from ``config`` (a file written before they existed) take
    `RunConfig`'s defaults, so adding a field does not orphan older runs.
    """
    full = {**_flat(as_json(RunConfig())), **_flat(config)}
    return {k: v for k, v in full.items() if k not in NOT_IDENTITY}


def differences(old: dict, new: dict) -> list[str]:
    """``["--spec.rank 8 -> 4", ...]``: the identity fields of stored configs ``old`` and ``new`` that differ."""
    a, b = identity(old), identity(new)
    return [f"{flag(k)} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def previous_run(out: Path) -> list[str]:
    """The entries of ``out`` that a run wrote (see `RUN_FILES`), sorted."""
    return sorted(name for name in RUN_FILES if (out / name).exists())


def has_progress(out: Path) -> bool:
    """Whether ``out`` holds something to resume: a checkpoint of a training folder, or finished results."""
    if (out / "results.json").exists():
        return True
    return any(any((out / d / "checkpoints").glob("[0-9]*")) for d in ("lora", "full", "pretrain"))


def _stored(out: Path) -> dict:
    try:
        stored = json.loads((out / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunConflict(f"{out / FILE} is unreadable ({e}); add --overwrite to start afresh in {out}") from None
    if not isinstance(stored, dict):
        raise RunConflict(f"{out / FILE} is not a JSON object; add --overwrite to start afresh in {out}")
    return stored


def move_aside(out: Path) -> Path | None:
    """Move what a run wrote in ``out`` (`RUN_FILES`, ``base/``, left-over temporaries) to a new sibling folder.

    The sibling is ``<name>.replaced-<YYYYmmdd-HHMMSS>``; other files in
    ``out`` stay where they are. Returns the sibling, or None when there was nothing to move.
    """
    out = out.resolve()
    names = [*RUN_FILES, "base"]
    entries = [out / n for n in names if (out / n).exists() or (out / n).is_symlink()]
    entries += [p for n in names for p in out.glob(f".{n}.tmp-*")]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside


def is_writer(cfg: RunConfig) -> bool:
    """Whether this process writes ``out_dir``'s shared files (always, except on processes > 0 of a multi-host job)."""
    if not cfg.distributed:
        return True
    import jax

    return jax.process_index() == 0


def check(cfg: RunConfig) -> str:
    """Decide what ``cfg`` does with ``cfg.out_dir``: ``"fresh"`` or ``"resume"`` (nothing is loaded).

    With ``--overwrite`` a previous run's files are moved aside first. In a
    multi-host job only process 0 (`is_writer`) checks and moves; its refusal ends the job.

    Raises:
      RunConflict: ``out_dir`` holds a run of another config, a run of unknown
        config, a run that ``--resume never`` forbids, or nothing that ``--resume must`` needs.
    """
    out = Path(cfg.out_dir)
    if not is_writer(cfg):  # process 0 decides for a multi-host job (and may have written the file already)
        return "resume" if (out / FILE).exists() else "fresh"
    if cfg.overwrite:
        aside = move_aside(out) if out.is_dir() else None
        if aside is not None:
            print(f"--overwrite: the previous run in {out} moved to {aside}", flush=True)
        return "fresh"
    found = previous_run(out) if out.is_dir() else []
    if not found:
        if cfg.resume == "must":
            raise RunConflict(f"--resume must: {out} holds no run to resume; leave --resume out to start one")
        return "fresh"
    if FILE not in found:
        raise RunConflict(
            f"{out} holds a run of unknown config (no {FILE}: {', '.join(found)}); "
            "add --overwrite to start afresh there or choose another --out-dir"
        )
    diff = differences(_stored(out), as_json(cfg))
    if diff:
        raise RunConflict(
            f"{out} holds a run of another config ({'; '.join(diff)}); use the same flags to resume it, "
            "--overwrite to start afresh there, or another --out-dir"
        )
    if cfg.resume == "never":
        raise RunConflict(f"--resume never: {out} already holds this run; add --overwrite or choose another --out-dir")
    if cfg.resume == "must" and not has_progress(out):
        raise RunConflict(f"--resume must: {out} has no checkpoint or result to resume from; leave --resume out")
    return "resume"


def record(cfg: RunConfig) -> None:
    """Create ``out_dir`` and store ``cfg`` in it (atomically) unless it is stored already.

    The tasks call it once the model and data are loaded, before their first
    file: an input that fails to load leaves ``out_dir`` as it was.
    """
    path = Path(cfg.out_dir) / FILE
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if is_writer(cfg) and not path.exists():
        atomic.write_text(path, json.dumps(as_json(cfg), indent=2, sort_keys=True) + "\n")
