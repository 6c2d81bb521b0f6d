"""BiP: alternating lower-level weight and upper-level score updates (sparsejax.bip)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.bip import BiP
from sparsejax.bip import score_gradients


def test_implicit_gradient_on_a_linear_model_equals_the_hand_derived_value():
  # y = x . (m * theta), L = (y - 1)^2 / 2, x = (1, 2, 3), theta = (0.5, -1, 2).
  # Scores |theta| = (0.5, 1, 2) keep 2 of 3: m = (0, 1, 1); y = -2 + 6 = 4, dL/dy = 3,
  # g = 3 x = (3, 6, 9); grad_m = g * theta = (1.5, -6, 18); grad_theta = g * m = (0, 6, 9);
  # implicit = -0.1 * grad_m * grad_theta = (0, 3.6, -16.2); score gradient (1.5, -2.4, 1.8);
  # sgd(1): s = (-1, 3.4, 0.2), mask top-2 of |s| = (1, 1, 0).
  x = jnp.array([[1.0, 2.0, 3.0]])
  params = {"lin": {"kernel": jnp.array([[0.5], [-1.0], [2.0]])}}
  method = BiP(1 / 3, lr2=0.1, num_steps=4)
  tx = method.wrap(optax.sgd(0.0), optax.sgd(1.0))

  @jax.jit
  def step(state):
    loss = lambda p: 0.5 * jnp.sum((x @ method.forward(p, state)["lin"]["kernel"] - 1.0) ** 2)
    grads = jax.grad(loss)(params)
    return grads, tx.update(grads, state, params)

  state = jax.jit(tx.init)(params)
  np.testing.assert_array_equal(state.masks["lin"]["kernel"].ravel(), [False, True, True])
  grads, (_, state) = step(state)  # update 0: the lower level (lr 0: theta unchanged)
  np.testing.assert_allclose(grads["lin"]["kernel"].ravel(), [3.0, 6.0, 9.0])
  np.testing.assert_allclose(
      score_gradients(grads, params, state.masks, 0.1)["lin"]["kernel"].ravel(),
      [1.5, -2.4, 1.8], rtol=1e-6)
  _, (updates, state) = step(state)  # update 1: the upper level
  assert float(jnp.abs(updates["lin"]["kernel"]).max()) == 0.0
  np.testing.assert_allclose(state.scores["lin"]["kernel"].ravel(), [-1.0, 3.4, 0.2], rtol=1e-6, atol=2e-6)
  np.testing.assert_array_equal(state.masks["lin"]["kernel"].ravel(), [True, True, False])


def test_lr2_zero_is_hydras_straight_through_score_update():
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}
  batches = [(jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
              jnp.asarray(rng.integers(0, 3, size=16))) for _ in range(2)]

  def loss(weights, batch):
    x, y = batch
    h = jnp.tanh(x @ weights["Dense_0"]["kernel"] + weights["Dense_0"]["bias"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ weights["Dense_1"]["kernel"], y).mean()

  method = BiP(0.75, lr2=0.0, num_steps=4)
  tx = method.wrap(optax.sgd(0.3), optax.sgd(0.2))

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: loss(method.forward(p, state), batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state0 = jax.jit(tx.init)(params)
  params1, state1 = step(params, state0, batches[0])
  params2, state2 = step(params1, state1, batches[1])

  # The reference, in NumPy around jax.grad of the plainly masked model.
  m0 = {k: np.asarray(state0.masks[k]["kernel"]) for k in ("Dense_0", "Dense_1")}
  def masked(p):
    return {"Dense_0": {"kernel": p["Dense_0"]["kernel"] * m0["Dense_0"], "bias": p["Dense_0"]["bias"]},
            "Dense_1": {"kernel": p["Dense_1"]["kernel"] * m0["Dense_1"]}}
  # Lower level on batch A: theta -= 0.3 * grad_theta (= g * m); the scores stay.
  g_a = jax.jit(jax.grad(lambda p: loss(masked(p), batches[0])))(params)
  for k in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(params1[k]["kernel"], params[k]["kernel"] - 0.3 * g_a[k]["kernel"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state1.scores[k]["kernel"], state0.scores[k]["kernel"])
  # Upper level on batch B: Hydra's s -= 0.2 * dL/dm, dL/dm = g * theta; theta stays.
  g_b = jax.jit(jax.grad(lambda w: loss(w, batches[1])))(masked(params1))  # g: gradient at W * m
  for k in ("Dense_0", "Dense_1"):
    theta = np.asarray(params1[k]["kernel"])
    want = np.abs(np.asarray(params[k]["kernel"])) - 0.2 * np.asarray(g_b[k]["kernel"]) * theta
    np.testing.assert_allclose(state2.scores[k]["kernel"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params2[k]["kernel"], params1[k]["kernel"])
    kept = round(0.25 * theta.size)
    assert int(state2.masks[k]["kernel"].sum()) == kept
    top = np.argsort(-np.abs(want).ravel(), kind="stable")[:kept]
    assert set(np.nonzero(np.asarray(state2.masks[k]["kernel"]).ravel())[0]) == set(top)


def test_bad_values_raise_naming_them():
  with pytest.raises(ValueError, match="lr2"):
    BiP(0.5, lr2=-1.0, num_steps=4)
  with pytest.raises(ValueError, match="start_step"):
    BiP(0.5, lr2=0.0, num_steps=4, start_step=4)
  with pytest.raises(ValueError, match="give tx"):
    BiP(0.5, lr2=0.0, num_steps=4, start_step=2).wrap(None, optax.sgd(0.1))
