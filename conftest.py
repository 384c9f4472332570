"""Test-wide JAX settings: 64-bit off, implicit rank promotion is an error."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# fixture generators import the official (torch) code from a scratch checkout: never collect them
collect_ignore_glob = ["tests/fixtures/*", "tests/*_job.py", "tests/*/*_job.py"]  # + subprocess job scripts
