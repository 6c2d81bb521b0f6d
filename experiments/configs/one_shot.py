"""One-shot magnitude pruning of LeNet-300-100 to 90% at 50% of training, then fine-tuning.

  python -m experiments.train --config=experiments/configs/one_shot.py --workdir=runs/one_shot
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.pruning.method = "one_shot"
  config.pruning.start_fraction = 0.5  # prune here; train the rest with the mask fixed
  return config
