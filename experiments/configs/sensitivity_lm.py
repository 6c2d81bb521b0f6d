"""Per-layer sensitivity of the stdlib language model: each kind of kernel pruned alone.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.sensitivity --config=experiments/configs/sensitivity_lm.py \
      --workdir=runs/lm_sensitivity --config.train_workdir=runs/lm

Groups: every block's linear layers, one group per block (`block_<i>/`);
`--config.groups=` (empty) sweeps each kernel alone instead (24 groups: 24 x
the sparsities evaluations). The embeddings and the head are left out, as
in the one-shot configs. The loss is on the first 256 test sequences.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.train_workdir = "runs/lm"   # a finished experiments.train run: its final checkpoint
  config.sparsities = (0.3, 0.5, 0.7, 0.9)
  # Regexes, one group each (a kernel joins the first that matches); () = each kernel alone.
  config.groups = ("block_0/", "block_1/", "block_2/", "block_3/")
  config.include = ""                 # regex: sweep only kernels whose path matches ('' = all)
  config.exclude = "embed|position|head"  # regex: kernels never pruned
  config.eval_examples = 256          # the first n evaluation examples (0 = all)
  config.max_increase = 0.05          # rates.json: loss increase (nats) each group may cost
  return config
