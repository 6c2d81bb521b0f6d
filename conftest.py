"""Test set-up shared by tests/ and the doctests in sparsejax/.

Four host CPU devices let the pmap and sharding tests run on any machine;
the flag must be set before jax is first imported.

The tests are compile-bound (small arrays, many distinct programs), so XLA's
CPU backend runs at optimisation level 0: LLVM's passes are most of a CPU
compile, and skipping them cut the CPU time of tests/test_gradual.py from
38.7 s to 24.1 s here. Every process of a test run (the subprocess binaries
inherit the variable) compiles the same way, so the same-numbers checks
compare like with like; a user's own runs keep XLA's default level.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0"
    + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import sparsejax  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, optax=optax, sparsejax=sparsejax)
  doctest_namespace.update({name: getattr(sparsejax, name) for name in sparsejax.__all__})
