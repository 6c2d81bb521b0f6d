"""The installed packages: a user's script outside the clone imports both."""

import os
import subprocess
import sys

from tests import one_device_env


def test_experiments_launcher_and_start_up_import_outside_the_clone(tmp_path):
  env = one_device_env()
  env.pop("PYTHONPATH", None)
  script = ("import experiments.distributed, experiments.launch, sparsejax; "
            "print(experiments.launch.exit_code(-15), callable(experiments.distributed.initialize))")
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["143", "True"]
  assert not os.path.exists(tmp_path / "experiments")  # imported from the installation
