"""The same pruning training step gives the same masks and weights eagerly,
under jit, under pmap and under jit with a data-parallel NamedSharding over
4 CPU devices (XLA_FLAGS set in conftest.py): for gradual magnitude pruning,
for an IMP level (masks from `lottery.prune_level`, held fixed) and for 2:4
SR-STE training (forward transform + optax wrapper)."""

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sparsejax
from tests import models
from tests import reference

DEVICES = 4
# Masks recomputed at steps 0 and 2 (global threshold), fixed afterwards.
GMP = sparsejax.GradualMagnitudePruning(
    sparsejax.PolynomialSchedule(0.0, 0.7, begin_step=0, end_step=4, update_frequency=2),
    allocation="global").wrap(optax.adam(1e-2))
# An IMP level: masks of two 50% levels set into the state, never recomputed.
FIXED = sparsejax.GradualMagnitudePruning(sparsejax.FixedMaskSchedule()).wrap(optax.adam(1e-2))
STEPS = 5
# 2:4 SR-STE: dense step 0, sparse steps 1-3 (masks at 1 and 3), hard mask at step 4.
NM = sparsejax.NMSparsity.from_method(
    "srste", sparsejax.NMSchedule(2, 4, STEPS, dense_steps=1, finetune_steps=1, update_every=2),
    srste_lambda=0.05)
NM_TX = NM.wrap(optax.adam(1e-2))


def _grads(params, opt_state, x, y, forward=None):
  def loss(p):
    weights = p if forward is None else forward(p, opt_state)
    logits = models.LinenMLP().apply({"params": weights}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.grad(loss)(params)


def _step(tx, params, opt_state, x, y, axis_name=None, forward=None):
  grads = _grads(params, opt_state, x, y, forward)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _run(step_fn, params, opt_state, x, y):
  for _ in range(STEPS):
    params, opt_state = step_fn(params, opt_state, x, y)
  return params, opt_state.masks


@pytest.fixture(scope="module", params=["gmp", "imp_level", "nm_srste"])
def start(request):
  """(step function, params, opt_state, x, y) for one method."""
  if jax.device_count() < DEVICES:
    pytest.skip(f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  params = models.linen_params(seed=3)
  x, y = models.batch(seed=4, size=64)
  if request.param == "gmp":
    return functools.partial(_step, GMP), params, GMP.init(params), x, y
  if request.param == "nm_srste":
    return functools.partial(_step, NM_TX, forward=NM.forward), params, NM_TX.init(params), x, y
  masks = sparsejax.lottery.prune_level(params, None, 0.5)
  masks = sparsejax.lottery.prune_level(params, masks, 0.5, allocation="global")
  return functools.partial(_step, FIXED), params, sparsejax.with_masks(FIXED.init(params), masks), x, y


@pytest.fixture(scope="module")
def jitted(start):
  step, *rest = start
  return _run(jax.jit(step), *rest)


def _assert_same(result, expected):
  params, masks = result
  chex.assert_trees_all_equal(masks, expected[1])
  chex.assert_trees_all_close(params, expected[0], rtol=1e-5, atol=1e-6)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda v: v is None)):
    if m is not None:
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_masks_reach_target_after_jitted_steps(start, jitted):
  report = sparsejax.sparsity_report(jitted[1])
  # gmp: 70% global; imp_level: 50% of each leaf (exact halves), then 50% of the rest;
  # nm_srste: 2 of every 4.
  expected = {GMP: 0.3, FIXED: 0.25, NM_TX: 0.5}[start[0].args[0]] * report.size
  assert report.kept == round(expected)


def test_eager_step_matches_jit(start, jitted):
  with jax.disable_jit():
    _assert_same(_run(*start), jitted)


def test_pmap_step_matches_jit(start, jitted):
  step, params, opt_state, x, y = start
  replicate = lambda tree: jax.tree.map(lambda a: np.stack([np.asarray(a)] * DEVICES), tree)
  shard = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
  step = jax.pmap(functools.partial(step, axis_name="data"), axis_name="data")
  params, opt_state = replicate(params), replicate(opt_state)
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state, shard(x), shard(y))
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  _assert_same((first(params), first(opt_state.masks)), jitted)


def test_sharded_jit_step_matches_jit(start, jitted):
  step, params, opt_state, x, y = start
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  by_batch = NamedSharding(mesh, PartitionSpec("data"))
  params, opt_state = jax.device_put((params, opt_state), replicated)
  x, y = jax.device_put((x, y), by_batch)
  step = jax.jit(step, out_shardings=(replicated, replicated))
  result = _run(step, params, opt_state, x, y)
  assert result[0]["Dense_0"]["kernel"].sharding.is_fully_replicated
  _assert_same(result, jitted)


def test_topk_mask_on_a_sharded_array_matches_unsharded():
  scores = jax.random.normal(jax.random.key(0), (64, 48))
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  sharded = jax.device_put(scores, NamedSharding(mesh, PartitionSpec("data")))
  select = jax.jit(lambda s: sparsejax.topk_mask(s, 0.8))
  want = reference.topk_mask(np.asarray(scores), 0.8)
  np.testing.assert_array_equal(np.asarray(select(sharded)), want)
  np.testing.assert_array_equal(np.asarray(select(scores)), want)


def test_topk_mask_under_vmap_matches_per_row():
  scores = jax.random.normal(jax.random.key(1), (5, 100))
  batched = jax.vmap(lambda s: sparsejax.topk_mask(s, 0.9))(scores)
  for row, mask in zip(scores, batched):
    np.testing.assert_array_equal(np.asarray(mask), reference.topk_mask(np.asarray(row), 0.9))
