"""sparsejax's tests."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_env(**overrides):
  """The test run's environment for a subprocess on one CPU device.

  Keeps every XLA flag the root conftest.py sets (the compile settings), so
  a subprocess compiles like the test process, less the four host devices.
  """
  flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                   if not flag.startswith("--xla_force_host_platform_device_count"))
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **overrides)


def doc_code_blocks(language: str = "python") -> list[str]:
  """The fenced code blocks of README.md and the guides in docs/guides/, in that order.

  The examples a user copies live in both; the tests run them as written.
  """
  paths = [os.path.join(ROOT, "README.md")]
  paths += sorted(glob.glob(os.path.join(ROOT, "docs", "guides", "*.md")))
  text = "\n".join(open(path, encoding="utf-8").read() for path in paths)
  return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def doc_code_block(marker: str, language: str = "python") -> str:
  """The first documented code block containing `marker` (see doc_code_blocks)."""
  blocks = [block for block in doc_code_blocks(language) if marker in block]
  if not blocks:
    raise AssertionError(f"no {language} block in README.md or docs/guides/ contains {marker!r}")
  return blocks[0]
