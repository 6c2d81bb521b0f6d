"""GraNet's defaults against a NumPy port of its code's mask step (VITA-Group/GraNet).

An update step is GraNet's `Masking.step`: the optimizer step, then pruning
and regrowth from the stepped weights (with `gradient_on_update=False`, RigL's
order, the test fails).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import dst

SHAPES = {"a": (12, 10), "b": (10, 8), "c": (8, 3)}
EVERY, FINAL_PRUNE, TOTAL = 10, 40, 100   # update_frequency, final_prune step, all steps
INIT_DENSITY, FINAL_DENSITY, DEATH_RATE = 0.5, 0.1, 0.5


def granet_masking_step(weights, masks, grads, steps, keep_rule=None):
  """GraNet's `Masking.step` after its optimizer step and `apply_mask`, for
  method='GraNet' (global pruning), death='magnitude', growth='gradient',
  redistribution 'none', init_prune_epoch 0 (CIFAR/sparselearning/core.py):
  the death rate (`CosineDecay`: CosineAnnealingLR from DEATH_RATE to 0.005
  over TOTAL steps), then at multiples of EVERY `pruning(steps)` and
  `truncate_weights(steps)`, in float64.

  `keep_rule(n, rate)` replaces `pruning`'s keep rule (int(n * (1 - rate))
  and |w| > the keep-th largest, which keeps one weight fewer) by an exact
  count kept with >=.
  """
  death = 0.005 + (DEATH_RATE - 0.005) * (1 + math.cos(math.pi * steps / TOTAL)) / 2
  w = {n: np.array(v, np.float64) for n, v in weights.items()}
  m = {n: np.array(v, bool) for n, v in masks.items()}
  if steps % EVERY:
    return w, m
  # pruning(step)
  curr, final_iter, ini_iter = int(steps / EVERY), int(FINAL_PRUNE / EVERY), 0
  if ini_iter <= curr <= final_iter - 1:
    decay = (1 - (curr - ini_iter) / (final_iter - ini_iter)) ** 3
    rate = (1 - INIT_DENSITY) + (INIT_DENSITY - FINAL_DENSITY) * (1 - decay)
    scores = np.concatenate([np.abs(w[n]).ravel() for n in w])
    keep = int(len(scores) * (1 - rate)) if keep_rule is None else keep_rule(len(scores), rate)
    threshold = np.sort(scores)[::-1][keep - 1]
    for n in w:
      m[n] = np.abs(w[n]) > threshold if keep_rule is None else np.abs(w[n]) >= threshold
      w[n] = w[n] * m[n]
  # truncate_weights(step): magnitude death, then gradient growth, per layer
  for n in w:
    nonzeros, zeros = int(m[n].sum()), int(m[n].size - m[n].sum())
    num_remove = math.ceil(death * nonzeros)
    if num_remove == 0:
      new = w[n] != 0.0
    else:
      k = math.ceil(zeros + num_remove)
      threshold = np.sort(np.abs(w[n]).ravel())[k - 1]
      new = np.abs(w[n]) > threshold
    regrowth = nonzeros - int(new.sum())
    grad = np.abs(np.asarray(grads[n], np.float64) * (~new))
    order = np.argsort(-grad.ravel(), kind="stable")
    flat = new.ravel()
    flat[order[:regrowth]] = True
    m[n] = flat.reshape(new.shape)
    w[n] = w[n] * m[n]
  return w, m


def _granet(**overrides):
  schedule = sparsejax.PolynomialSchedule(1 - INIT_DENSITY, 1 - FINAL_DENSITY, begin_step=0,
                                          end_step=FINAL_PRUNE, update_frequency=EVERY)
  options = dict(end_step=TOTAL, update_every=EVERY, drop_fraction=DEATH_RATE,
                 min_drop_fraction=0.005, rounding="ceil", allocation="global",
                 regrow_scope="leaf", key=jax.random.key(0))
  return dst.DropAndGrow(schedule, **{**options, **overrides})


def _state_at(step, density, seed):
  """Weights (0 where masked, as GraNet's apply_mask leaves them), masks, gradients."""
  rng = np.random.default_rng(seed)
  masks = {n: rng.random(s) < density for n, s in SHAPES.items()}
  weights = {n: (rng.normal(size=s) * masks[n]).astype(np.float32) for n, s in SHAPES.items()}
  grads = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
  return weights, masks, grads


@pytest.mark.parametrize("step, density", [(10, 0.5), (20, 0.4), (30, 0.3), (50, 0.12),
                                           (90, 0.12)])
def test_granet_update_equals_a_numpy_port_of_granets_masking_step(step, density):
  weights, masks, grads = _state_at(step, density, seed=step)
  tx = _granet().wrap(optax.sgd(0.1))
  state = sparsejax.with_masks(tx.init(weights), masks)._replace(count=jnp.int32(step))
  updates, state = jax.jit(tx.update)(grads, state, weights)
  params = optax.apply_updates(weights, updates)
  got = sparsejax.state_masks(state)
  # GraNet's Masking.step: optimizer.step() and apply_mask() first (SGD here), then
  # the masking step on the stepped weights, growing by the gradient of that batch.
  stepped = {n: np.where(masks[n], weights[n] + np.float32(-0.1) * grads[n], np.float32(0))
             for n in SHAPES}
  # pruning keeps round((1 - s) * n) here; GraNet's code int((1 - s) * n) - 1 (see README)
  want_w, want_m = granet_masking_step(stepped, masks, grads, step,
                                       keep_rule=lambda n, rate: round(n * (1 - rate)))
  for n in SHAPES:
    np.testing.assert_array_equal(np.asarray(got[n]), want_m[n], err_msg=f"{step} {n}")
    np.testing.assert_array_equal(np.asarray(params[n]), want_w[n].astype(np.float32))
  _, floor_m = granet_masking_step(stepped, masks, grads, step)
  gap = sum(int(want_m[n].sum()) - int(floor_m[n].sum()) for n in SHAPES)
  assert (gap >= 1) if step < FINAL_PRUNE else gap == 0  # int() and GraNet's strict >
  # ceil, not RigL's floor, matters here: some leaf's floor and ceil differ
  death = float(dst.cosine_drop_fraction(DEATH_RATE, step, TOTAL, 0.005))
  active = [int(np.asarray(m).sum()) for m in jax.tree.leaves(got)]
  assert any(math.ceil(death * a) != math.floor(death * a) for a in active)


def test_granet_regrows_per_layer_after_global_pruning_and_until_the_end():
  weights, masks, grads = _state_at(0, 0.5, seed=7)
  tx = _granet()
  for step in (EVERY, FINAL_PRUNE + EVERY, TOTAL - EVERY):
    assert bool(tx.is_update_step(step))
    pruned = tx._scheduled(  # pylint: disable=protected-access
        weights, jax.tree.map(jnp.asarray, masks), step)
    new, _ = tx.update_masks(weights, masks, grads, step)
    for n in SHAPES:  # regrowth keeps each layer's count after the (global) pruning
      assert int(np.asarray(new[n]).sum()) == int(np.asarray(pruned[n]).sum()), (step, n)
  assert float(tx.fraction(TOTAL)) == pytest.approx(0.005)
  assert float(tx.fraction(0)) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounding="round"), "rounding='round': use one of"),
    (dict(regrow_scope="layer"), "regrow_scope='layer': use one of"),
    (dict(regrow_scope="global", allocation="erk"), "regrow_scope='global' moves weights"),
    (dict(min_drop_fraction=0.6), r"min_drop_fraction=0.6 must be in \[0, drop_fraction=0.5\]"),
    (dict(decay="constant"), "min_drop_fraction=0.005 is the end of the cosine"),
])
def test_granet_options_that_cannot_work_are_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _granet(**kwargs)
