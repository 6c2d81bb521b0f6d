"""Learned masks on a trained model, in a loop of their own: MaskLLM, Lottery Jackpots.

  # MaskLLM 2:4 on the stdlib LM, from SparseGPT's 2:4 mask, weights frozen:
  python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=runs/lm
  python -m experiments.learned_study --method=maskllm --train_workdir=runs/lm --steps=200

  # Lottery Jackpots at 90% on a trained LeNet-5 (digits), weights frozen:
  python -m experiments.train --config=experiments/configs/lenet5_digits.py \
      --workdir=runs/lenet5_dense --config.pruning.method=dense --config.dense_baseline=False
  python -m experiments.learned_study --method=jackpots --train_workdir=runs/lenet5_dense \
      --sparsity=0.9 --steps=330

Restores the final checkpoint of a finished `experiments.train` run (read
only), evaluates it dense and with the one-shot mask the method starts from
(MaskLLM: SparseGPT 2:4, both with SparseGPT's weight updates and as a mask
on the unchanged weights; Jackpots: per-layer magnitude), then learns the
mask for --steps steps on the run's own training batches with the weights
frozen, and evaluates the learned hard mask on the whole test split. Prints
one line per row (test bits per byte for text, else test accuracy) and the
learning's steps per second. Nothing is written.
"""

from __future__ import annotations

import math
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import optax

import sparsejax
from sparsejax import oneshot as oneshot_lib
from sparsejax.checkpoint import SparseCheckpointManager
from experiments import methods as methods_lib
from experiments import oneshot
from experiments import trainer as trainer_lib

METHOD = flags.DEFINE_enum("method", None, ["maskllm", "jackpots"], "Which learned mask.")
TRAIN_WORKDIR = flags.DEFINE_string("train_workdir", None, "A finished experiments.train run.")
STEPS = flags.DEFINE_integer("steps", 200, "Mask-learning steps (one training batch each).")
SCORE_LR = flags.DEFINE_list("score_lr", None, "Peak learning rates of the scores, one "
                             "mask-learning run each (comma-separated); default: "
                              "5e-4 (MaskLLM: adam, cosine to 10%, the authors' 5e-5 x "
                              "lr-mult 10) or 0.1 (Jackpots: sgd, momentum 0.9, weight decay "
                              "5e-4, cosine to 0, the authors' CIFAR configs).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Training batch of mask learning; "
                                  "default: the trained run's.")
SPARSITY = flags.DEFINE_float("sparsity", 0.9, "Jackpots: fraction pruned in every kernel.")
EXCLUDE = flags.DEFINE_string("exclude", None, "Regex of kernels kept dense; default "
                              "'embed|position|head' (maskllm, as the one-shot binary) or "
                              "'head' (jackpots: the authors keep the classifier dense).")


def restore(train_workdir: str,
            batch_size: int | None = None) -> tuple[trainer_lib.Trainer, trainer_lib.TrainState]:
  """The Trainer of a finished run (its batch size, or `batch_size`) and the
  state of its final checkpoint."""
  trainer = oneshot.trained(train_workdir)
  if batch_size is not None and batch_size != trainer.config.batch_size:
    config = trainer.config.copy_and_resolve_references()
    config.batch_size = batch_size
    trainer = trainer_lib.Trainer(config, data=trainer.data)
  with SparseCheckpointManager(os.path.join(train_workdir, trainer_lib.CHECKPOINT_DIR),
                               read_only=True) as manager:
    state = trainer.restore(manager)
  return trainer, state


def score(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, params) -> float:
  """Test bits per byte (text) or test accuracy of `params` in `state`'s model."""
  test = trainer.evaluate(state._replace(params=params))
  return test["loss"] / math.log(2) if trainer.data.text else test["accuracy"]


def learn(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState,
          method: sparsejax.learned.LearnedMask, score_tx: optax.GradientTransformation,
          opt_state: optax.OptState, steps: int, log=print) -> tuple[optax.OptState, float]:
  """`steps` mask-learning steps over frozen weights on the run's training
  batches (from step 0 of its data order); returns the optimizer state and
  the steps per second (compiling excluded)."""
  tx = method.wrap(None, score_tx)
  model, params = trainer.model, state.params
  extra = {"batch_stats": state.batch_stats} if state.batch_stats else {}

  @jax.jit
  def step(opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": method.forward(p, opt_state), **extra}, images,
                           train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    _, opt_state = tx.update(grads, opt_state, params)  # the weight updates are zeros
    return opt_state, loss

  compiled = step.lower(opt_state, *trainer.batch(0)).compile()
  start = None
  for i in range(steps):
    if i == 1:
      start = time.perf_counter()
    opt_state, loss = compiled(opt_state, *trainer.batch(i))
    if (i + 1) % max(1, steps // 5) == 0 or i == steps - 1:
      log(f"  step {i + 1}/{steps}: training loss {float(loss):.4f}")
  jax.block_until_ready(opt_state)
  rate = (steps - 1) / (time.perf_counter() - start) if steps > 1 else float("nan")
  return opt_state, rate


def maskllm(trainer, state, steps: int, lrs: list[float], exclude: str, log=print) -> dict:
  """Dense, SparseGPT 2:4 (updated weights; its mask on the dense weights),
  and MaskLLM 2:4 from SparseGPT's mask after `steps` steps at each of `lrs`."""
  keep = methods_lib.leaf_filter(ml_collections.ConfigDict({"include": "", "exclude": exclude}),
                                 section="")
  rows = {"dense": score(trainer, state, state.params)}
  batches = oneshot.calibration_batches(trainer.data, 128, 32, 0)
  hessians = oneshot_lib.linen_hessians(trainer.model, batches, apply_kwargs={"train": False})
  pruned, prior = oneshot_lib.prune_sequentially(state.params, hessians, "sparsegpt", nm=(2, 4),
                                                 leaf_filter=keep)
  rows["SparseGPT 2:4"] = score(trainer, state, pruned)
  rows["SparseGPT's 2:4 mask, dense weights"] = score(
      trainer, state, sparsejax.apply_masks(state.params, prior))
  method = sparsejax.MaskLLM(2, 4, num_steps=steps, prior=None, leaf_filter=keep)
  logits = method.init_logits(state.params, prior_masks=prior)  # prior strength 3.0
  changed = {}
  for lr in lrs:
    log(f"  MaskLLM, score lr {lr:g}:")
    score_tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    opt_state = method.wrap(None, score_tx).init(state.params)
    opt_state = sparsejax.learned.with_scores(opt_state, logits, method, state.params, score_tx)
    opt_state, rate = learn(trainer, state, method, score_tx, opt_state, steps, log)
    name = f"MaskLLM 2:4 ({steps} steps, score lr {lr:g})"
    rows[name] = score(trainer, state, method.eval_forward(state.params, opt_state))
    changed[name] = _changed(prior, sparsejax.find_learned_state(opt_state).masks)
  return {"rows": rows, "steps_per_second": rate, "mask_changed": changed}


def jackpots(trainer, state, steps: int, lr: float, sparsity: float, exclude: str,
             log=print) -> dict:
  """Dense, one-shot per-layer magnitude at `sparsity` (no fine-tuning), and
  Lottery Jackpots from it after `steps` steps (swaps on every step but the
  last 10%)."""
  keep = methods_lib.leaf_filter(ml_collections.ConfigDict({"include": "", "exclude": exclude}),
                                 section="")
  rows = {"dense": score(trainer, state, state.params)}
  method = sparsejax.LotteryJackpots(sparsity, num_steps=steps,
                                     swap_end_step=int(round(0.9 * steps)), leaf_filter=keep)
  score_tx = optax.chain(optax.add_decayed_weights(5e-4),
                         optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9))
  opt_state = method.wrap(None, score_tx).init(state.params)
  start = sparsejax.find_learned_state(opt_state).masks
  rows[f"magnitude {sparsity:.0%}, one-shot"] = score(
      trainer, state, method.eval_forward(state.params, opt_state))
  opt_state, rate = learn(trainer, state, method, score_tx, opt_state, steps, log)
  name = f"Lottery Jackpots {sparsity:.0%} ({steps} steps)"
  rows[name] = score(trainer, state, method.eval_forward(state.params, opt_state))
  changed = {name: _changed(start, sparsejax.find_learned_state(opt_state).masks)}
  return {"rows": rows, "steps_per_second": rate, "mask_changed": changed}


def _changed(before, after) -> float:
  """Fraction of the masked weights whose keep/prune state differs."""
  pairs = [(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  return sum(int(jnp.sum(a != b)) for a, b in pairs) / sum(a.size for a, _ in pairs)


def main(argv):
  del argv
  if METHOD.value is None or TRAIN_WORKDIR.value is None:
    raise app.UsageError("--method and --train_workdir are required.")
  try:
    lrs = [float(v) for v in SCORE_LR.value or []]
  except ValueError:
    raise app.UsageError(f"--score_lr={','.join(SCORE_LR.value)}: not numbers.") from None
  if METHOD.value == "jackpots" and len(lrs) > 1:
    raise app.UsageError("--score_lr: one learning rate for jackpots.")
  trainer, state = restore(TRAIN_WORKDIR.value, BATCH_SIZE.value)
  what = "test bits per byte" if trainer.data.text else "test accuracy"
  print(f"[learned_study] {METHOD.value} on {trainer.config.model.name} from "
        f"{TRAIN_WORKDIR.value} (step {int(state.step)}); {what}:")
  if METHOD.value == "maskllm":
    exclude = "embed|position|head" if EXCLUDE.value is None else EXCLUDE.value
    out = maskllm(trainer, state, STEPS.value, lrs or [5e-4], exclude)
  else:
    exclude = "head" if EXCLUDE.value is None else EXCLUDE.value
    out = jackpots(trainer, state, STEPS.value, (lrs or [0.1])[0], SPARSITY.value, exclude)
  for name, value in out["rows"].items():
    changed = out["mask_changed"].get(name)
    print(f"  {name}: {value:.4f}" + ("" if changed is None else
                                      f" ({changed:.2%} of the masked weights changed state)"))
  print(f"  mask-learning steps per second: {out['steps_per_second']:.2f}")


if __name__ == "__main__":
  app.run(main)
