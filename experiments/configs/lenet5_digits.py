"""Gradual pruning of a LeNet-5 conv net to 90% (ERK) on the bundled digits, resized to 32x32.

  python -m experiments.train --config=experiments/configs/lenet5_digits.py --workdir=runs/lenet5
"""

import ml_collections

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.image_size = 32
  config.model = ml_collections.ConfigDict({"name": "lenet5"})
  config.num_epochs = 60
  config.pruning.allocation = "erk"
  return config
