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


def _train(tx, steps):
  """Yields (t, params before step t, params after it, opt_state after it)."""
  params = models.linen_params()
  opt_state = tx.init(params)
  step = _make_step(tx)
  x, y = models.batch()
  for t in range(steps):
    new_params, opt_state = step(params, opt_state, x, y)
    yield t, params, new_params, opt_state
    params = new_params


def _final(tx, steps):
  """(params, opt_state) after `steps` steps."""
  for _, _, params, opt_state in _train(tx, steps):
    pass
  return params, opt_state


def _kernels(params):
  return {leaf.path: np.asarray(leaf.value)
          for leaf in sparsejax.trees.named_leaves(params) if leaf.path in KERNELS}


def test_gradual_pruning_follows_polynomial_schedule_and_keeps_pruned_weights_zero():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.9, begin_step=5, end_step=45, update_frequency=10)
  tx = sparsejax.GradualMagnitudePruning(schedule).wrap(optax.adam(1e-2))
  for t, before, params, opt_state in _train(tx, 60):
    before = _kernels(before)
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
  # Adam's first moment sees only the gradients it is given: with masks set
  # at step 0, mu must stay exactly 0 on pruned entries and equal
  # (1 - b1) * g on kept ones after the first step.
  tx = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.5, step=0)).wrap(
      optax.adam(1e-2, b1=0.9))
  params = models.linen_params()
  x, y = models.batch()
  grads = jax.grad(_loss)(params, x, y)
  updates, state = tx.update(grads, tx.init(params), params)
  mu = _kernels(state.inner_state[0].mu)
  for path, g in _kernels(grads).items():
    keep = reference.topk_mask(np.abs(_kernels(params)[path]), 0.5)
    np.testing.assert_allclose(mu[path], np.where(keep, 0.1 * g, 0.0), rtol=1e-6)
    assert np.all(mu[path][~keep] == 0.0)
    assert np.all(_kernels(updates)[path][~keep] == -_kernels(params)[path][~keep])


def test_global_gradual_masks_match_reference_at_every_update_step():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=20, update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="global").wrap(optax.adam(1e-2))
  for t, before, params, opt_state in _train(tx, 21):
    before = [np.abs(w) for w in _kernels(before).values()]  # jax.tree leaf order
    if t % 5 == 0:
      s_t = float(np.float32(reference.polynomial_sparsity(t, 0.0, 0.8, 0, 20, 5)))
      masks = list(_kernels(opt_state.masks).values())
      for got, want in zip(masks, reference.global_topk_masks(before, s_t)):
        np.testing.assert_array_equal(got, want)
  report = sparsejax.sparsity_report(opt_state.masks)
  assert report.kept == round(0.2 * report.size)


def test_custom_allocation_ramps_each_matched_leaf_to_its_own_target():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=10, update_frequency=5)
  pruner = sparsejax.GradualMagnitudePruning(schedule, allocation={"Dense_2": 0.5})
  tx = pruner.wrap(optax.sgd(0.1))
  for t, _, params, opt_state in _train(tx, 11):
    if t == 5:  # half way: s = target * (1 - (1 - 0.5)**3)
      report = sparsejax.sparsity_report(opt_state.masks)
      assert report.leaves["Dense_2/kernel"].kept == round((1 - 0.5 * 0.875) * 64)
      assert report.leaves["Dense_0/kernel"].kept == round((1 - 0.8 * 0.875) * 640)
  report = sparsejax.sparsity_report(opt_state.masks)
  assert report.leaves["Dense_2/kernel"].kept == 32
  assert report.leaves["Dense_1/kernel"].kept == round(0.2 * 512)


def test_random_score_masks_are_nested_and_match_the_zeroed_weights():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=12, update_frequency=2)
  tx = sparsejax.GradualMagnitudePruning(schedule, score="random", key=jax.random.key(7)).wrap(
      optax.sgd(0.1))
  previous = None
  for _, _, params, opt_state in _train(tx, 14):
    masks = _kernels(opt_state.masks)
    for path, w in _kernels(params).items():
      np.testing.assert_array_equal(w != 0, masks[path])  # what the masks say is what is zero
      if previous is not None:
        assert not np.any(masks[path] & ~previous[path])  # never revived
    previous = masks


def test_wrapping_a_chain_with_weight_decay_keeps_pruned_weights_zero():
  inner = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1))
  tx = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.6)).wrap(inner)
  params, _ = _final(tx, 3)
  for path, w in _kernels(params).items():
    assert np.count_nonzero(w) == round(0.4 * w.size), path


def test_masked_params_inside_multi_transform():
  pruner = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5))
  labels = lambda params: jax.tree.map(lambda w: "prune" if w.ndim >= 2 else "dense", params)
  tx = optax.multi_transform({"prune": pruner.wrap(optax.sgd(0.1)), "dense": optax.adam(1e-3)}, labels)
  params = models.linen_params()
  x, y = models.batch()
  updates, state = tx.update(jax.grad(_loss)(params, x, y), tx.init(params), params)
  masked = sparsejax.masked_params(params, state)
  for path, w in _kernels(masked).items():
    np.testing.assert_array_equal(w != 0, reference.topk_mask(np.abs(_kernels(params)[path]), 0.5))
  assert np.count_nonzero(masked["Dense_0"]["bias"]) == np.count_nonzero(params["Dense_0"]["bias"])
  pruned = optax.apply_updates(params, updates)
  assert all(np.count_nonzero(w) == w.size // 2 for w in _kernels(pruned).values())


def test_erk_allocation_ramps_each_leaf_to_its_erk_target():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=10, update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="erk").wrap(optax.sgd(0.1))
  _, opt_state = _final(tx, 11)
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
  for path in ("hidden0/kernel", "hidden1/kernel", "out/kernel"):  # the weights are zeroed
    assert report.leaves[path].zero_fraction == 0.75, path
  assert report.leaves["hidden0/bias"].zero_fraction < 0.5  # biases are not pruned
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
  with pytest.raises(ValueError, match="needs key"):
    sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5), score="random")
  typo = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5), allocation={"Dense_9": 0.1})
  with pytest.raises(ValueError, match=r"\['Dense_9'\] match no prunable leaf"):
    typo.wrap(optax.sgd(0.1)).init(params)


def test_zero_pruned_and_updates_to_zero_on_a_hand_example():
  from sparsejax import gradual
  params = {"w": jnp.array([0.5, -2.0, 3.0]), "b": jnp.array([1.0])}
  masks = {"w": jnp.array([True, False, True]), "b": None}
  grads = {"w": jnp.array([0.1, 0.2, 0.3]), "b": jnp.array([0.4])}
  zeroed = gradual.zero_pruned(grads, masks)
  np.testing.assert_array_equal(np.asarray(zeroed["w"]), np.float32([0.1, 0.0, 0.3]))
  np.testing.assert_array_equal(np.asarray(zeroed["b"]), np.float32([0.4]))
  updates = gradual.updates_to_zero(grads, params, masks)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["w"]), np.float32([0.6, 0.0, 3.3]))
  assert np.asarray(new["w"])[1] == 0.0 and not np.signbit(np.asarray(new["w"])[1])
  np.testing.assert_array_equal(np.asarray(new["b"]), np.float32([1.4]))


def test_state_masks_turns_masked_nodes_into_none():
  from sparsejax import gradual
  params = {"dense": {"kernel": jnp.ones((4, 4))}, "embed": jnp.ones((3, 4))}
  tx = optax.multi_transform(
      {"prune": sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5)).wrap(optax.sgd(0.1)),
       "keep": optax.sgd(0.1)},
      {"dense": {"kernel": "prune"}, "embed": "keep"})
  masks = gradual.state_masks(tx.init(params))
  assert masks["embed"] is None
  assert np.asarray(masks["dense"]["kernel"]).all()
