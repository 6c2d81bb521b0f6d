"""Drop and grow (SET, RigL), GraNet and the straight-through forward, against NumPy."""

import dataclasses

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax import dst
from tests import reference


def _layers(seed=0):
  rng = np.random.default_rng(seed)
  params = {"a": {"kernel": rng.normal(size=(12, 10)).astype(np.float32),
                  "bias": np.zeros(10, np.float32)},
            "b": {"kernel": rng.normal(size=(10, 7)).astype(np.float32)}}
  masks = {"a": {"kernel": rng.random((12, 10)) < 0.3, "bias": None},
           "b": {"kernel": rng.random((10, 7)) < 0.5}}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  return params, masks, grads


@pytest.mark.parametrize("count", [0, 3, 17, 40])
def test_topk_masks_by_count_keeps_exactly_count_among_candidates(count):
  rng = np.random.default_rng(count)
  scores = np.round(rng.normal(size=(8, 5)), 1).astype(np.float32)  # ties
  candidates = rng.random((8, 5)) < 0.7
  got = sparsejax.topk_masks_by_count([scores], [count], [candidates])[0]
  want = reference.top_count(scores, min(count, candidates.sum()), candidates)
  if count <= candidates.sum():
    np.testing.assert_array_equal(np.asarray(got), want)
  assert int(np.sum(got)) == min(count, scores.size)
  traced = jax.jit(lambda s, k: sparsejax.topk_masks_by_count([s], [k], [candidates])[0])
  np.testing.assert_array_equal(np.asarray(traced(scores, count)), np.asarray(got))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.99])
def test_rigl_update_equals_numpy_and_keeps_every_layer_count(fraction):
  params, masks, grads = _layers()
  scores = jax.tree.map(np.abs, grads)
  new, grown = jax.jit(sparsejax.drop_and_grow)(params, masks, scores, fraction)
  for name in ("a", "b"):
    want_new, want_grown = reference.drop_and_grow(
        params[name]["kernel"], masks[name]["kernel"], scores[name]["kernel"], fraction)
    np.testing.assert_array_equal(np.asarray(new[name]["kernel"]), want_new, err_msg=name)
    np.testing.assert_array_equal(np.asarray(grown[name]["kernel"]), want_grown)
    assert int(new[name]["kernel"].sum()) == int(masks[name]["kernel"].sum())
    # Grown entries were inactive; the dropped are the smallest active magnitudes.
    assert not np.any(np.asarray(grown[name]["kernel"]) & masks[name]["kernel"])
  assert new["a"]["bias"] is None and grown["a"]["bias"] is None
  if fraction >= 0.3:
    assert any(bool(np.any(grown[name]["kernel"])) for name in ("a", "b"))


def test_global_drop_and_grow_keeps_the_total_count():
  params, masks, grads = _layers(1)
  new, grown = sparsejax.drop_and_grow(params, masks, jax.tree.map(np.abs, grads), 0.4,
                                       shared=True)
  total = lambda tree: sum(int(np.sum(tree[n]["kernel"])) for n in ("a", "b"))
  assert total(new) == total(masks)
  flat = lambda tree: np.concatenate([np.ravel(tree[n]["kernel"]) for n in ("a", "b")])
  want_new, want_grown = reference.drop_and_grow(
      flat(params), flat(masks), np.abs(flat(grads)), 0.4)
  np.testing.assert_array_equal(flat(new), want_new)
  np.testing.assert_array_equal(flat(grown), want_grown)


def _set(key):
  return dst.DropAndGrow(sparsejax.ConstantSchedule(0.7), end_step=100, grow="random",
                         update_every=10, key=key)


def test_set_grows_the_dropped_count_among_inactive_entries_and_depends_on_the_key():
  params, masks, grads = _layers(2)
  grown_by_key = []
  for seed in (0, 1):
    new, grown = _set(jax.random.key(seed)).update_masks(params, masks, grads, 10)
    for name in ("a", "b"):
      m, n, g = masks[name]["kernel"], np.asarray(new[name]["kernel"]), np.asarray(
          grown[name]["kernel"])
      dropped = int(np.float32(m.sum()) * np.float32(dst.cosine_drop_fraction(0.3, 10, 100)))
      assert n.sum() == m.sum()
      kept = reference.top_count(np.abs(params[name]["kernel"]), int(m.sum()) - dropped, m)
      np.testing.assert_array_equal(n & kept, kept)  # SET drops by magnitude too
      grow = n & ~kept
      assert grow.sum() == dropped and not np.any(grow & kept)
      np.testing.assert_array_equal(g, grow & ~m)
    grown_by_key.append(np.asarray(new["a"]["kernel"]))
  assert not np.array_equal(*grown_by_key)


def test_no_update_off_the_update_steps_and_after_the_end():
  params, masks, grads = _layers()
  tx = _set(jax.random.key(0))
  for step in (5, 11, 110):  # (step 0 is the schedule's: masks brought to its sparsity)
    new, grown = tx.update_masks(params, masks, grads, step)
    chex.assert_trees_all_equal(new, jax.tree.map(jnp.asarray, masks))
    assert not any(np.any(g) for g in jax.tree.leaves(grown))
  assert [bool(tx.is_update_step(t)) for t in (0, 10, 100, 110)] == [False, True, True, False]


def _mlp_step(tx, straight_through=True):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(64, 12)).astype(np.float32)
  y = rng.normal(size=(64, 7)).astype(np.float32)

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"] - y) ** 2)

  def step(params, state):
    forward = sparsejax.ste_masked_params if straight_through else sparsejax.masked_params
    grads = jax.grad(lambda p: loss(forward(p, state)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def test_rigl_training_keeps_counts_and_starts_grown_weights_and_moments_at_zero():
  params, _, _ = _layers()
  tx = dst.DropAndGrow(sparsejax.ConstantSchedule(0.75), end_step=30, update_every=5,
                       allocation="erk", key=jax.random.key(0)).wrap(optax.adam(0.05))
  state = tx.init(params)
  masks0 = sparsejax.state_masks(state)
  counts = dst.active_counts(masks0)
  assert sum(counts.values()) == round(0.25 * (120 + 70))  # ERK splits it unevenly
  step = jax.jit(_mlp_step(tx))
  history, changed_at = [masks0], []
  for t in range(40):
    before = sparsejax.state_masks(state)
    params, state = step(params, state)
    masks = sparsejax.state_masks(state)
    history.append(masks)
    assert dst.active_counts(masks) == counts
    if any(bool(np.any(np.asarray(a) != np.asarray(b)))
           for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(before))):
      changed_at.append(t)
      grown = [np.asarray(m) & ~np.asarray(b)
               for m, b in zip(jax.tree.leaves(masks), jax.tree.leaves(before))]
      adam = state.inner_state[0]
      for (path, g), w, mu, nu in zip(zip(("a", "b"), grown), (params["a"]["kernel"],
                                      params["b"]["kernel"]), (adam.mu["a"]["kernel"],
                                      adam.mu["b"]["kernel"]), (adam.nu["a"]["kernel"],
                                      adam.nu["b"]["kernel"])):
        assert np.all(np.asarray(w)[g] == 0), path
        assert np.all(np.asarray(mu)[g] == 0) and np.all(np.asarray(nu)[g] == 0), path
    # Pruned weights are exactly zero after every step.
    for name in ("a", "b"):
      w, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
      assert np.all(w[~m] == 0)
  assert changed_at and set(changed_at) <= {5, 10, 15, 20, 25, 30}  # the update steps
  assert dst.ever_active(history) > 0.25


@pytest.mark.parametrize("method", ["rigl", "set", "granet"])
def test_the_update_decided_in_the_step_gives_the_host_dispatched_numbers(method):
  # The default (in-step) program and the two host-dispatched ones
  # (`regrow=` a Python bool) are built differently: in the step the
  # optimizer runs outside the branch (RigL: its results selected away on
  # the update steps; SET and GraNet: on the masks before the update). XLA
  # fuses Adam's update differently there (1-ulp differences in a few
  # updates), so weights agree to float rounding, masks exactly.
  params0, _, _ = _layers(7)
  params0["skip"] = None  # an optional leaf left out (None), passed through
  schedule = sparsejax.ConstantSchedule(0.7)
  if method == "granet":  # magnitude pruning at each update step, then regrowth
    schedule = sparsejax.PolynomialSchedule(0.5, 0.8, begin_step=0, end_step=9,
                                            update_frequency=3)
  rigl = dst.DropAndGrow(schedule, end_step=12, update_every=3, key=jax.random.key(1),
                         grow="random" if method == "set" else "gradient")
  assert rigl.steps_on_update() == (method != "rigl")
  tx = rigl.wrap(optax.adam(0.05))
  rng = np.random.default_rng(8)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params0)
           for _ in range(14)]
  assert grads[0]["skip"] is None
  default = jax.jit(tx.update)
  dispatched = {flag: jax.jit(lambda g, s, p, flag=flag: tx.update(g, s, p, regrow=flag))
                for flag in (False, True)}
  runs = {}
  for name in ("in the step", "host"):
    params, state = params0, tx.init(params0)
    history = []
    for t, g in enumerate(grads):  # updates at steps 3, 6, 9, 12
      if name == "host":
        updates, state = dispatched[bool(rigl.is_update_step(t))](g, state, params)
      else:
        updates, state = default(g, state, params)
      params = optax.apply_updates(params, updates)
      history.append(sparsejax.state_masks(state))
    runs[name] = (params, state, history)
  (p_in, s_in, h_in), (p_host, s_host, h_host) = runs["in the step"], runs["host"]
  chex.assert_trees_all_equal(h_in, h_host)  # masks after every step
  chex.assert_trees_all_equal(s_in.inner_state[0].count, s_host.inner_state[0].count)
  chex.assert_trees_all_close(p_in, p_host, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_in.inner_state, s_host.inner_state, rtol=1e-6, atol=1e-9)
  # The masks did change, on update steps only (the cosine drop fraction
  # drops nothing from leaf b at the last ones).
  changed = {t + 1 for t, (a, b) in enumerate(zip(h_host, h_host[1:]))
             if not np.array_equal(np.asarray(a["b"]["kernel"]), np.asarray(b["b"]["kernel"]))}
  assert {3, 6} <= changed <= {3, 6, 9, 12}, changed
  assert p_in["skip"] is None and p_host["skip"] is None


def test_regrow_must_be_a_python_bool():
  params, _, grads = _layers(0)
  tx = dst.DropAndGrow(sparsejax.ConstantSchedule(0.5), end_step=10, update_every=2,
                       key=jax.random.key(0)).wrap(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"regrow=Array\(True.* must be None or a Python bool"):
    tx.update(grads, state, params, regrow=jnp.bool_(True))
  # A NumPy bool is a Python-level bool: it picks the program as True / False do.
  for flag in (False, True):
    chex.assert_trees_all_equal(tx.update(grads, state, params, regrow=np.bool_(flag)),
                                tx.update(grads, state, params, regrow=flag))


def _adam_numpy(p, g, mu, nu, t, lr=0.05, b1=0.9, b2=0.999, eps=1e-8):
  """One optax.adam step in float64: (new p, mu, nu), t = the step count after it."""
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * g * g
  return p - lr * (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps), mu, nu


@pytest.mark.parametrize("gradient_on_update", [False, True])
def test_rigl_update_steps_skip_the_optimizer_step_as_rigls_code_does(gradient_on_update):
  params, _, _ = _layers(4)
  rng = np.random.default_rng(5)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(4)]
  tx = dst.DropAndGrow(sparsejax.ConstantSchedule(0.7), end_step=50, update_every=2,
                       key=jax.random.key(0), gradient_on_update=gradient_on_update
                       ).wrap(optax.adam(0.05))
  state = tx.init(params)
  update = jax.jit(tx.update)
  names = [("a", "kernel"), ("a", "bias"), ("b", "kernel")]
  get = lambda tree, n: np.asarray(tree[n[0]][n[1]], np.float64)
  want = {n: get(params, n) for n in names}
  masks = {n: None if n[1] == "bias" else np.asarray(sparsejax.state_masks(state)[n[0]][n[1]])
           for n in names}
  mu = {n: np.zeros_like(want[n]) for n in names}
  nu = {n: np.zeros_like(want[n]) for n in names}
  adam_count = 0
  for t, g in enumerate(grads):  # step 2 drops and grows
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    grown, before = {n: None for n in names}, dict(masks)
    if t != 2 or gradient_on_update:   # the step first, on the masks before the update
      adam_count += 1
      for n in names:
        active = np.ones(want[n].shape, bool) if before[n] is None else before[n]
        stepped, mu[n], nu[n] = _adam_numpy(want[n], np.where(active, get(g, n), 0), mu[n],
                                            nu[n], adam_count)
        want[n] = np.where(active, stepped, 0)  # (the new masks zero the dropped below)
    if t == 2:   # then drop by the (stepped, with gradient_on_update) magnitudes, and grow
      fraction = float(dst.cosine_drop_fraction(0.3, t, 50))
      for n in names:
        if masks[n] is not None:
          masks[n], grown[n] = reference.drop_and_grow(want[n], masks[n], np.abs(get(g, n)),
                                                       fraction)
    for n in names:
      if grown[n] is not None:  # grown: weight and moments start at 0
        mu[n][grown[n]] = nu[n][grown[n]] = 0
      if masks[n] is not None:
        want[n] = np.where(masks[n], want[n], 0)
    adam = state.inner_state[0]
    assert int(adam.count) == adam_count, t
    for n in names:
      np.testing.assert_allclose(get(params, n), want[n], rtol=2e-5, atol=1e-6,
                                 err_msg=f"step {t} {n}")
      np.testing.assert_allclose(get(adam.mu, n), mu[n], rtol=2e-5, atol=1e-7)
      if masks[n] is not None:
        np.testing.assert_array_equal(np.asarray(sparsejax.state_masks(state)[n[0]][n[1]]),
                                      masks[n], err_msg=f"step {t} {n}")
  assert adam_count == (4 if gradient_on_update else 3)


def test_set_update_steps_take_the_optimizer_step_then_drop_by_the_stepped_weights():
  # google-research/rigl SparseSETOptimizer.apply_gradients: the wrapped optimizer's step,
  # then (control dependency) the mask update from the stepped weights; RigL's skips the step.
  params, _, grads = _layers(6)
  lr, step = 0.5, 10
  tx = _set(jax.random.key(0)).wrap(optax.sgd(lr))
  state = tx.init(params)
  before = jax.tree.map(np.asarray, sparsejax.state_masks(state))
  params = jax.tree.map(lambda p, m: p if m is None else p * m, params, before,
                        is_leaf=lambda x: x is None)
  state = state._replace(count=jnp.int32(step))
  updates, state = jax.jit(tx.update)(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  after = sparsejax.state_masks(state)
  fraction = np.float32(dst.cosine_drop_fraction(0.3, step, 100))
  differs = False
  for name in ("a", "b"):
    w, m, g = params[name]["kernel"], before[name]["kernel"], grads[name]["kernel"]
    stepped = np.where(m, w - np.float32(lr) * g, 0)          # SGD on the active weights
    n = int(m.sum())
    kept = reference.top_count(np.abs(stepped), n - int(np.float32(n) * fraction), m)
    differs |= not np.array_equal(kept, reference.top_count(np.abs(w), int(kept.sum()), m))
    new = np.asarray(after[name]["kernel"])
    assert new.sum() == n
    np.testing.assert_array_equal(new & kept, kept)           # dropped by stepped magnitude
    # Grown weights start at 0.0; one dropped and grown back keeps its (stepped) value.
    np.testing.assert_allclose(np.asarray(new_params[name]["kernel"]),
                               np.where(new & m, stepped, 0), rtol=1e-6)
  assert differs, "the stepped and the unstepped magnitudes drop the same weights here"
  np.testing.assert_allclose(new_params["a"]["bias"],
                             params["a"]["bias"] - np.float32(lr) * grads["a"]["bias"], rtol=1e-6)
  assert _set(jax.random.key(0)).steps_on_update()     # the default follows each method's code
  assert not dataclasses.replace(_set(jax.random.key(0)), grow="gradient").steps_on_update()
  assert not dataclasses.replace(_set(jax.random.key(0)),
                                 gradient_on_update=False).steps_on_update()
  # GraNet's code (Masking.step) steps the optimizer, then prunes and regrows.
  granet = dataclasses.replace(_set(jax.random.key(0)), grow="gradient",
                               schedule=sparsejax.PolynomialSchedule(0.0, 0.5, 0, 10, 2))
  assert granet.steps_on_update()
  assert not dataclasses.replace(granet, gradient_on_update=False).steps_on_update()


def test_granet_follows_the_zhu_gupta_schedule_while_it_regrows():
  params, _, _ = _layers()
  schedule = sparsejax.PolynomialSchedule(0.0, 0.8, begin_step=0, end_step=20,
                                          update_frequency=5)
  tx = dst.DropAndGrow(schedule, end_step=20, update_every=5, initial_masks="dense",
                       drop_fraction=0.3).wrap(optax.sgd(0.1))
  state = tx.init(params)
  step = jax.jit(_mlp_step(tx))
  regrown = 0
  for t in range(25):
    before = sparsejax.state_masks(state)
    params, state = step(params, state)
    masks = sparsejax.state_masks(state)
    want = reference.polynomial_sparsity(t, 0.0, 0.8, 0, 20, 5)
    for name, size in (("a", 120), ("b", 70)):
      kept = int(np.asarray(masks[name]["kernel"]).sum())
      assert kept == round((1 - want) * size), (t, name)
      regrown += int(np.sum(np.asarray(masks[name]["kernel"]) &
                            ~np.asarray(before[name]["kernel"])))
  assert regrown > 0  # weights pruned earlier came back


def test_ste_forward_is_masked_and_its_gradient_is_dense():
  w = {"k": jnp.array([[1.0, -2.0], [3.0, 4.0]])}
  tx = sparsejax.GradualMagnitudePruning(sparsejax.ConstantSchedule(0.5)).wrap(optax.sgd(1.0))
  state = sparsejax.with_masks(tx.init(w), {"k": jnp.array([[False, True], [True, False]])})
  x = jnp.array([1.0, 10.0])
  # f(W) = x @ W_masked @ [1, 1]: the masked weights are [[0, -2], [3, 0]].
  f = lambda p, forward: (x @ forward(p, state)["k"]).sum()
  assert float(f(w, sparsejax.ste_masked_params)) == 1 * -2 + 10 * 3
  np.testing.assert_array_equal(jax.grad(f)(w, sparsejax.ste_masked_params)["k"],
                                [[1, 1], [10, 10]])  # df/dW_ij = x_i everywhere
  np.testing.assert_array_equal(jax.grad(f)(w, sparsejax.masked_params)["k"], [[0, 1], [10, 0]])


def test_a_rigl_step_gives_the_same_numbers_with_and_without_jit_and_on_4_devices():
  params, _, _ = _layers()
  tx = dst.DropAndGrow(sparsejax.ConstantSchedule(0.7), end_step=50, update_every=1,
                       key=jax.random.key(0)).wrap(optax.adam(0.05))
  one_step = _mlp_step(tx)

  def step(params, state):  # three steps: drop and grow at counts 1 and 2
    for _ in range(3):
      params, state = one_step(params, state)
    return params, state

  state = tx.init(params)
  eager = step(params, state)
  jitted = jax.jit(step)(params, state)
  assert not np.array_equal(sparsejax.state_masks(eager[1])["a"]["kernel"],
                            sparsejax.state_masks(state)["a"]["kernel"])
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  shardings = sparsejax.fsdp_shardings((params, state), mesh)
  sharded = jax.jit(step, in_shardings=shardings, out_shardings=shardings)(
      *jax.device_put((params, state), shardings))
  assert sharded[0]["a"]["kernel"].sharding.spec == P("fsdp", None)
  for other in (jitted, sharded):
    chex.assert_trees_all_equal(sparsejax.state_masks(other[1]), sparsejax.state_masks(eager[1]))
    chex.assert_trees_all_close(other[0], eager[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grow="momentum"), "grow='momentum': use one of"),
    (dict(decay="linear"), "decay='linear': use one of"),
    (dict(drop_fraction=1.0), r"drop_fraction=1.0 must be in \[0, 1\)"),
    (dict(update_every=0), "update_every=0 must be an int >= 1"),
    (dict(key=None), "need key=jax.random.key"),
    (dict(initial_masks="lottery"), "initial_masks='lottery'"),
    (dict(gradient_on_update=1), "gradient_on_update=1 must be a bool"),
])
def test_drop_and_grow_options_that_cannot_work_are_errors(kwargs, message):
  options = {"schedule": sparsejax.ConstantSchedule(0.5), "end_step": 10,
             "key": jax.random.key(0), **kwargs}
  with pytest.raises(ValueError, match=message):
    dst.DropAndGrow(**options)


class _NnxAttention(nnx.Module):
  """Flax NNX attention (3-D q/k/v/out kernels) and a head."""

  def __init__(self, rngs):
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                            decode=False, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attention(x).mean(axis=1))


@pytest.mark.parametrize("grow", ["gradient", "random"])  # RigL, SET (decided in the step)
def test_rigl_on_an_nnx_attention_model_keeps_every_leaf_count(grow):
  model = _NnxAttention(nnx.Rngs(0))
  tx = dst.DropAndGrow(sparsejax.ConstantSchedule(0.5), end_step=10, update_every=2, grow=grow,
                       key=jax.random.key(0)).wrap(optax.adam(0.05))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (6, 5, 8))
  y = jax.random.randint(jax.random.key(2), (6,), 0, 3)

  @nnx.jit
  def step(model, optimizer):
    # The wrapper keeps pruned weights at exactly 0, so the gradient of the
    # model as it is, is the dense gradient RigL grows by.
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))

  first = jax.tree.map(np.asarray, sparsejax.state_masks(optimizer.opt_state))
  counts = dst.active_counts(first)
  assert "attention/query/kernel" in counts and len(counts) == 5  # q, k, v, out, head
  for _ in range(8):
    step(model, optimizer)
  masks = sparsejax.state_masks(optimizer.opt_state)
  assert dst.active_counts(masks) == counts
  assert any(bool(np.any(np.asarray(a) != b)) for a, b in zip(jax.tree.leaves(masks),
                                                             jax.tree.leaves(first)))
  params = nnx.state(model, nnx.Param)
  for leaf in sparsejax.leaves_with_masks(params, masks):
    if leaf.mask is not None:
      assert np.all(np.asarray(leaf.param)[~np.asarray(leaf.mask)] == 0), leaf.path
