"""Run a Python script in a subprocess on fake CPU devices, with this checkout importable.

``--xla_force_host_platform_device_count`` must be set before jax starts, so
every multi-device test runs its work in a child process through `run`.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(devices: int | None = 8, **extra: str) -> dict:
    """The child's environment: ``devices`` fake CPU devices (None: jax's default, XLA_FLAGS unset)."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices is not None:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"
    return {**e, **extra}


def run(args, *, devices: int | None = 8, timeout: int = 600, cwd=None, **extra: str) -> subprocess.CompletedProcess:
    """``python *args`` in a child process; asserts it succeeded (the stderr tail is the message)."""
    proc = subprocess.run([sys.executable, *map(str, args)], env=env(devices, **extra), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
