"""Test-wide settings: 64-bit off, implicit rank promotion is an error, cheap compiles, a shared compile cache.

The suite is dominated by XLA compiling thousands of tiny programs, so:

* the CPU backend compiles them without LLVM's optimisation passes
  (``JAX_DISABLE_MOST_OPTIMIZATIONS``: XLA backend optimisation level 0). The
  HLO passes (fusion, layout: the graphs the gradient tests inspect) are
  unchanged; machine-code generation is about twice as cheap, and the tiny
  programs run a little slower. Transcendental functions may round differently:
  a test that compares bits with another library or sits on a rounding boundary
  is marked ``@pytest.mark.xla_optimized`` and runs with the full compiler.
  Export ``JAX_DISABLE_MOST_OPTIMIZATIONS=0`` to run everything that way.
* one persistent compilation cache per test session (a temporary folder shared
  by the xdist workers and the subprocesses tests start, removed at the end):
  tests that build the same program from new closures, and jobs restarted by the
  resume tests, compile it once. ``JAX_COMPILATION_CACHE_DIR`` set beforehand is kept.

Both must be set before jax is imported; subprocesses inherit them.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
FAST_COMPILE = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes", "on")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a lone pytest): workers inherit it
    _cache = tempfile.mkdtemp(prefix="lorajax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# fixture generators import the official (torch) code from a scratch checkout: never collect them
collect_ignore_glob = ["tests/fixtures/*", "tests/*_job.py", "tests/*/*_job.py"]  # + subprocess job scripts


@pytest.fixture(autouse=True)
def _xla_optimized(request):
    """Tests marked ``xla_optimized`` compile with XLA's full optimisation (see the module docstring)."""
    if not FAST_COMPILE or request.node.get_closest_marker("xla_optimized") is None:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    jax.clear_caches()  # programs compiled the cheap way are not reused
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
        jax.clear_caches()
