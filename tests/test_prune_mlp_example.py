"""The README's main command, run short in a subprocess as a user would."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prune_mlp_example_prints_accuracies_and_reaches_target_sparsity():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.prune_mlp", "--steps=300", "--log_every=100",
       "--sparsity=0.8", "--allocation=global"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
  final = re.search(r"dense test accuracy ([\d.]+) \| pruned test accuracy ([\d.]+) "
                    r"\| sparsity ([\d.]+) \(global\)", out)
  assert final, out
  dense, pruned, sparsity = map(float, final.groups())
  assert sparsity == 0.8  # 50200 prunable weights: 10040 kept exactly
  assert dense > 0.9 and pruned > 0.8  # digits are easy; chance is 0.1
  assert "Dense_0/kernel" in out and "[pruned] step   300" in out
