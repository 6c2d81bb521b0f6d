"""Lottery Jackpots: scores over frozen weights, swaps that keep counts (sparsejax.jackpots)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.jackpots import LotteryJackpots
from sparsejax.jackpots import short_restriction


def _numpy_pop_up(scores, b_mask, prune_rate, rate):
  """A NumPy port of the authors' `ls_pop_up` (utils/conv_type.py) on one layer."""
  m = scores.ravel().astype(np.float64)
  flat = b_mask.ravel().copy()
  prune_num = int(prune_rate * m.size)
  threshold = np.sort(m)[prune_num - 1]
  idx0, idx1 = np.nonzero(flat == 0)[0], np.nonzero(flat)[0]
  pop0 = np.nonzero(m[idx0] > threshold)[0]
  pop1 = np.nonzero(m[idx1] <= threshold)[0]
  if pop0.size and pop1.size and pop0.size == pop1.size:
    order0 = np.argsort(-m[idx0][pop0], kind="stable")
    order1 = np.argsort(m[idx1][pop1], kind="stable")
    n = math.ceil(pop0.size * rate) if pop0.size > 1 else pop0.size
    flat[idx0[pop0][order0[:n]]] = True
    flat[idx1[pop1][order1[:n]]] = False
  return flat.reshape(b_mask.shape)


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(20, 10)), jnp.float32),
                        "bias": jnp.zeros(10)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(10, 5)), jnp.float32)}}
  x = jnp.asarray(rng.normal(size=(32, 20)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, size=32))
  return params, x, y


def _loss(params, x, y):
  h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["Dense_1"]["kernel"], y).mean()


@pytest.fixture(scope="module")
def run():
  """Six jitted steps at 90% with sgd(0.5) on the scores, swap_rate 0.5, swaps end at 4."""
  params, x, y = _setup()
  method = LotteryJackpots(0.9, num_steps=6, swap_rate=0.5, swap_end_step=4)
  tx = method.wrap(None, optax.sgd(0.5))

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: _loss(method.forward(p, state), x, y))(params)
    updates, new = tx.update(grads, state, params)
    return grads, updates, new

  states, grads = [jax.jit(tx.init)(params)], []
  for _ in range(6):
    g, updates, new = step(states[-1])
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))  # frozen
    states.append(new)
    grads.append(g)
  return params, method, states, grads


def test_scores_start_at_one_for_magnitude_survivors_and_099_elsewhere(run):
  params, _, states, _ = run
  w = np.abs(np.asarray(params["Dense_0"]["kernel"])).ravel()
  kept = np.zeros(w.size, bool)
  kept[np.argsort(-w, kind="stable")[:20]] = True  # round(0.1 * 200)
  s = np.asarray(states[0].scores["Dense_0"]["kernel"]).ravel()
  np.testing.assert_array_equal(s, np.where(kept, 1.0, 0.99).astype(np.float32))
  assert states[0].scores["Dense_0"]["bias"] is None


def test_every_step_keeps_each_layers_count_and_swaps_stop_at_swap_end_step(run):
  _, _, states, _ = run
  changed = 0
  for i, state in enumerate(states):
    assert int(state.masks["Dense_0"]["kernel"].sum()) == 20
    assert int(state.masks["Dense_1"]["kernel"].sum()) == 5
    if i:
      diff = int((state.masks["Dense_0"]["kernel"] != states[i - 1].masks["Dense_0"]["kernel"]).sum())
      changed += diff
      if i > 4:  # updates 4 and 5 come after swap_end_step
        assert diff == 0
  assert changed > 0


def test_one_update_equals_a_numpy_port_of_the_authors_rule(run):
  params, _, states, grads = run
  for i in range(4):
    before, after, g = states[i], states[i + 1], grads[i]
    for layer in ("Dense_0", "Dense_1"):
      w = np.asarray(params[layer]["kernel"])
      scores = np.asarray(before.scores[layer]["kernel"]) - 0.5 * np.asarray(g[layer]["kernel"]) * w
      np.testing.assert_allclose(after.scores[layer]["kernel"], scores, rtol=1e-6, atol=1e-7)
      expected = _numpy_pop_up(np.asarray(after.scores[layer]["kernel"]),
                               np.asarray(before.masks[layer]["kernel"]), 0.9, 0.5)
      np.testing.assert_array_equal(after.masks[layer]["kernel"], expected)


def test_short_restriction_with_rate_one_gives_the_top_k_and_bad_values_raise():
  scores = {"w": jnp.array([0.3, 0.9, 0.1, 0.7, 0.5, 0.2])}
  masks = {"w": jnp.array([True, False, True, False, True, False])}
  got = jax.jit(short_restriction, static_argnums=2)(scores, masks, 0.5)["w"]
  assert got.tolist() == [False, True, False, True, True, False]
  with pytest.raises(ValueError, match="swap_rate"):
    short_restriction(scores, masks, 0.5, swap_rate=0.0)
  with pytest.raises(ValueError, match="swap_end_step"):
    LotteryJackpots(0.5, num_steps=4, swap_end_step=9)
  with pytest.raises(ValueError, match="sparsity"):
    LotteryJackpots(1.5, num_steps=4)
