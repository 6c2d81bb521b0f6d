"""2:4 SR-STE on an MLP (64-256-128-10) with the bundled 8x8 digits.

  python -m experiments.train --config=experiments/configs/nm_mlp.py --workdir=runs/nm_mlp

Widths are multiples of 64, so every kernel takes any of the methods'
patterns (sdgf_geometric at 1:8 groups 64 inputs). Another method or pattern:
--config.pruning.nm.method=mdgf_exp --config.pruning.nm.n=1 --config.pruning.nm.m=8.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.model.features = (256, 128)
  config.num_epochs = 100
  config.log_every = 110
  config.checkpoint_every = 550
  config.pruning.method = "nm"  # config.pruning.nm in default.py: srste 2:4, 10% dense, 10% fine-tune
  return config
