"""N:M training: masks, decayed forward weights, SR-STE gradients and the
structure schedule, against NumPy implementations of the formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import nm_schedules
from tests import reference

# A Dense kernel (in, out), a Conv kernel (H, W, Cin, Cout) and a bias (never pruned).
SHAPES = {"dense": (16, 6), "conv": (3, 3, 8, 4)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {name: {"kernel": rng.normal(size=shape).astype(np.float32),
                 "bias": rng.normal(size=shape[-1]).astype(np.float32)}
          for name, shape in SHAPES.items()}


def _state(tx, params, count, masks=None):
  """The wrapper's state moved to step `count` (masks given or from init)."""
  state = tx.init(params)
  return state._replace(count=jnp.asarray(count, jnp.int32),
                        masks=state.masks if masks is None else masks)


def _np_nm(w, n, m, axis=-2):
  return reference.nm_mask(np.abs(w), n, m, axis)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (3, 8)])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_nm_masks_keep_the_n_largest_magnitudes_along_the_reduction_axis(kind, n, m):
  params = _params(n * 10 + m)
  masks = sparsejax.nm_masks(params, n, m, leaf_filter=lambda path, x: path == f"{kind}/kernel")
  kernel = params[kind]["kernel"]
  np.testing.assert_array_equal(np.asarray(masks[kind]["kernel"]), _np_nm(kernel, n, m))
  assert masks[kind]["bias"] is None


def test_nm_masks_over_flattened_leading_axes_group_h_w_cin():
  kernel = _params(3)["conv"]["kernel"]  # (3, 3, 8, 4): 72 = 18 groups of 4
  masks = sparsejax.nm_masks({"k": kernel}, 1, 4, axes="conv_flat")
  expected = _np_nm(kernel.reshape(72, 4), 1, 4, axis=0).reshape(kernel.shape)
  np.testing.assert_array_equal(np.asarray(masks["k"]), expected)
  # Groups of 4 consecutive entries of the flattened (H, W, Cin) index.
  kept = np.asarray(masks["k"]).reshape(18, 4, 4).sum(axis=1)
  assert np.all(kept == 1)


def test_nm_masks_leaf_not_divisible_names_it_or_stays_dense_when_asked():
  params = {"ok": {"kernel": np.ones((8, 3), np.float32)},
            "odd": {"kernel": np.ones((6, 3), np.float32)}}
  with pytest.raises(ValueError, match=r"'odd/kernel' of shape \(6, 3\): its contraction axes "
                                       r"\(0,\) hold 6 entries, not divisible by M=4"):
    sparsejax.nm_masks(params, 2, 4)
  masks = sparsejax.nm_masks(params, 2, 4, non_divisible="dense")
  assert masks["odd"]["kernel"] is None
  assert np.asarray(masks["ok"]["kernel"]).sum() == 12


@pytest.mark.parametrize("kwargs,match", [
    ({"axes": 2}, r"axes \(2,\) are out of range for 'w' of shape"),
    ({"axes": (0, 1)}, "leave no output axis"),
    ({"axes": "rows"}, "unknown axes name 'rows' for 'w'"),
    ({"non_divisible": "skip"}, "non_divisible must be one of"),
])
def test_nm_masks_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sparsejax.nm_masks({"w": np.ones((8, 4), np.float32)}, 2, 4, **kwargs)


@pytest.mark.parametrize("n,m,match", [(3, 2, "N <= M"), (0, 4, "N must be an int >= 1"),
                                       (1, 0, "M must be an int >= 1")])
def test_schedule_rejects_bad_patterns(n, m, match):
  with pytest.raises(ValueError, match=match):
    sparsejax.NMSchedule(n, m, num_steps=10)


def test_schedule_rejects_a_sparse_phase_shorter_than_its_frames():
  with pytest.raises(ValueError, match=r"sparse phase has 3 steps .* fewer than its 4 structure "
                                       r"frame\(s\) \['7:8', '4:8', '2:8', '1:8'\]"):
    sparsejax.NMSchedule(1, 8, num_steps=10, dense_steps=4, finetune_steps=3, structure="stepwise")


@pytest.mark.parametrize("kwargs,match", [
    ({"decay": "linear", "decay_coef": 0.0}, "decay_coef must be > 0"),
    ({"decay": "cosine", "decay_coef": 0.1}, "decay must be one of"),
    ({"flow": "ste2"}, "flow must be one of"),
    ({"srste_lambda": -1.0}, "srste_lambda must be >= 0"),
])
def test_nm_sparsity_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sparsejax.NMSparsity(sparsejax.NMSchedule(2, 4, 10), **kwargs)


def test_unknown_method_lists_the_methods():
  with pytest.raises(ValueError, match="must be one of .*'sdgf_geometric'"):
    sparsejax.NMSparsity.from_method("sdgf", sparsejax.NMSchedule(2, 4, 10))


def test_geometric_structure_needs_8m_and_says_so():
  nm = sparsejax.NMSparsity.from_method("sdgf_geometric", sparsejax.NMSchedule(2, 4, 10))
  with pytest.raises(ValueError, match=r"'conv/kernel' of shape \(3, 3, 8, 4\).*not divisible by M=32.*"
                                       r"'geometric' structure moves through the patterns "
                                       r"\['16:32', '8:16', '4:8', '2:4'\]"):
    nm.wrap(optax.sgd(0.1)).init(_params())


@pytest.mark.parametrize("n,m,structure,expected", [
    (1, 8, "stepwise", [(7, 8), (4, 8), (2, 8), (1, 8)]),
    (2, 4, "stepwise", [(3, 4), (2, 4)]),
    (1, 16, "stepwise", [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]),
    (3, 8, "stepwise", [(7, 8), (4, 8), (3, 8)]),
    (1, 2, "stepwise", [(1, 2)]),
    (2, 4, "geometric", [(16, 32), (8, 16), (4, 8), (2, 4)]),
    (1, 8, "geometric", [(8, 64), (4, 32), (2, 16), (1, 8)]),
    (2, 4, "fixed", [(2, 4)]),
])
def test_structure_patterns_are_the_published_sequences(n, m, structure, expected):
  assert list(sparsejax.structure_patterns(n, m, structure)) == expected


@pytest.mark.parametrize("n,m,structure,num_steps,dense,finetune,starts", [
    (1, 8, "stepwise", 100, 10, 10, [10, 30, 50, 70]),
    (1, 8, "stepwise", 23, 2, 3, [2, 6, 11, 15]),   # 18 sparse steps / 4: floor(4.5 i)
    (2, 4, "geometric", 50, 0, 0, [0, 12, 25, 37]),  # floor(12.5 i)
])
def test_frames_start_at_equal_fractions_of_the_sparse_phase(n, m, structure, num_steps, dense,
                                                             finetune, starts):
  schedule = sparsejax.NMSchedule(n, m, num_steps, dense, finetune, structure)
  assert list(schedule.frame_starts) == starts
  frames = [int(schedule.frame(t)) for t in range(num_steps)]
  expected = [sum(t >= s for s in starts[1:]) for t in range(num_steps)]
  assert frames == expected


def test_update_steps_are_the_grid_frame_starts_and_finetune_start():
  schedule = sparsejax.NMSchedule(1, 8, 23, dense_steps=2, finetune_steps=3, structure="stepwise",
                                  update_every=5)
  # Grid from step 2 every 5: 2 7 12 17; frames start at 2 6 11 15; fine-tune at 20.
  expected = [2, 6, 7, 11, 12, 15, 17, 20]
  assert [t for t in range(30) if schedule.is_update_step(t)] == expected


def _group_counts(mask, m, axis=0):
  """Kept entries of every group of m along `axis`."""
  mask = np.moveaxis(np.asarray(mask), axis, 0)
  return mask.reshape((mask.shape[0] // m, m) + mask.shape[1:]).sum(axis=1)


@pytest.mark.parametrize("method,n,m,expected", [
    # step t: (group size, kept per group) of the masks in force at t.
    ("sdgf_stepwise", 1, 8, {0: (8, 8), 1: (8, 8), 2: (8, 7), 5: (8, 7), 6: (8, 4), 10: (8, 4),
                             11: (8, 2), 14: (8, 2), 15: (8, 1), 19: (8, 1), 20: (8, 1),
                             22: (8, 1), 23: (8, 1)}),
    ("sdgf_geometric", 1, 2, {0: (16, 16), 2: (16, 8), 5: (16, 8), 6: (8, 4), 11: (4, 2),
                              15: (2, 1), 23: (2, 1)}),
])
def test_training_moves_through_the_patterns_at_the_frame_steps(method, n, m, expected):
  # Dense 2 steps, sparse 18 in 4 frames starting at 2, 6, 11, 15; fine-tune from 20.
  schedule = sparsejax.NMSchedule(n, m, 23, dense_steps=2, finetune_steps=3)
  nm = sparsejax.NMSparsity.from_method(method, schedule)
  params = {"w": np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)}
  tx = nm.wrap(optax.sgd(1e-3))

  @jax.jit
  def step(p, state):
    grads = jax.grad(lambda p: jnp.sum(nm.forward(p, state)["w"] ** 2))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  state, p = tx.init(params), params
  for t in range(24):
    if t in expected:
      group, kept = expected[t]
      counts = _group_counts(state.masks["w"], group)
      assert np.all(counts == kept), (t, np.unique(counts))
    if t < 23:
      p, state = step(p, state)
  assert int(state.count) == 23


def _forward_at(nm, params, count, masks):
  return nm.forward(params, _state(nm.wrap(optax.sgd(0.1)), params, count, masks))


def _masks_of(params, n, m):
  return {k: {"kernel": jnp.asarray(_np_nm(v["kernel"], n, m)), "bias": None}
          for k, v in params.items()}


@pytest.mark.parametrize("method,alpha,beta_of_t", [
    ("mdgf_linear", 0.05, lambda t: max(0.0, 1.0 - 0.05 * t)),
    ("mdgf_exp", 0.1, lambda t: math.exp(-0.1 * t)),
    ("step", 0.0, lambda t: 0.0),
    ("srste", 0.0, lambda t: 0.0),
])
def test_forward_weights_follow_the_decay_formula_on_dense_and_conv(method, alpha, beta_of_t):
  params = _params(1)
  schedule = sparsejax.NMSchedule(2, 4, num_steps=60, dense_steps=5, finetune_steps=10)
  nm = sparsejax.NMSparsity.from_method(method, schedule, decay_coef=alpha or None)
  masks = _masks_of(params, 2, 4)
  for count in (0, 4, 5, 6, 17, 25, 49, 50, 59):
    if count < 5:
      beta = 1.0        # dense phase
    elif count >= 50:
      beta = 0.0        # fine-tune: hard mask
    else:
      beta = beta_of_t(count - 5)
    got = _forward_at(nm, params, count, masks)
    for name in SHAPES:
      w, e = params[name]["kernel"], np.asarray(masks[name]["kernel"]).astype(np.float32)
      expected = w * (e + (1 - e) * np.float32(beta))
      np.testing.assert_allclose(np.asarray(got[name]["kernel"]), expected, rtol=1e-6, atol=0,
                                 err_msg=f"{method} at step {count}")
      np.testing.assert_array_equal(np.asarray(got[name]["bias"]), params[name]["bias"])


@pytest.mark.parametrize("method,lam", [("srste", 2e-4), ("srste", 0.3), ("step", 0.3),
                                        ("mdgf_linear", 0.3)])
def test_gradient_reaches_dense_weights_straight_through_plus_srste_term(method, lam):
  params = _params(2)
  nm = sparsejax.NMSparsity.from_method(
      method, sparsejax.NMSchedule(2, 4, 40, dense_steps=2, finetune_steps=5),
      srste_lambda=lam, decay_coef=0.01)
  masks = _masks_of(params, 2, 4)
  rng = np.random.default_rng(7)
  coeffs = {k: rng.normal(size=SHAPES[k]).astype(np.float32) for k in SHAPES}

  def loss(p, count):
    forward = _forward_at(nm, p, count, masks)
    return sum(jnp.sum(coeffs[k] * forward[k]["kernel"]) for k in SHAPES)

  for count, in_sparse_phase in ((10, True), (1, False), (36, False)):
    grads = jax.grad(loss)(params, count)
    for k in SHAPES:
      w, e = params[k]["kernel"], np.asarray(masks[k]["kernel"]).astype(np.float32)
      # d/dW of sum(c * forward): straight through (c), plus lambda (1-E) W for SR-STE.
      extra = lam * (1 - e) * w if (method == "srste" and in_sparse_phase) else 0.0
      np.testing.assert_allclose(np.asarray(grads[k]["kernel"]), coeffs[k] + extra,
                                 rtol=1e-6, atol=1e-7, err_msg=f"{method} at step {count}")


def test_masks_are_recomputed_from_the_current_dense_weights():
  params = {"w": np.random.default_rng(4).normal(size=(8, 5)).astype(np.float32)}
  nm = sparsejax.NMSparsity.from_method(
      "step", sparsejax.NMSchedule(2, 4, 30, update_every=3, finetune_steps=10))
  tx = nm.wrap(optax.sgd(0.5))
  state, p = tx.init(params), params
  np.testing.assert_array_equal(np.asarray(state.masks["w"]), _np_nm(params["w"], 2, 4))
  rng = np.random.default_rng(5)
  for t in range(1, 30):
    previous = np.asarray(state.masks["w"])
    grads = {"w": jnp.asarray(rng.normal(size=(8, 5)).astype(np.float32))}
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    w = np.asarray(p["w"])
    if t < 20 and t % 3 == 0 or t == 20:
      np.testing.assert_array_equal(np.asarray(state.masks["w"]), _np_nm(w, 2, 4), err_msg=str(t))
    else:
      np.testing.assert_array_equal(np.asarray(state.masks["w"]), previous, err_msg=str(t))
    if t < 20:
      assert np.count_nonzero(w) == w.size  # sparse phase: the dense weights all train
    else:
      # Fine-tune: pruned weights exactly 0, at most 2 nonzeros in every group of 4.
      assert np.all(w[~np.asarray(state.masks["w"])] == 0.0)
      assert _group_counts(w != 0, 4).max() <= 2


@pytest.mark.parametrize("method", list(sparsejax.nm.METHODS))
def test_without_finetune_the_last_update_leaves_n_m_weights(method):
  params = {"w": np.random.default_rng(6).normal(size=(32, 4)).astype(np.float32)}
  schedule = sparsejax.NMSchedule(1, 4, 12, dense_steps=2, finetune_steps=0, update_every=4)
  nm = sparsejax.NMSparsity.from_method(method, schedule, decay_coef=0.05)
  tx = nm.wrap(optax.adam(1e-2))
  state, p = tx.init(params), params
  for t in range(12):
    grads = jax.grad(lambda q: jnp.sum(jnp.sin(nm.forward(q, state)["w"])))(p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    if t < 11:
      assert np.count_nonzero(np.asarray(p["w"])) == 128
  w = np.asarray(p["w"])
  assert _group_counts(w != 0, 4).max() == 1
  np.testing.assert_array_equal(np.asarray(state.masks["w"]), _np_nm(w, 1, 4))
  # The final forward pass is the hard mask, i.e. the weights themselves.
  np.testing.assert_array_equal(np.asarray(nm.forward(p, state)["w"]), w)


def test_mask_decay_values_match_the_formulas():
  for t in (0, 1, 7, 30, 100):
    assert float(sparsejax.mask_decay("linear", 0.02, t)) == pytest.approx(max(0, 1 - 0.02 * t))
    assert float(sparsejax.mask_decay("exponential", 0.02, t)) == pytest.approx(
        math.exp(-0.02 * t), rel=1e-6)
    assert float(sparsejax.mask_decay("none", 0.02, t)) == 0.0
  with pytest.raises(ValueError, match="decay must be one of"):
    nm_schedules.mask_decay("cosine", 0.1, 0)


def test_nm_training_works_with_flax_nnx_optimizer():
  from flax import nnx
  from tests import models
  model = models.NnxMLP(nnx.Rngs(0))  # kernels (20, 32), (32, 16), (16, 4)
  nm = sparsejax.NMSparsity.from_method(
      "srste", sparsejax.NMSchedule(2, 4, 10, dense_steps=2, finetune_steps=2))
  optimizer = nnx.Optimizer(model, nm.wrap(optax.adam(1e-2)), wrt=nnx.Param)
  x, y = models.batch()

  @nnx.jit
  def step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      sparse = nnx.merge(graphdef, nm.forward(params, optimizer.opt_state), rest)
      return optax.softmax_cross_entropy_with_integer_labels(sparse(x), y).mean()

    optimizer.update(model, jax.grad(loss_fn)(params))

  for _ in range(10):
    step(model, optimizer)
  for layer in (model.hidden0, model.hidden1, model.out):
    kernel = np.asarray(layer.kernel[...])
    assert _group_counts(kernel != 0, 4).max() == 2
    assert np.count_nonzero(kernel) == kernel.size // 2
