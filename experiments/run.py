"""Launcher: ``python -m experiments.run --config <file> [--steps 100 --spec.rank 4 ...]``.

The config file defines ``get_config() -> RunConfig`` (experiments/config.py,
every field commented); any field can be overridden on the command line
(tyro; ``--help`` lists them). Re-running the same command resumes from the
newest checkpoint in ``out_dir``.
"""

from __future__ import annotations

import importlib.util
import sys

import tyro

from experiments.config import RunConfig

TASKS = {"genre": "experiments.tasks.genre", "lm": "experiments.tasks.lm"}


def load_config(path: str) -> RunConfig:
    spec = importlib.util.spec_from_file_location("run_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse(argv: list[str]) -> RunConfig:
    default = RunConfig()
    if "--config" in argv:
        i = argv.index("--config")
        default = load_config(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    return tyro.cli(RunConfig, default=default, args=argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if cfg.task not in TASKS:
        raise SystemExit(f"unknown task {cfg.task!r}; choose from {sorted(TASKS)}")
    if cfg.distributed:  # before any other jax call: every host runs this same command
        from lorajax import sharding

        sharding.initialize()
    task = importlib.import_module(TASKS[cfg.task])
    return task.run(cfg)


if __name__ == "__main__":
    main()
