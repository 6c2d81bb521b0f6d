"""One-shot pruning of the stdlib language model: magnitude, Wanda, SparseGPT at 50/60/70%, 2:4, 4:8.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.oneshot --config=experiments/configs/oneshot_lm.py \
      --workdir=runs/lm_oneshot --config.train_workdir=runs/lm

As in the Wanda and SparseGPT papers: 128 calibration sequences from the
training split, every linear layer of the blocks pruned (attention
query/key/value/out and the MLP), the embeddings and the output head kept
dense, the blocks pruned one after the other; SparseGPT with blocks of 128
columns and dampening 1% of the mean diagonal of X^T X. The magnitude
baseline compares weights over the whole layer (Wanda's code does;
`magnitude_per_output=True` compares within each output unit). Add the
layer-adaptive rows with `--config.methods=lamp,owl_wanda,owl_sparsegpt` (or
see oneshot_lm_rates.py); OWL's settings are the paper's (M = 5, lambda = 0.08;
at the N:M targets each block keeps its own N_l of every M, spread over
nm_lam = 2 weights as in the authors' README).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.train_workdir = "runs/lm"   # a finished experiments.train run: its final checkpoint
  config.seed = 0                    # which training examples calibrate
  config.methods = ("magnitude", "wanda", "sparsegpt")
  config.sparsities = (0.5, 0.6, 0.7)  # unstructured, of every pruned kernel
  config.patterns = ((2, 4), (4, 8))   # N:M along each kernel's contraction axes
  config.calibration_sequences = 128
  config.calibration_batch = 32       # sequences per forward pass while calibrating
  config.include = ""                 # regex: prune only kernels whose path matches ('' = all)
  config.exclude = "embed|position|head"  # regex: kernels never pruned
  config.magnitude_per_output = False  # magnitude over the whole layer, the library's default
  config.block_size = 128             # sparsegpt: columns per lazy-update block
  config.dampening = 0.01             # sparsegpt: lambda as a fraction of mean diag(X^T X)
  config.owl = ml_collections.ConfigDict()  # owl_wanda / owl_sparsegpt rows (Yin et al. 2024)
  config.owl.m = 5.0                  # outlier: a Wanda score above m times its block's mean (> 0)
  config.owl.lam = 0.08               # block densities span 2 lam around 1 - S, in [0, 0.5)
  config.owl.nm_lam = 2.0             # N:M targets: each block's N spans nm_lam around N (>= 0)
  return config
