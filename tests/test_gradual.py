"""Gradual magnitude pruning as an optax wrapper, checked against the
polynomial formula and a numpy top-k of the weights it saw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from tests import models
from tests import reference

KERNELS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")


def _loss(params, x, y):
  logits = models.LinenMLP().apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _make_step(tx):
  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _kernels(params):
  return {leaf.path: np.asarray(leaf.value)
          for leaf in sparsejax.trees.named_leaves(params) if leaf.path in KERNELS}


def test_gradual_pruning_follows_polynomial_schedule_and_keeps_pruned_weights_zero():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.9, begin_step=5, end_step=45, update_frequency=10)
  tx = sparsejax.GradualMagnitudePruning(schedule).wrap(optax.adam(1e-2))
  params = models.linen_params()
  opt_state = tx.init(params)
  step = _make_step(tx)
  x, y = models.batch()
  for t in range(60):
    before = _kernels(params)
    params, opt_state = step(params, opt_state, x, y)
    s_t = reference.polynomial_sparsity(t, 0.0, 0.9, 5, 45, 10)
    masks = {l.path: np.asarray(l.value) for l in sparsejax.trees.named_leaves(opt_state.masks)}
    after = _kernels(params)
    for path in KERNELS:
      if t >= 5:  # pruning starts at begin_step
        assert masks[path].sum() == round((1 - s_t) * masks[path].size), (t, path)
      if t in (5, 15, 25, 35, 45):  # update steps: masks are the top-k of |w| seen
        np.testing.assert_array_equal(
            masks[path], reference.topk_mask(np.abs(before[path]), float(np.float32(s_t))))
      assert np.all(after[path][~masks[path]] == 0.0), (t, path)
  final = sparsejax.sparsity_report(opt_state.masks)
  for path in KERNELS:
    size = final.leaves[path].size
    assert final.leaves[path].kept == round(0.1 * size)
    assert np.count_nonzero(_kernels(params)[path]) == round(0.1 * size)
  biases = [l for l in sparsejax.trees.named_leaves(params) if l.path.endswith("bias")]
  assert all(np.count_nonzero(np.asarray(b.value)) > 0 for b in biases)


def test_pruned_gradients_are_masked_before_the_inner_optimizer():
  # sgd(1): inner updates are -grads; pruned entries must get -p instead.
  tx = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.5, step=0)).wrap(optax.sgd(1.0))
  params = models.linen_params()
  x, y = models.batch()
  grads = jax.grad(_loss)(params, x, y)
  updates, state = tx.update(grads, tx.init(params), params)
  for leaf_p, leaf_g, leaf_u in zip(*(sparsejax.trees.named_leaves(t) for t in (params, grads, updates))):
    p, g, u = (np.asarray(v.value) for v in (leaf_p, leaf_g, leaf_u))
    if leaf_p.path in KERNELS:
      keep = reference.topk_mask(np.abs(p), 0.5)
      np.testing.assert_array_equal(u, np.where(keep, -g, -p))
    else:
      np.testing.assert_array_equal(u, -g)
  # A later step is not an update step: the masks stay, gradients stay masked.
  updates2, _ = tx.update(grads, state, optax.apply_updates(params, updates))
  for path, u in _kernels(updates2).items():
    keep = reference.topk_mask(np.abs(_kernels(params)[path]), 0.5)
    assert np.all(u[~keep] == 0.0)


def test_global_allocation_keeps_exact_total_at_the_end():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=20, update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="global").wrap(optax.adam(1e-2))
  params = models.linen_params()
  opt_state = tx.init(params)
  step = _make_step(tx)
  x, y = models.batch()
  for _ in range(21):
    params, opt_state = step(params, opt_state, x, y)
  report = sparsejax.sparsity_report(opt_state.masks)
  assert report.kept == round(0.2 * report.size)


def test_erk_allocation_ramps_each_leaf_to_its_erk_target():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=10, update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="erk").wrap(optax.sgd(0.1))
  params = models.linen_params()
  opt_state = tx.init(params)
  step = _make_step(tx)
  x, y = models.batch()
  for _ in range(11):
    params, opt_state = step(params, opt_state, x, y)
  shapes = [(20, 32), (32, 16), (16, 4)]
  densities = reference.erk_densities(0.8, shapes)
  report = sparsejax.sparsity_report(opt_state.masks)
  for path, shape, d in zip(KERNELS, shapes, densities):
    assert abs(report.leaves[path].kept - d * np.prod(shape)) <= 1, path


def test_gradual_pruning_works_with_flax_nnx_optimizer():
  model = models.NnxMLP(nnx.Rngs(0))
  schedule = sparsejax.PolynomialSchedule(0.0, 0.75, begin_step=0, end_step=12, update_frequency=4)
  optimizer = nnx.Optimizer(model, sparsejax.GradualMagnitudePruning(schedule).wrap(optax.adam(1e-2)),
                            wrt=nnx.Param)
  x, y = models.batch()

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))

  for _ in range(15):
    step(model, optimizer)
  report = sparsejax.sparsity_report(nnx.state(model, nnx.Param))
  for path in ("hidden0/kernel", "hidden1/kernel", "out/kernel"):
    assert report.leaves[path].kept == round(0.25 * report.leaves[path].size), path
  assert report.leaves["hidden0/bias"].sparsity < 0.5  # biases are not pruned
  masks = sparsejax.find_pruning_state(optimizer.opt_state).masks
  assert sparsejax.sparsity_report(masks).leaves["out/kernel"].kept == 16


def test_masked_params_finds_the_state_inside_a_chain():
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5)).wrap(optax.sgd(0.1)))
  params = models.linen_params()
  x, y = models.batch()
  _, state = tx.update(jax.grad(_loss)(params, x, y), tx.init(params), params)
  masked = sparsejax.masked_params(params, state)
  for path, w in _kernels(masked).items():
    expected = np.where(reference.topk_mask(np.abs(_kernels(params)[path]), 0.5), _kernels(params)[path], 0)
    np.testing.assert_array_equal(w, expected)


def test_missing_params_and_missing_state_give_clear_errors():
  tx = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5)).wrap(optax.sgd(0.1))
  params = models.linen_params()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="no PruningState"):
    sparsejax.masked_params(params, optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match="unknown allocation"):
    sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5), allocation="erk2")
