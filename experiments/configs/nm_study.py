"""N:M study: the small ViT with every N:M method at 2:4 and 1:8, 2 seeds, plus dense.

  python -m experiments.nm_study --config=experiments/configs/nm_study.py --workdir=runs/nm_study

26 trainings of 550 steps (24 N:M + 2 dense), about 20 min on 2 CPU cores.
Every run is an experiments.train run in <workdir>/runs/<name>; a rerun
resumes where the study stopped. Writes summary.csv, final.json and nm_study.png.
"""

import ml_collections

from experiments.configs import nm_vit


def get_config():
  config = nm_vit.get_config()
  config.num_epochs = 50          # 11 steps per epoch
  config.warmup_steps = 50
  config.log_every = 110
  config.checkpoint_every = 550
  config.keep_checkpoints = 1
  config.dense_baseline = False   # the study trains its own dense runs, one per seed
  config.study = ml_collections.ConfigDict()
  config.study.methods = ("step", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise",
                          "sdgf_geometric")
  config.study.patterns = ((2, 4), (1, 8))  # (n, m) pairs
  config.study.seeds = (0, 1)
  config.study.dense = True       # also train the dense model for each seed
  return config
