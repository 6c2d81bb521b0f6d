"""MaskLLM: learned N:M masks over frozen weights (sparsejax.maskllm)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax import learned
from sparsejax.maskllm import MaskLLM
from sparsejax.maskllm import candidates


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                      "bias": jnp.zeros(6)},
          "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)},
          "attn": {"out": {"kernel": jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)}}}


def test_candidates_are_every_n_of_m_pattern_once():
  for n, m in [(1, 4), (2, 4), (2, 8), (4, 8)]:
    c = candidates(n, m)
    assert (c.sum(1) == n).all() and len({tuple(r) for r in c}) == len(c)
  assert candidates(2, 4).tolist()[:3] == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
def test_argmax_masks_keep_exactly_n_of_every_m_along_the_contraction_axes(n, m):
  params = _params()
  if m == 8:
    params = {"Dense_0": {"kernel": jnp.ones((16, 3))}}
  method = MaskLLM(n, m, num_steps=4, prior=None, init_std=1.0)
  masks = jax.jit(lambda p: method.hard_masks(method.init_logits(p), p))(params)
  # Groups in NumPy: Dense along axis 0, Conv along Cin, attention out along (heads, head_dim).
  dense = np.asarray(masks["Dense_0"]["kernel"]).reshape(-1, m, masks["Dense_0"]["kernel"].shape[1])
  assert (dense.sum(1) == n).all()
  if m == 4:
    assert masks["Dense_0"]["bias"] is None
    conv = np.asarray(masks["Conv_0"]["kernel"]).reshape(3, 3, 2, 4, 4)
    assert (conv.sum(3) == n).all()
    out = np.asarray(masks["attn"]["out"]["kernel"]).reshape(2, 4, 5).reshape(8, 5).reshape(2, 4, 5)
    assert (out.sum(1) == n).all()  # the flattened (heads*head_dim) axis in groups of 4


def test_zero_learning_rate_with_a_strong_prior_keeps_the_prior_mask():
  params = {"w": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(8, 5)), jnp.float32)}}
  rng = np.random.default_rng(2)
  prior = np.zeros((8, 5), bool)
  for g in range(2):
    for j in range(5):
      prior[g * 4 + rng.choice(4, 2, replace=False), j] = True
  method = MaskLLM(2, 4, num_steps=3, prior_strength=50.0)
  logits = jax.jit(method.init_logits)(params, {"w": {"kernel": jnp.asarray(prior)}})
  tx = method.wrap(None, optax.sgd(0.0))
  state = learned.with_scores(jax.jit(tx.init)(params), logits, method, params, optax.sgd(0.0))
  update = jax.jit(tx.update)
  for _ in range(2):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = update(grads, state, params)
    assert float(jnp.abs(updates["w"]["kernel"]).max()) == 0.0  # weights frozen
  np.testing.assert_array_equal(state.masks["w"]["kernel"], prior)
  # The magnitude prior: the 2 largest |w| of each group of 4.
  magnitude = MaskLLM(2, 4, num_steps=3, prior_strength=50.0)
  masks = jax.jit(lambda p: magnitude.hard_masks(magnitude.init_logits(p), p))(params)
  np.testing.assert_array_equal(masks["w"]["kernel"],
                                sparsejax.nm_mask(jnp.abs(params["w"]["kernel"]), 2, 4, axis=0))


def _numpy_mix(x):
  x = np.uint32(x)
  with np.errstate(over="ignore"):
    x ^= x >> np.uint32(16)
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x ^= x >> np.uint32(15)
    x = np.uint32(x * np.uint32(0x846CA68B))
    x ^= x >> np.uint32(16)
  return x


def _numpy_gumbel(shape, *words):
  """The noise of `learned.gumbel_noise`, hashed again here in NumPy."""
  base = np.uint32(0x9E3779B9)
  for w in words:
    base = _numpy_mix(base ^ np.uint32(w))
  with np.errstate(over="ignore"):
    index = np.arange(int(np.prod(shape)), dtype=np.uint32) + base
  bits = _numpy_mix(_numpy_mix(index))
  u = ((bits >> np.uint32(9)).astype(np.float64) + 0.5) * 2.0**-23
  return (-np.log(-np.log(u))).reshape(shape)


def _numpy_logit_grads(w, c, logits, noise, tau, kappa, cand):
  """dL/dlogits for L = sum(c * w * mask), mask_j = sum_k p_k cand_kj,
  p = softmax((kappa * logits + noise) / tau), groups of 4 along axis 0."""
  groups = w.shape[0] // 4
  out = np.zeros_like(logits, dtype=np.float64)
  for g in range(groups):
    for j in range(w.shape[1]):
      z = (kappa * logits[g, j].astype(np.float64) + noise[g, j]) / tau
      p = np.exp(z - z.max())
      p /= p.sum()
      dl_dmask = c[g * 4:(g + 1) * 4, j] * w[g * 4:(g + 1) * 4, j]  # (4,)
      dl_dp = cand @ dl_dmask                                         # (C,)
      out[g, j] = p * (dl_dp - p @ dl_dp) * kappa / tau               # softmax Jacobian
  return out


def test_logit_gradients_equal_a_numpy_reference():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(8, 2)).astype(np.float32)
  c = rng.normal(size=(8, 2)).astype(np.float32)
  params = {"k": {"kernel": jnp.asarray(w)}}
  method = MaskLLM(2, 4, num_steps=10, temperature=(2.0, 1.0), scale=(3.0, 5.0), prior=None,
                   init_std=0.3, seed=7)
  tx = method.wrap(None, optax.sgd(1.0))
  state = jax.jit(tx.init)(params)
  count = 0
  # The noise of update 0 of leaf 0 (the schedule at count 0: tau 2, kappa 3).
  logits = np.asarray(state.scores["k"]["kernel"])
  noise = _numpy_gumbel(logits.shape, method.seed, 0, count)
  expected = _numpy_logit_grads(w, c, logits, noise, 2.0, 3.0, candidates(2, 4))
  # jax.grad through the training forward pass gives g = dL/dW_eff = c to the update.
  g = jax.grad(lambda p: jnp.sum(jnp.asarray(c) * method.forward(p, state)["k"]["kernel"]))(params)
  np.testing.assert_allclose(g["k"]["kernel"], c, rtol=1e-6)
  got = jax.jit(method.logit_gradients)(g, params, state.scores, jnp.int32(count))
  np.testing.assert_allclose(got["k"]["kernel"], expected, rtol=1e-4, atol=1e-6)
  _, new = jax.jit(tx.update)(g, state, params)  # sgd(1): logits - gradient
  np.testing.assert_allclose(new.scores["k"]["kernel"], logits - expected, rtol=1e-4, atol=1e-6)


def _numpy_hash(shape, *words):
  """The 32-bit hash behind `learned.uniform_noise`, in NumPy."""
  base = np.uint32(0x9E3779B9)
  for w in words:
    base = _numpy_mix(base ^ np.uint32(w))
  with np.errstate(over="ignore"):
    return _numpy_mix(_numpy_mix(np.arange(int(np.prod(shape)), dtype=np.uint32) + base))


def test_soft_masks_stay_finite_where_the_hash_is_at_its_top():
  # Leaf 0 of seed 0 at update 31802 (found by a search with the NumPy hash):
  # entry 167 of the (4, 16, 6) logits hashes to its top 24 bits all ones,
  # which the 24-bit uniform rounded to u = 1.0 in float32, a +inf Gumbel
  # noise and NaN soft masks (one entry in 2**24: every few steps of an LM).
  shape, count = (4, 16, 6), 31802
  bits = _numpy_hash(shape, 0, 0, count)
  assert bits[167] >> 8 == 2**24 - 1
  assert np.float32(np.float32(2**24 - 1) + np.float32(0.5)) * np.float32(2**-24) == 1.0
  u = learned.uniform_noise(shape, 0, 0, count)
  assert 0.0 < float(u.min()) and float(u.max()) < 1.0
  assert bool(jnp.isfinite(learned.gumbel_noise(shape, 0, 0, count)).all())
  params = {"w": jnp.asarray(np.random.default_rng(6).normal(size=(16, 16)), jnp.float32)}
  method = MaskLLM(2, 4, num_steps=40000, prior=None)
  logits = method.init_logits(params)
  assert logits["w"].shape == shape
  masks = jax.jit(method.soft_masks)(logits, params, jnp.int32(count))
  grads = jax.jit(method.logit_gradients)(params, params, logits, jnp.int32(count))
  assert bool(jnp.isfinite(masks["w"]).all()) and bool(jnp.isfinite(grads["w"]).all())


def test_soft_masks_at_the_end_temperature_with_large_logits_are_finite_one_hot_candidates():
  # tau = 0.05 and kappa = 500 at the end: (kappa * logits + noise) / tau reaches 1e8
  # here; the softmax subtracts its maximum, so it saturates to one candidate, no overflow.
  params = {"w": jnp.asarray(np.random.default_rng(7).normal(size=(8, 4)), jnp.float32)}
  method = MaskLLM(2, 4, num_steps=10, prior=None)
  logits = jax.tree.map(lambda x: 1e6 * x, method.init_logits(params))  # std 1e4
  masks = jax.jit(method.soft_masks)(logits, params, jnp.int32(10))
  grads = jax.jit(method.logit_gradients)(params, params, logits, jnp.int32(10))
  np.testing.assert_allclose(masks["w"], method.hard_masks(logits, params)["w"], atol=1e-6)
  assert bool(jnp.isfinite(grads["w"]).all())


def test_logits_are_sharded_like_their_kernels_and_give_the_same_numbers():
  mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  params = {"a": {"kernel": jnp.asarray(np.random.default_rng(4).normal(size=(16, 8)), jnp.float32)},
            "b": {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=(32, 4)), jnp.float32)}}
  param_sh = {"a": {"kernel": NamedSharding(mesh, P(None, "fsdp"))},
              "b": {"kernel": NamedSharding(mesh, P("fsdp", None))}}
  method = MaskLLM(2, 4, num_steps=5)
  logit_sh = method.logit_shardings(param_sh, params)
  assert logit_sh["a"]["kernel"].spec == P(None, "fsdp", None)
  assert logit_sh["b"]["kernel"].spec == P("fsdp", None, None)  # 32/4 = 8 groups, 4 shards
  tx = method.wrap(None, optax.adam(0.1))
  state = jax.jit(tx.init)(params)
  grads = jax.tree.map(lambda w: jnp.cos(w), params)
  update = jax.jit(tx.update)
  want = update(grads, state, params)[1]
  sharded = jax.device_put(state.scores, logit_sh)
  state_sh = state._replace(scores=sharded)
  put = jax.device_put(params, param_sh)
  got = update(jax.device_put(grads, param_sh), state_sh, put)[1]
  for path in ("a", "b"):
    assert got.scores[path]["kernel"].sharding.is_equivalent_to(logit_sh[path]["kernel"], 3)
    np.testing.assert_allclose(got.scores[path]["kernel"], want.scores[path]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(got.masks[path]["kernel"], want.masks[path]["kernel"])


def test_bad_values_are_one_line_errors_naming_them():
  with pytest.raises(ValueError, match="N=3, M=2"):
    MaskLLM(3, 2, num_steps=4)
  with pytest.raises(ValueError, match="temperature"):
    MaskLLM(num_steps=4, temperature=(4.0, 0.0))
  with pytest.raises(ValueError, match="'odd/kernel'.*not divisible by M=4"):
    MaskLLM(num_steps=4).init_logits({"odd": {"kernel": jnp.ones((6, 2))}})
  with pytest.raises(ValueError, match="candidate masks"):
    MaskLLM(8, 16, num_steps=4)
