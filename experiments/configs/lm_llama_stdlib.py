"""A small Llama-shaped byte language model (Flax NNX) on the Python standard library's source.

  python -m experiments.train --config=experiments/configs/lm_llama_stdlib.py --workdir=runs/llama

The model of `experiments/models/llama.py` (RMSNorm, rotary embeddings,
grouped-query attention with 4 query heads sharing 2 key/value heads, SwiGLU
MLP, untied embeddings) through the Linen bridge, trained by the same trainer
on the same bundled `stdlib_text` data as `lm_stdlib.py` (256-byte
sequences). Sized to train in minutes on 2 CPU cores: 2 blocks of width 128,
400 steps of 16 sequences. Its one-shot pruning:

  python -m experiments.oneshot --config=experiments/configs/oneshot_lm.py \
      --workdir=runs/llama_oneshot --config.train_workdir=runs/llama
"""

import ml_collections

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "stdlib_text"
  config.model = ml_collections.ConfigDict({
      "name": "llama", "num_layers": 2, "width": 128, "num_heads": 4, "num_kv_heads": 2,
      "mlp_dim": 384, "flavour": "llama", "tie_embeddings": False, "max_length": 256})
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.weight_decay = 0.01
  config.lr_schedule = "cosine"
  config.warmup_steps = 50
  config.batch_size = 16
  config.eval_batch_size = 64
  config.num_train_steps = 400
  config.log_every = 50
  config.checkpoint_every = 200
  config.pruning.method = "dense"
  config.dense_baseline = False
  return config
