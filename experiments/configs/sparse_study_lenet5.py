"""Sparse training study: LeNet-5 on the bundled digits, every method at 80/90/95%, 2 seeds.

  python -m experiments.nm_study --config=experiments/configs/sparse_study_lenet5.py \
      --workdir=runs/sparse_lenet5

Dense, gradual magnitude pruning and the sparse training methods (static,
SNIP, SynFlow, STE, SET, RigL, GraNet), ERK allocation, 330 steps each (30
epochs of 11): 2 dense + 48 pruned runs. Every run is an experiments.train
run in <workdir>/runs/<name>; a rerun resumes where the study stopped.
Writes summary.csv, final.json and nm_study.png.
"""

import ml_collections

from experiments.configs import lenet5_digits


def study_config(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`base` as a study over the sparse training methods (shared with the ViT study)."""
  base.num_epochs = 30          # 11 steps per epoch
  base.log_every = 110
  base.checkpoint_every = 330
  base.keep_checkpoints = 1
  base.dense_baseline = False   # the study trains its own dense runs, one per seed
  base.pruning.allocation = "erk"
  base.pruning.update_every = 10   # gradual and ste: mask updates
  base.pruning.dst.update_every = 30  # set, rigl: 8 drop-and-grow updates by 75%; granet: 10
  base.pruning.synflow_iterations = 100
  base.study = ml_collections.ConfigDict()
  base.study.methods = ("gradual", "static", "snip", "synflow", "ste", "set", "rigl", "granet")
  base.study.sparsities = (0.8, 0.9, 0.95)
  base.study.seeds = (0, 1)
  base.study.dense = True       # also train the dense model for each seed
  return base


def get_config():
  return study_config(lenet5_digits.get_config())
