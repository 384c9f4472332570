"""Launcher: ``python -m experiments.run --config <file> [--steps 100 --spec.rank 4 ...]``.

The config file defines ``get_config() -> RunConfig`` (experiments/config.py,
every field commented); any field can be overridden on the command line
(tyro; ``--help`` lists them).

Before anything is loaded the whole config is checked (`experiments.validate`)
and ``out_dir`` is matched against the config stored there
(`experiments.run_identity`): re-running the same command resumes from the
newest checkpoint; another config in the same ``out_dir`` is refused
(``--overwrite`` starts afresh, ``--resume never|auto|must`` chooses).

A user error (bad flag, missing file, undecodable data, a run that does not
match its folder) prints one line ``error: ...`` and exits 2; a training that
cannot go on (a non-finite loss with ``--on-nonfinite stop``) exits 1. Other
exceptions are bugs and keep their traceback; ``--debug`` keeps it for all.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import re
import sys
from typing import Any, Callable

import tyro

from experiments import run_identity
from experiments.config import RunConfig
from experiments.validate import TASKS, ConfigError, validate

__all__ = ["TASKS", "ConfigError", "load_config", "parse", "main", "exit_code", "load_task"]

#: exit status of a user error (config, input files, out_dir) and of a training that failed
EXIT_INPUT, EXIT_TRAINING = 2, 1
#: exceptions that report a user's mistake or a failed run, not a bug: one line, no traceback
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
USER_ERRORS = (ValueError, FloatingPointError, *FILE_ERRORS)


def load_config(path: str) -> RunConfig:
    """``get_config()`` of the config file ``path``."""
    spec = importlib.util.spec_from_file_location("run_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--config must be a Python file defining get_config(), got {path!r}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config {path!r} defines no get_config()")
    return module.get_config()


def parse(argv: list[str]) -> RunConfig:
    """The `RunConfig` of a command line: ``--config FILE`` (optional) then flag overrides (tyro)."""
    default = RunConfig()
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file name")
        default = load_config(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    return tyro.cli(RunConfig, default=default, args=argv, description=__doc__)


def exit_code(error: BaseException) -> int:
    """The launcher's exit status for a user error: 1 when training failed, 2 for a bad config or input."""
    return EXIT_TRAINING if isinstance(error, FloatingPointError) else EXIT_INPUT


def run_main(parse: Callable[[Any], Any], run: Callable[[Any], Any], argv: list[str] | None) -> Any:
    """``run(parse(argv))`` for an experiment script, its errors as the launcher's: one line on stderr, exit
    status 2 for bad input (ValueError, FileNotFoundError), 1 when training failed (FloatingPointError)."""
    args = parse(argv)
    try:
        return run(args)
    except (FloatingPointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code(e)) from None


def harness_runner_parser(
    prog: str,
    description: str,
    methods: tuple[str, ...],
    *,
    steps: int,
    steps_help: str,
    lr: float | None,
    lr_help: str,
    model: str | None = None,
    model_help: str = "",
    model_required: bool = False,
    ckpt_every: int | None = None,
) -> argparse.ArgumentParser:
    """The flags the effects harness passes to a ``runner=`` script (`experiments.effects.launcher_argv`):
    ``--method`` (the arm), ``--steps``, ``--optim.lr``, ``--seed``, ``--out-dir``, ``--no-progress``, and
    ``--model`` (``model``: its default, ``model_required``: no default; None: accepted and unused) and
    ``--ckpt-every`` (``ckpt_every``: its default; None: accepted and unused), with the launcher's ``--task``
    and ``--eval-every`` accepted and unused. Add the script's own flags, then parse with `parse_runner_args`."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--method", choices=methods, required=True)
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--optim.lr", dest="lr", type=float, default=lr, help=lr_help)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", required=True)
    unused = ["--task", "--eval-every"]
    if model is None and not model_required:
        unused.append("--model")
    elif model_required:
        ap.add_argument("--model", required=True, help=model_help)
    else:
        ap.add_argument("--model", default=model, help=model_help)
    if ckpt_every is None:
        unused.append("--ckpt-every")
    else:
        ap.add_argument("--ckpt-every", type=int, default=ckpt_every, help="checkpoint period (steps)")
    for flag in unused:  # the harness's launcher flags this runner does not use
        ap.add_argument(flag, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def parse_runner_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``ap.parse_args(argv)`` with ``--steps >= 1`` and a finite ``--optim.lr > 0`` (when given) checked: a
    bad value exits 2 with argparse's one-line message."""
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error(f"--optim.lr must be a finite number > 0, got {args.lr}")
    return args


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (whitespace runs collapsed), ``error: ...``."""
    if isinstance(error, SystemExit):
        text = str(error.code)
    elif isinstance(error, FILE_ERRORS) and error.filename:
        text = f"{error.strerror or type(error).__name__}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    hint = "" if isinstance(error, (SystemExit, ConfigError, run_identity.RunConflict)) else " (--debug: traceback)"
    return "error: " + re.sub(r"\s+", " ", text).strip() + hint


def _launch(cfg: RunConfig) -> dict:
    validate(cfg)  # nothing loaded yet: a bad flag costs no model loading
    if cfg.distributed:  # before any other jax call: every host runs this same command
        from lorajax import sharding

        sharding.initialize()
    run_identity.check(cfg)
    return load_task(cfg.task).run(cfg)


def load_task(name: str) -> Any:
    """The module of task ``name`` (its ``run(cfg) -> dict`` trains and exports)."""
    return importlib.import_module(TASKS[name])


def main(argv: list[str] | None = None) -> dict:
    """Parse, validate, check ``out_dir`` and run the task; its results dict.

    User errors print one line on stderr and raise ``SystemExit`` (2: config or
    input, 1: training failed); ``--debug`` re-raises them with the traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        cfg = parse(argv)
        debug = cfg.debug
        return _launch(cfg)
    except SystemExit as e:  # tyro's usage errors (code 2, message printed) and --help (0) pass through
        if debug or e.code is None or isinstance(e.code, int):
            raise
        print(one_line(e), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INPUT) from None
    except USER_ERRORS as e:
        if debug:
            raise
        print(one_line(e), file=sys.stderr, flush=True)
        raise SystemExit(exit_code(e)) from None


if __name__ == "__main__":
    main()
