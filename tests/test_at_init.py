"""SNIP, SynFlow, normalised global scores and STE training, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from tests import reference


def _linear_net(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": {"kernel": rng.normal(size=(6, 5)).astype(np.float32)},
          "w2": {"kernel": rng.normal(size=(5, 4)).astype(np.float32) * 3}}


def _apply(params, x):
  return x @ params["w1"]["kernel"] @ params["w2"]["kernel"]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_snip_masks_are_numpy_top_k_of_g_times_w(allocation):
  params = _linear_net()
  x = np.random.default_rng(1).normal(size=(16, 6)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.sum(_apply(p, x) ** 2))(params)
  masks = jax.jit(lambda p, g: sparsejax.snip_masks(p, g, 0.7, allocation=allocation))(
      params, grads)
  scores = [np.abs(np.asarray(grads[n]["kernel"]) * params[n]["kernel"]) for n in ("w1", "w2")]
  want = (reference.global_topk_masks(scores, 0.7) if allocation == "global"
          else [reference.topk_mask(s, 0.7) for s in scores])
  for name, expected in zip(("w1", "w2"), want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected)


def test_snip_without_gradients_is_an_error():
  with pytest.raises(ValueError, match="'snip' needs the loss gradient: pass grads="):
    sparsejax.compute_masks(_linear_net(), 0.5, score="snip")


def test_normalised_global_scores_divide_each_layer_by_its_norm():
  params = _linear_net()
  masks = sparsejax.compute_masks(params, 0.6, allocation="global", normalize=True)
  scores = [np.abs(params[n]["kernel"]) for n in ("w1", "w2")]
  want = reference.global_topk_masks([s / (np.linalg.norm(s) + 1e-8) for s in scores], 0.6)
  for name, expected in zip(("w1", "w2"), want):
    np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected)
  # Without normalisation w2 (3x larger weights) would keep more.
  plain = sparsejax.compute_masks(params, 0.6, allocation="global")
  assert int(plain["w2"]["kernel"].sum()) > int(masks["w2"]["kernel"].sum())


def _numpy_synflow(params, sparsity, iterations):
  """SynFlow on x @ W1 @ W2 by hand: R = 1^T |W1| |W2| 1, so dR/dW1_ij = (|W2| 1)_j
  and dR/dW2_jk = (1^T |W1|)_j, on the masked absolute weights."""
  w1, w2 = np.abs(params["w1"]["kernel"]), np.abs(params["w2"]["kernel"])
  m1, m2 = np.ones(w1.shape, bool), np.ones(w2.shape, bool)
  for k in range(1, iterations + 1):
    target = sparsity if k == iterations else 1 - (1 - sparsity) ** (k / iterations)
    a1, a2 = w1 * m1, w2 * m2
    s1 = a1 * (a2.sum(axis=1))[None, :]
    s2 = a2 * (a1.sum(axis=0))[:, None]
    # Pruned weights rank below every live one (their score is 0 anyway).
    s1 = np.where(m1, s1, -1.0)
    s2 = np.where(m2, s2, -1.0)
    m1, m2 = reference.global_topk_masks([s1, s2], target)
  return m1, m2


@pytest.mark.parametrize("iterations", [1, 4])
def test_synflow_masks_equal_the_hand_derived_flow_of_a_linear_net(iterations):
  params = _linear_net(2)
  masks = sparsejax.synflow_masks(_apply, params, 0.8, (1, 6), iterations=iterations)
  want1, want2 = _numpy_synflow(params, 0.8, iterations)
  np.testing.assert_array_equal(np.asarray(masks["w1"]["kernel"]), want1)
  np.testing.assert_array_equal(np.asarray(masks["w2"]["kernel"]), want2)
  assert int(want1.sum() + want2.sum()) == round(0.2 * 50)


def test_synflow_rejects_zero_iterations():
  with pytest.raises(ValueError, match="iterations=0 must be an int >= 1"):
    sparsejax.synflow_masks(_apply, _linear_net(), 0.5, (1, 6), iterations=0)


def test_ste_training_keeps_pruned_weights_and_lets_them_come_back():
  params = _linear_net(3)
  schedule = sparsejax.PolynomialSchedule(0.0, 0.6, begin_step=0, end_step=20,
                                          update_frequency=2)
  tx = sparsejax.GradualMagnitudePruning(schedule, allocation="global",
                                         straight_through=True).wrap(optax.sgd(0.05))
  state = tx.init(params)
  x = np.random.default_rng(4).normal(size=(32, 6)).astype(np.float32)
  y = np.random.default_rng(5).normal(size=(32, 4)).astype(np.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean(
        (_apply(sparsejax.ste_masked_params(p, state), x) - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  revived, pruned_before = 0, None
  for t in range(24):
    before = params
    params, state, grads = step(params, state)
    masks = sparsejax.state_masks(state)
    if schedule.is_update_step(t):  # masks: the global top |w| of all weights, as they were
      want = reference.global_topk_masks(
          [np.abs(before[n]["kernel"]) for n in ("w1", "w2")], float(schedule(t)))
      for name, expected in zip(("w1", "w2"), want):
        np.testing.assert_array_equal(np.asarray(masks[name]["kernel"]), expected)
    # Dense updates: every weight moved by -lr * its straight-through gradient.
    for name in ("w1", "w2"):
      np.testing.assert_allclose(np.asarray(params[name]["kernel"]),
                                 np.asarray(before[name]["kernel"]) -
                                 0.05 * np.asarray(grads[name]["kernel"]), rtol=1e-6, atol=1e-7)
    current = np.asarray(masks["w1"]["kernel"])
    if pruned_before is not None:
      revived += int(np.sum(pruned_before & current))
    pruned_before = ~current
  assert revived > 0
  assert float(jnp.mean(params["w1"]["kernel"] == 0)) == 0.0  # the params stay dense
