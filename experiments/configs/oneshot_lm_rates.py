"""OWL's per-block rates against plain Wanda and SparseGPT on the stdlib LM, at 50/60/70%.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.oneshot --config=experiments/configs/oneshot_lm_rates.py \
      --workdir=runs/lm_rates --config.train_workdir=runs/lm

The same trained model, calibration and kernels as oneshot_lm.py (the
blocks' linear layers; embeddings and head dense), unstructured targets only.
`owl_wanda` and `owl_sparsegpt` prune each block at OWL's sparsity (Yin et
al. 2024): blocks with more outlier Wanda scores (above M = 5 times their
block's mean, on the dense model) keep more weights, the densities spanning
2 lambda = 0.16 around 1 - S. Each OWL row's JSON (rows/<name>.json) holds
the blocks' outlier ratios and sparsities. `lamp` is magnitude pruning with
LAMP's allocation (Lee et al. 2021), beside plain (per-layer) magnitude.
"""

from experiments.configs import oneshot_lm


def get_config():
  config = oneshot_lm.get_config()
  config.methods = ("magnitude", "lamp", "wanda", "owl_wanda", "sparsegpt", "owl_sparsegpt")
  config.sparsities = (0.5, 0.6, 0.7)
  config.patterns = ()
  return config
