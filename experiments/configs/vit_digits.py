"""A small ViT (patch 2, 4 blocks, width 64) on the bundled 8x8 digits, pruned to 80% (gradual).

  python -m experiments.train --config=experiments/configs/vit_digits.py --workdir=runs/vit

The position embedding and the patch embedding stay dense (pruning.exclude).
"""

import ml_collections

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.model = ml_collections.ConfigDict({
      "name": "vit", "patch_size": 2, "hidden_dim": 64, "depth": 4, "num_heads": 4,
      "mlp_dim": 128, "dropout_rate": 0.0})
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  config.warmup_steps = 100
  config.num_epochs = 100
  config.pruning.sparsity = 0.8
  config.pruning.exclude = "pos_embedding|patch_embed"
  return config
