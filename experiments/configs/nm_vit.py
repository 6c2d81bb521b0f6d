"""2:4 SR-STE on the small ViT (patch 2, 4 blocks, width 64) with the bundled digits.

  python -m experiments.train --config=experiments/configs/nm_vit.py --workdir=runs/nm_vit

N:M masks go on the attention projections (query, key, value, out) and the
MLP kernels of every block, grouped along their input axis; the patch
embedding, position embedding and head stay dense. Choose other kernels by
path, e.g. only the MLPs: --config.pruning.include='mlp/fc_'.
"""

from experiments.configs import vit_digits


def get_config():
  config = vit_digits.get_config()
  config.pruning.method = "nm"  # config.pruning.nm in default.py: srste 2:4, 10% dense, 10% fine-tune
  config.pruning.include = "attention/(query|key|value|out)|mlp/fc_"
  config.pruning.exclude = ""
  return config
