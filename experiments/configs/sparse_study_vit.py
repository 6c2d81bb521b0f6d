"""Sparse training study: the small ViT on the bundled digits, every method at 80/90/95%, 2 seeds.

  python -m experiments.nm_study --config=experiments/configs/sparse_study_vit.py \
      --workdir=runs/sparse_vit

As sparse_study_lenet5.py (the same methods, sparsities, seeds and
schedule), on the ViT of vit_digits.py: every kernel is pruned but the
patch and position embeddings (its pruning.exclude).
"""

from experiments.configs import sparse_study_lenet5
from experiments.configs import vit_digits


def get_config():
  config = sparse_study_lenet5.study_config(vit_digits.get_config())
  config.warmup_steps = 30
  return config
