"""Test set-up shared by tests/ and the doctests in sparsejax/.

Four host CPU devices let the pmap and sharding tests run on any machine;
the flag must be set before jax is first imported.

The tests are compile-bound (small arrays, many distinct programs), so XLA's
CPU backend runs at optimisation level 0: LLVM's passes are most of a CPU
compile, and skipping them cut the CPU time of tests/test_gradual.py from
38.7 s to 24.1 s here. Every process of a test run (the subprocess binaries
inherit the variable) compiles the same way, so the same-numbers checks
compare like with like; a user's own runs keep XLA's default level.

Many tests build the same programs afresh (a new jitted closure, a binary in
a subprocess, a second pytest-xdist worker), so the run shares JAX's
persistent compilation cache: a fresh directory per test run, made by the
first process and inherited by the workers and subprocesses, removed at the
end. An executable read from it is the one XLA would compile again, so no
result changes. A JAX_COMPILATION_CACHE_DIR set by the caller is kept.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0"
    + " --xla_force_host_platform_device_count=4").strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="sparsejax-test-jit-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import sparsejax  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, optax=optax, sparsejax=sparsejax)
  doctest_namespace.update({name: getattr(sparsejax, name) for name in sparsejax.__all__})
