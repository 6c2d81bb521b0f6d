"""Lottery tickets on LeNet-300-100 and the bundled digits: IMP with rewinding.

  python -m experiments.lottery --config=experiments/configs/lottery.py --workdir=runs/lottery

Runs offline on 2 CPU cores in about 3 minutes: 2 replicates, each a dense
level 0 and 13 levels of 20% layerwise magnitude pruning (down to 5.5% of
the weights), rewinding to the initialisation (k = 0, Frankle & Carbin), with
the random-reinit and random-prune controls on every level: 80 trainings of
40 epochs.
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  del config["pruning"]          # the lottery section below decides the masks
  del config["dense_baseline"]   # level 0 is the dense run
  config.num_epochs = 40         # per level: 440 steps of 11 per epoch
  config.log_every = 220         # steps between progress lines
  config.checkpoint_every = 220  # steps between checkpoints, a multiple of log_every
  config.keep_checkpoints = 1

  config.lottery = ml_collections.ConfigDict()
  config.lottery.levels = 13            # pruned levels after the dense level 0
  config.lottery.prune_fraction = 0.2   # share of the remaining weights pruned per level
  config.lottery.allocation = "layerwise"  # layerwise | global
  config.lottery.rewind_step = 0        # k: weights rewind to their values at this point
  config.lottery.rewind_unit = "steps"  # steps | epochs
  config.lottery.rewind_optimizer = False  # True: optimizer state from step k; False: fresh
  config.lottery.replicates = 2         # seeds config.seed, config.seed + 1, ...
  config.lottery.branches = ("random_reinit", "random_prune")  # controls on every level's mask
  config.lottery.include = ""           # regex: prune only kernels whose path matches
  config.lottery.exclude = ""           # regex: never prune kernels whose path matches
  return config
