"""sparsejax's tests."""

import os


def one_device_env(**overrides):
  """The test run's environment for a subprocess on one CPU device.

  Keeps every XLA flag the root conftest.py sets (the compile settings), so
  a subprocess compiles like the test process, less the four host devices.
  """
  flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                   if not flag.startswith("--xla_force_host_platform_device_count"))
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **overrides)
