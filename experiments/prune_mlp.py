"""Gradual magnitude pruning of a Flax MLP on scikit-learn's bundled digits.

A short, offline end-to-end example of the library: trains a dense
LeNet-300-100-style MLP and the same MLP under
`sparsejax.GradualMagnitudePruning` (Zhu & Gupta schedule) with identical
seeds, then prints both test accuracies and the per-layer sparsity.

  python -m experiments.prune_mlp
  python -m experiments.prune_mlp --sparsity=0.95 --allocation=global
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

import sparsejax

_SPARSITY = flags.DEFINE_float("sparsity", 0.9, "Final sparsity of the prunable kernels.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the split, the init and the batches.")
_ALLOCATION = flags.DEFINE_enum("allocation", "uniform", ["uniform", "erk", "global"],
                                "How the sparsity is split across layers.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 250, "Steps between progress lines.")


class MLP(nn.Module):
  """LeNet-300-100 on flattened 8x8 digits."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


def load_digits(seed: int):
  """The 1797 bundled 8x8 digits, scaled to [0, 1], split 80/20 by `seed`."""
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(0.8 * len(x))
  return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def train(tx, train_set, test_set, seed: int, label: str):
  """Trains MLP with `tx`; returns (params, opt_state, test accuracy)."""
  model = MLP()
  params = model.init(jax.random.key(seed), jnp.ones((1, 64)))["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x_train, y_train = train_set
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for t in range(1, _STEPS.value + 1):
    idx = rng.integers(0, len(x_train), _BATCH.value)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
    if t % _LOG_EVERY.value == 0 or t == _STEPS.value:
      report = sparsejax.sparsity_report(params)  # all leaves, biases included
      kernels = [l for p, l in report.leaves.items() if p.endswith("kernel")]
      kernel_sparsity = 1 - sum(l.kept for l in kernels) / sum(l.size for l in kernels)
      print(f"[{label}] step {t:5d}  loss {float(loss):.4f}  kernel sparsity {kernel_sparsity:.3f}  "
            f"{t / (time.perf_counter() - start):.0f} steps/s", flush=True)
  logits = model.apply({"params": params}, test_set[0])
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test_set[1]))
  return params, opt_state, accuracy


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep jax's backend probing out of the output
  train_set, test_set = load_digits(_SEED.value)
  print(f"digits: {len(train_set[0])} train / {len(test_set[0])} test images (8x8, bundled with scikit-learn)")
  _, _, dense_accuracy = train(optax.adam(_LR.value), train_set, test_set, _SEED.value, "dense")
  schedule = sparsejax.PolynomialSchedule(
      initial_sparsity=0.0, final_sparsity=_SPARSITY.value,
      begin_step=_STEPS.value // 10, end_step=_STEPS.value * 2 // 3,
      update_frequency=max(1, _STEPS.value // 50))
  pruner = sparsejax.GradualMagnitudePruning(schedule, allocation=_ALLOCATION.value)
  _, opt_state, pruned_accuracy = train(
      pruner.wrap(optax.adam(_LR.value)), train_set, test_set, _SEED.value, "pruned")
  masks = sparsejax.find_pruning_state(opt_state).masks
  print("\nper-layer sparsity of the pruned model (masks):")
  print(sparsejax.sparsity_report(masks))
  print(f"\ndense test accuracy {dense_accuracy:.4f} | pruned test accuracy {pruned_accuracy:.4f} "
        f"| sparsity {sparsejax.sparsity_report(masks).sparsity:.4f} ({_ALLOCATION.value})")


if __name__ == "__main__":
  app.run(main)
