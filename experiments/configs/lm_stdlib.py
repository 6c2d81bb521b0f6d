"""A small byte-level transformer language model on the Python standard library's source.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm

Dense training only (the model one-shot pruning starts from:
`python -m experiments.oneshot --workdir=runs/lm_oneshot --train_workdir=runs/lm`).
The text is the running interpreter's own stdlib `.py` files (the bundled
`stdlib_text` dataset), 256-byte sequences; 4 pre-LayerNorm blocks of width
128 with Flax's attention module. The test split is reported in bits per
byte; a model of byte frequencies alone (unigram) scores about 5 there.
"""

import ml_collections

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "stdlib_text"
  config.model = ml_collections.ConfigDict({
      "name": "lm", "num_layers": 4, "width": 128, "num_heads": 4, "mlp_dim": 512,
      "max_length": 256})
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.weight_decay = 0.01
  config.lr_schedule = "cosine"
  config.warmup_steps = 100
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 1200
  config.log_every = 100
  config.checkpoint_every = 600
  config.pruning.method = "dense"
  config.dense_baseline = False
  return config
