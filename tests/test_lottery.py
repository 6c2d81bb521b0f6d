"""Lottery-ticket library: IMP levels, rewinding and the two controls,
checked against counts worked out by hand and a numpy sort of the weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import lottery
from tests import models

KERNELS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")  # 20x32, 32x16, 16x4


def _kernels(tree):
  return {leaf.path: np.asarray(leaf.value) for leaf in sparsejax.trees.named_leaves(tree)
          if leaf.path in KERNELS}


def _kept(masks):
  return {path: int(m.sum()) for path, m in _kernels(masks).items()}


def _perturbed(params, seed):
  """Stands in for a level's training: every weight moves, the order of |w| changes."""
  return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed), p.shape), params)


def _keep_top(weights: list[np.ndarray], masks: list[np.ndarray], keep: int) -> list[np.ndarray]:
  """numpy reference: the `keep` largest |w| among the kept entries of the
  concatenation (ties to the lower position), by a full sort."""
  scores = np.concatenate([np.where(m, np.abs(w), -1.0).ravel() for w, m in zip(weights, masks)])
  order = np.lexsort((np.arange(scores.size), -scores))
  flat = np.zeros(scores.size, bool)
  flat[order[:keep]] = True
  out, offset = [], 0
  for w in weights:
    out.append(flat[offset:offset + w.size].reshape(w.shape))
    offset += w.size
  return out


def test_uniform_levels_keep_one_minus_p_to_the_l_on_every_leaf():
  params, masks, p = models.linen_params(), None, 0.2
  expected = {path: w.size for path, w in _kernels(params).items()}
  for level in range(1, 11):
    masks = lottery.prune_level(_perturbed(params, level), masks, p)
    expected = {path: int(round(0.8 * k)) for path, k in expected.items()}  # by hand: round each level
    assert _kept(masks) == expected
    for path, w in _kernels(params).items():
      # Rounding errors of 1/2 per level, shrunk by 0.8 each level after: < 0.5 / p.
      assert abs(expected[path] - w.size * 0.8**level) <= 0.5 / p
  # By hand: 640 -> 512 -> 410 -> 328 -> 262 -> 210 -> 168 -> 134 -> 107 -> 86 -> 69
  # (640 * 0.8**10 = 68.7).
  assert _kept(masks)["Dense_0/kernel"] == 69
  assert masks["Dense_0"]["bias"] is None


def test_global_level_keeps_one_minus_p_of_the_total():
  params, masks = models.linen_params(), None
  total = 640 + 512 + 64
  for level in range(1, 6):
    masks = lottery.prune_level(_perturbed(params, level), masks, 0.3, allocation="global")
    total = int(round(0.7 * total))
    assert sum(_kept(masks).values()) == total


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_level_matches_a_numpy_sort_of_the_surviving_weights(allocation):
  params, masks = models.linen_params(seed=1), None
  ref = [np.ones(w.shape, bool) for w in _kernels(params).values()]
  for level in range(1, 5):
    trained = _perturbed(params, 10 + level)
    masks = lottery.prune_level(trained, masks, 0.25, allocation=allocation)
    weights = list(_kernels(trained).values())
    if allocation == "global":
      ref = _keep_top(weights, ref, int(round(0.75 * sum(m.sum() for m in ref))))
    else:
      ref = [_keep_top([w], [m], int(round(0.75 * m.sum())))[0] for w, m in zip(weights, ref)]
    for got, want in zip(_kernels(masks).values(), ref):
      np.testing.assert_array_equal(got, want)


def test_layer_fractions_give_each_matched_leaf_its_own_rate_over_levels():
  params, masks = models.linen_params(seed=3), None
  fractions = {"^Dense_2/": 0.1, "Dense_0": 0.5}  # Dense_1/kernel: fraction = 0.2
  # By hand, round((1 - f) * kept) each level:
  expected = [
      {"Dense_0/kernel": 320, "Dense_1/kernel": 410, "Dense_2/kernel": 58},  # 409.6, 57.6
      {"Dense_0/kernel": 160, "Dense_1/kernel": 328, "Dense_2/kernel": 52},  # 328.0, 52.2
      {"Dense_0/kernel": 80, "Dense_1/kernel": 262, "Dense_2/kernel": 47},   # 262.4, 46.8
      {"Dense_0/kernel": 40, "Dense_1/kernel": 210, "Dense_2/kernel": 42},   # 209.6, 42.3
      {"Dense_0/kernel": 20, "Dense_1/kernel": 168, "Dense_2/kernel": 38},   # 167.68, 37.8
  ]
  ref = [np.ones(w.shape, bool) for w in _kernels(params).values()]
  for level, want in enumerate(expected, start=1):
    trained = _perturbed(params, 20 + level)
    masks = lottery.prune_level(trained, masks, 0.2, layer_fractions=fractions)
    assert _kept(masks) == want
    # Which weights: the largest |w| among each leaf's survivors (numpy sort).
    ref = [_keep_top([w], [m], k)[0]
           for w, m, k in zip(_kernels(trained).values(), ref, want.values())]
    for got, reference in zip(_kernels(masks).values(), ref):
      np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("own, fraction", [("Dense_2/kernel", 0.0), ("Dense_1/kernel", 0.5)])
def test_global_with_a_layer_fraction_prunes_that_leaf_alone_and_pools_the_rest(own, fraction):
  params, masks = models.linen_params(seed=4), None
  paths = list(_kernels(params))
  ref = {path: np.ones(w.shape, bool) for path, w in _kernels(params).items()}
  for level in range(1, 5):
    trained = _perturbed(params, 30 + level)
    masks = lottery.prune_level(trained, masks, 0.2, allocation="global",
                                layer_fractions={f"^{own}$": fraction})
    trained = _kernels(trained)
    # numpy reference: the matched leaf keeps its top round((1 - f) * kept); the others
    # share one threshold: the top round(0.8 * their total kept) of their |w|.
    pool = [p for p in paths if p != own]
    keep = int(round(0.8 * sum(ref[p].sum() for p in pool)))
    ref.update(zip(pool, _keep_top([trained[p] for p in pool], [ref[p] for p in pool], keep)))
    ref[own] = _keep_top([trained[own]], [ref[own]], int(round((1 - fraction) * ref[own].sum())))[0]
    for path in paths:
      np.testing.assert_array_equal(_kernels(masks)[path], ref[path], err_msg=f"{level} {path}")
    assert sum(_kept(masks)[p] for p in pool) == keep
  if fraction == 0.0:  # by hand: 1152 -> 922 -> 738 -> 590 -> 472 in the pool, 64 kept
    assert _kept(masks)[own] == 64 and keep == 472
  else:  # 512 -> 256 -> 128 -> 64 -> 32 in Dense_1, 704 -> 563 -> 450 -> 360 -> 288 pooled
    assert _kept(masks)[own] == 32 and keep == 288
    # The pooled leaves do not each keep 0.8**4: one threshold splits them unevenly.
    assert _kept(masks)["Dense_0/kernel"] != int(round(640 * 0.8**4))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_pruned_weights_never_come_back_even_when_they_grow_largest(allocation):
  params = models.linen_params(seed=2)
  masks = lottery.prune_level(params, None, 0.5, allocation=allocation)
  # Give every pruned weight the largest magnitude in the model.
  grown = sparsejax.trees.map_with_masks(
      lambda p, m: p if m is None else jnp.where(m, p, 1e6), params, masks)
  again = lottery.prune_level(grown, masks, 0.5, allocation=allocation)
  for before, after in zip(_kernels(masks).values(), _kernels(again).values()):
    assert not np.any(after & ~before)
  assert sum(_kept(again).values()) == pytest.approx(0.25 * (640 + 512 + 64), abs=1)


def test_rewind_restores_the_exact_values_of_step_k():
  params = models.linen_params(seed=5)
  x, y = models.batch(seed=6)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
        models.LinenMLP().apply({"params": q}, x), y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  at_k = None
  for t in range(12):
    if t == 4:
      at_k = jax.tree.map(lambda a: np.array(a, copy=True), params)  # the rewind point, k = 4
    params, opt_state = step(params, opt_state)
  masks = lottery.prune_level(params, None, 0.6)
  rewound = lottery.rewind(at_k, masks)
  for path, mask in _kernels(masks).items():
    got, want = _kernels(rewound)[path], _kernels(at_k)[path]
    np.testing.assert_array_equal(got[mask], want[mask])  # bitwise
    assert np.all(got[~mask] == 0.0)
  np.testing.assert_array_equal(rewound["Dense_0"]["bias"], at_k["Dense_0"]["bias"])


def test_random_prune_has_the_tickets_counts_on_every_leaf():
  params = models.linen_params(seed=7)
  masks = lottery.prune_level(params, lottery.prune_level(params, None, 0.5), 0.4,
                              allocation="global")  # uneven per-leaf counts
  control = lottery.random_prune(params, masks, jax.random.key(0))
  assert _kept(control) == _kept(masks)
  assert control["Dense_1"]["bias"] is None
  for ticket, random in zip(_kernels(masks).values(), _kernels(control).values()):
    assert not np.array_equal(ticket, random)
    # A random mask overlaps the ticket about as a random subset would: kept^2 / size.
    expected = ticket.sum() ** 2 / ticket.size
    assert abs((ticket & random).sum() - expected) < 5 * np.sqrt(expected) + 2
  chex.assert_trees_all_equal(control, lottery.random_prune(params, masks, jax.random.key(0)))
  other = lottery.random_prune(params, masks, jax.random.key(1))
  assert not np.array_equal(other["Dense_0"]["kernel"], control["Dense_0"]["kernel"])


def test_reinitialize_puts_the_tickets_mask_on_fresh_weights():
  params = models.linen_params(seed=8)
  masks = lottery.prune_level(params, None, 0.7)
  init = lambda key: models.LinenMLP().init(key, jnp.ones((1, 20)))["params"]
  fresh = lottery.reinitialize(init(jax.random.key(99)), masks)
  want = init(jax.random.key(99))
  for path, mask in _kernels(masks).items():
    np.testing.assert_array_equal(_kernels(fresh)[path], np.where(mask, _kernels(want)[path], 0))
  np.testing.assert_array_equal(fresh["Dense_0"]["bias"], want["Dense_0"]["bias"])  # unmasked leaf


def test_first_level_prunes_only_the_filtered_leaves():
  params = models.linen_params()
  masks = lottery.prune_level(params, None, 0.5, leaf_filter=lambda path, leaf: "Dense_1" in path
                              and leaf.ndim == 2)
  assert masks["Dense_0"]["kernel"] is None
  assert int(masks["Dense_1"]["kernel"].sum()) == 256
  again = lottery.prune_level(params, masks, 0.5)
  assert again["Dense_0"]["kernel"] is None and int(again["Dense_1"]["kernel"].sum()) == 128


def test_fraction_zero_keeps_the_masks():
  params = models.linen_params()
  masks = lottery.prune_level(params, None, 0.5)
  chex.assert_trees_all_equal(lottery.prune_level(params, masks, 0.0), masks)


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan"), "half"])
def test_fraction_outside_unit_interval_is_an_error(fraction):
  with pytest.raises(ValueError, match="fraction"):
    lottery.prune_level(models.linen_params(), None, fraction)


def test_unknown_allocation_is_an_error():
  with pytest.raises(ValueError, match="unknown IMP allocation 'snip'"):
    lottery.prune_level(models.linen_params(), None, 0.2, allocation="snip")


def test_layerwise_allocation_is_an_error_that_says_uniform():
  with pytest.raises(ValueError, match="'layerwise' is called 'uniform'.*allocation='uniform'"):
    lottery.prune_level(models.linen_params(), None, 0.2, allocation="layerwise")


def test_layer_fractions_regex_matching_no_leaf_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"\['Dense_9/'\] match no pruned leaf.*Dense_0/kernel"):
    lottery.prune_level(models.linen_params(), None, 0.2,
                        layer_fractions={"Dense_2": 0.1, "Dense_9/": 0.1})


def test_layer_fractions_regex_matching_only_unmasked_leaves_is_an_error():
  # Dense_0/bias is a leaf of the params but no mask prunes it.
  with pytest.raises(ValueError, match="'Dense_0/bias'"):
    lottery.prune_level(models.linen_params(), None, 0.2, layer_fractions={"Dense_0/bias": 0.0})


@pytest.mark.parametrize("value", [1.0, -0.5, float("nan"), "half"])
def test_layer_fraction_outside_unit_interval_is_an_error_naming_the_regex(value):
  with pytest.raises(ValueError, match=r"layer_fractions\['\^Dense_2/'\]"):
    lottery.prune_level(models.linen_params(), None, 0.2, layer_fractions={"^Dense_2/": value})


def test_layer_fractions_regex_that_does_not_compile_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"regex 'Dense_\(' does not compile"):
    lottery.prune_level(models.linen_params(), None, 0.2, layer_fractions={"Dense_(": 0.1})


def test_masks_of_another_model_name_the_leaf():
  params = models.linen_params()
  masks = lottery.prune_level(params, None, 0.5)
  masks["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"][:, :8]
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    lottery.prune_level(params, masks, 0.5)
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    lottery.random_prune(params, masks, jax.random.key(0))
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    lottery.rewind(params, masks)


def test_masks_and_leaf_filter_together_is_an_error():
  params = models.linen_params()
  with pytest.raises(ValueError, match="leaf_filter"):
    lottery.prune_level(params, lottery.prune_level(params, None, 0.5), 0.5,
                        leaf_filter=sparsejax.default_filter)


def test_prune_level_under_jit_says_to_call_it_outside():
  params = models.linen_params()
  masks = lottery.prune_level(params, None, 0.5)
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda p, m: lottery.prune_level(p, m, 0.5))(params, masks)


def test_nan_weights_name_the_leaf():
  params = models.linen_params()
  params["Dense_2"]["kernel"] = params["Dense_2"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="Dense_2/kernel"):
    lottery.prune_level(params, None, 0.2)


def test_fixed_mask_training_keeps_the_masks_and_matches_masked_adam():
  params = models.linen_params(seed=9)
  x, y = models.batch(seed=10)
  masks = lottery.prune_level(params, None, 0.8)
  tx = sparsejax.GradualMagnitudePruning(sparsejax.FixedMaskSchedule()).wrap(optax.adam(1e-2))
  state = sparsejax.with_masks(tx.init(params), masks)
  grad = jax.jit(jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
      models.LinenMLP().apply({"params": q}, x), y).mean()))
  # Reference: plain optax adam on masked weights with masked gradients.
  ref_tx, ref = optax.adam(1e-2), lottery.rewind(params, masks)
  ref_state = ref_tx.init(ref)
  ours = lottery.rewind(params, masks)  # a level starts from rewound weights
  update = jax.jit(tx.update)
  for _ in range(15):
    updates, state = update(grad(ours), state, ours)
    ours = optax.apply_updates(ours, updates)
    ref_updates, ref_state = ref_tx.update(sparsejax.apply_masks(grad(ref), masks), ref_state)
    ref = sparsejax.apply_masks(optax.apply_updates(ref, ref_updates), masks)
  chex.assert_trees_all_equal(state.masks, masks)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)
  for path, mask in _kernels(masks).items():
    assert np.all(_kernels(ours)[path][~mask] == 0.0)


def test_with_masks_rejects_masks_of_other_leaves():
  params = models.linen_params()
  tx = sparsejax.GradualMagnitudePruning(sparsejax.FixedMaskSchedule()).wrap(optax.sgd(0.1))
  state = tx.init(params)
  masks = lottery.prune_level(params, None, 0.5)
  masks["Dense_2"]["kernel"] = None
  with pytest.raises(ValueError, match="Dense_2/kernel"):
    sparsejax.with_masks(state, masks)
  with pytest.raises(ValueError, match="no PruningState"):
    sparsejax.with_masks(optax.sgd(0.1).init(params), lottery.prune_level(params, None, 0.5))


def test_erk_levels_split_the_kept_total_by_erk_densities_and_only_shrink():
  from sparsejax import allocation as allocation_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = {"a": (64, 30), "b": (30, 10), "c": (10, 4)}
  params = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()}
  sizes = {k: s[0] * s[1] for k, s in shapes.items()}
  total = sum(sizes.values())
  masks, kept_total = None, total
  for _ in range(4):
    before = None if masks is None else {k: np.asarray(masks[k]["kernel"]) for k in shapes}
    masks = lottery.prune_level(params, masks, 0.2, allocation="erk")
    kept_total = round(0.8 * kept_total)
    densities = allocation_lib.erk_densities(1 - kept_total / total, list(shapes.values()))
    for (k, size), d in zip(sizes.items(), densities):
      mask = np.asarray(masks[k]["kernel"])
      assert mask.sum() == round(float(d) * size), k
      # Each leaf's largest |w|, and a subset of what it kept before.
      w = np.abs(np.asarray(params[k]["kernel"]))
      assert w[mask].min(initial=np.inf) >= w[~mask].max(initial=0.0)
      if before is not None:
        assert not (mask & ~before[k]).any()
