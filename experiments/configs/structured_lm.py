"""Structured one-shot pruning of the stdlib language model: FLAP, Wanda-sp, magnitude_sp at 20/30/50%.

  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm2 \
      --config.model.num_layers=2 --config.num_train_steps=400 --config.warmup_steps=40
  python -m experiments.structured --config=experiments/configs/structured_lm.py \
      --workdir=runs/lm2_structured --config.train_workdir=runs/lm2

Every attention head and MLP unit of the blocks is a candidate (the model's
spec, experiments/models/structure.py); `fractions` are of the parameters of
those groups. FLAP (An et al. 2024) chooses heads and units globally and adds
its compensation bias; Wanda-sp and magnitude_sp remove the same fraction of
each layer's heads and of its MLP units. Calibration as in FLAP's code: 128
training sequences, statistics of the dense model's inputs to each output
projection. Each pruned model is shrunk to smaller arrays and timed.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.train_workdir = "runs/lm2"   # a finished experiments.train run: its final checkpoint
  config.seed = 0                     # which training examples calibrate
  config.methods = ("flap", "wanda_sp", "magnitude_sp")
  config.fractions = (0.2, 0.3, 0.5)  # of the heads' and MLP units' parameters, removed
  config.calibration_sequences = 128
  config.calibration_batch = 32       # sequences per forward pass while calibrating
  config.multiple = 0                 # round each layer's kept units up to a multiple (0: no);
                                      # a layer with no more units (e.g. 4 heads) is not rounded
  config.eval_sequences = 512         # first test sequences each shrunk model is scored on (0: all)
  config.latency_batch = 8            # sequences per timed forward pass (CPU)
  config.latency_repeats = 20         # timed passes; the median is reported
  return config
