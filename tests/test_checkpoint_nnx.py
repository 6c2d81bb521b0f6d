"""Flax NNX state through SparseCheckpointManager: one path convention with Linen.

Params, masks and optimizer state of real NNX models (Linear, Conv,
MultiHeadAttention) are saved as an `nnx.State` or its pure dict and restored
into the other form, into a freshly initialised instance and across Linen and
NNX; every leaf is compared bit for bit with NumPy against what was saved.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax.checkpoint import CheckpointError
from sparsejax.checkpoint import SparseCheckpointManager
from tests import models

_X = jax.random.normal(jax.random.key(0), (2, 6, 3))  # (batch, length, channels)
_Y = jax.random.normal(jax.random.key(1), (2, 5))


class _Net(nnx.Module):
  """Conv -> self-attention -> mean over length -> Linear (-> an extra Linear)."""

  def __init__(self, rngs: nnx.Rngs, extra: bool = False):
    self.conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=8,
                                            decode=False, rngs=rngs)
    self.head = nnx.Linear(4, 5, rngs=rngs)
    self.extra = nnx.Linear(5, 5, rngs=rngs) if extra else None

  def __call__(self, x):
    h = self.attention(nnx.relu(self.conv(x)))
    y = self.head(h.mean(axis=1))
    return y if self.extra is None else self.extra(y)


def _net(seed, extra=False):
  return _Net(nnx.Rngs(seed), extra=extra)


def _params(model):
  return nnx.state(model, nnx.Param)


def _optimizer(model):
  schedule = sparsejax.PolynomialSchedule(0.0, 0.6, begin_step=0, end_step=4)
  tx = sparsejax.GradualMagnitudePruning(schedule).wrap(optax.adam(1e-2))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _train_step(model, optimizer):
  grads = nnx.grad(lambda m: jnp.mean((m(_X) - _Y) ** 2))(model)
  optimizer.update(model, grads)


def _leaves(tree):
  """(key path, leaf) pairs with None kept: the reference to compare against."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]


def _assert_bitwise_equal(actual, expected):
  """Same tree structure and every leaf equal with NumPy (None where None)."""
  assert jax.tree.structure(actual, is_leaf=lambda x: x is None) == \
      jax.tree.structure(expected, is_leaf=lambda x: x is None)
  for (path, a), (_, b) in zip(_leaves(actual), _leaves(expected)):
    if b is None:
      assert a is None, path
    else:
      assert np.asarray(a).dtype == np.asarray(b).dtype, path
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def _save(directory, step=1, **items):
  with SparseCheckpointManager(str(directory)) as manager:
    manager.save(step, **items)


def _restore(directory, **targets):
  with SparseCheckpointManager(str(directory)) as manager:
    return manager.restore(**targets)


def test_params_state_restores_bitwise_into_a_fresh_instance(tmp_path):
  model, other = _net(0), _net(1)
  saved = _params(model)
  _save(tmp_path, params=saved)
  restored = _restore(tmp_path, params_like=_params(other)).params
  assert type(restored) is nnx.State
  _assert_bitwise_equal(restored, saved)
  assert not np.array_equal(_params(other)["head"]["kernel"][...], saved["head"]["kernel"][...])
  nnx.update(other, restored)
  np.testing.assert_array_equal(np.asarray(other(_X)), np.asarray(model(_X)))


@pytest.mark.parametrize("saved_as, restored_as", [
    ("pure_dict", "state"), ("state", "pure_dict"), ("pure_dict", "pure_dict")])
def test_pure_dict_and_state_restore_into_each_other(tmp_path, saved_as, restored_as):
  forms = {"state": lambda s: s, "pure_dict": nnx.to_pure_dict}
  saved = _params(_net(0))
  _save(tmp_path, params=forms[saved_as](saved))
  like = forms[restored_as](_params(_net(1)))
  restored = _restore(tmp_path, params_like=like).params
  assert type(restored) is type(like)
  _assert_bitwise_equal(restored, forms[restored_as](saved))


def test_state_is_stored_as_plain_nested_dicts_without_value_levels(tmp_path):
  saved = _params(_net(0))
  _save(tmp_path, params=saved)
  plain = ocp.StandardCheckpointer().restore(str(tmp_path / "1" / "params"))
  _assert_bitwise_equal(plain, jax.tree.map(np.asarray, nnx.to_pure_dict(saved)))
  assert set(plain["attention"]["value"]) == {"bias", "kernel"}  # a layer named 'value' stays


def test_abstract_state_target_restores_with_its_shardings(tmp_path):
  saved = _params(_net(0))
  _save(tmp_path, params=saved)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
      nnx.eval_shape(lambda: _params(_net(1))))
  abstract["head"]["kernel"] = nnx.Param(jax.ShapeDtypeStruct(
      (4, 5), jnp.float32, sharding=NamedSharding(mesh, P("data", None))))
  restored = _restore(tmp_path, params_like=abstract).params
  assert type(restored) is nnx.State
  _assert_bitwise_equal(restored, saved)
  assert restored["head"]["kernel"].get_value().sharding == NamedSharding(mesh, P("data", None))
  assert restored["conv"]["bias"].get_value().sharding == NamedSharding(mesh, P())


def test_optimizer_over_the_pruning_wrapper_resumes_exactly(tmp_path):
  model = _net(0)
  optimizer = _optimizer(model)
  for _ in range(3):
    _train_step(model, optimizer)
  saved_opt = nnx.state(optimizer)
  _save(tmp_path, params=_params(model), opt_state=saved_opt)

  fresh = _net(1)
  fresh_optimizer = _optimizer(fresh)
  restored = _restore(tmp_path, params_like=_params(fresh),
                      opt_state_like=nnx.state(fresh_optimizer))
  assert type(restored.opt_state) is nnx.State
  _assert_bitwise_equal(restored.opt_state, saved_opt)
  nnx.update(fresh, restored.params)
  nnx.update(fresh_optimizer, restored.opt_state)

  _train_step(model, optimizer)  # step 4: the schedule's last mask update
  _train_step(fresh, fresh_optimizer)
  _assert_bitwise_equal(_params(fresh), _params(model))
  _assert_bitwise_equal(nnx.state(fresh_optimizer), nnx.state(optimizer))
  kernel = np.asarray(_params(model)["head"]["kernel"].get_value())
  assert np.mean(kernel == 0) == pytest.approx(0.6)  # pruning went on after the resume


@pytest.mark.parametrize("like_form", ["state", "pure_dict"])
def test_masks_of_an_nnx_state_round_trip(tmp_path, like_form):
  params = _params(_net(0))
  masks = sparsejax.magnitude_masks(params, 0.5)
  assert masks["head"]["bias"].get_value() is None  # vectors are not pruned
  _save(tmp_path, params=params, masks=masks)
  like = _params(_net(1))
  if like_form == "pure_dict":
    like, masks = nnx.to_pure_dict(like), nnx.to_pure_dict(masks)
  restored = _restore(tmp_path, masks_like=like).masks
  assert type(restored) is type(like)
  _assert_bitwise_equal(restored, masks)
  kernel = np.asarray(masks["attention"]["query"]["kernel"])
  assert kernel.dtype == bool and kernel.mean() == 0.5


def _message(directory, **targets):
  with pytest.raises(CheckpointError) as error:
    _restore(directory, **targets)
  assert "corrupted" not in str(error.value)
  return str(error.value)


def test_a_model_with_an_extra_layer_is_a_structure_mismatch_naming_the_leaf(tmp_path):
  model = _net(0)
  optimizer = _optimizer(model)
  _train_step(model, optimizer)
  params = _params(model)
  _save(tmp_path, params=params, masks=sparsejax.magnitude_masks(params, 0.5),
        opt_state=nnx.state(optimizer))
  deeper = _net(1, extra=True)
  message = _message(tmp_path, params_like=_params(deeper))
  assert message.startswith("Item 'params': structure mismatch: leaf 'extra/bias' of the target "
                            "is not in the checkpoint.")
  assert "the checkpoint has 'head/bias' float32[5] and the target has 'extra/bias' " \
         "float32[5]" in message
  message = _message(tmp_path, params_like=nnx.to_pure_dict(_params(deeper)))
  assert "leaf 'extra/bias' of the target is not in the checkpoint" in message
  message = _message(tmp_path, opt_state_like=nnx.state(_optimizer(deeper)))
  assert message.startswith("Item 'opt_state': structure mismatch: leaf 'opt_state/inner_state/0/"
                            "mu/extra/bias' of the target is not in the checkpoint.")
  message = _message(tmp_path, masks_like=_params(deeper))
  assert message.startswith("Item 'masks': structure mismatch: leaf 'extra/bias' of the target "
                            "is not in the checkpoint's model.")


def test_a_model_missing_a_layer_is_a_structure_mismatch_naming_the_leaf(tmp_path):
  _save(tmp_path, params=_params(_net(0, extra=True)))
  message = _message(tmp_path, params_like=_params(_net(1)))
  assert message.startswith("Item 'params': structure mismatch: the checkpoint has leaf "
                            "'extra/bias' that the target lacks.")
  assert "the checkpoint has 'extra/bias' float32[5] and the target has 'head/bias' " \
         "float32[5]" in message


class _LinenNet(nn.Module):
  """The Linen twin of `_Net`: the same layer names and kernel layouts."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, kernel_size=(3,), name="conv")(x))
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attention")(h, h)
    return nn.Dense(5, name="head")(h.mean(axis=1))


def test_linen_params_and_nnx_state_restore_into_each_other(tmp_path):
  linen = _LinenNet().init(jax.random.key(3), _X)["params"]
  _save(tmp_path / "linen", params=linen)
  model = _net(1)
  restored = _restore(tmp_path / "linen", params_like=_params(model)).params
  assert type(restored) is nnx.State
  _assert_bitwise_equal(nnx.to_pure_dict(restored), linen)
  nnx.update(model, restored)
  np.testing.assert_allclose(np.asarray(model(_X)),
                             np.asarray(_LinenNet().apply({"params": linen}, _X)),
                             rtol=1e-6, atol=1e-6)

  saved = _params(_net(0))
  _save(tmp_path / "nnx", params=saved)
  restored = _restore(tmp_path / "nnx", params_like=linen).params
  assert type(restored) is dict
  _assert_bitwise_equal(restored, nnx.to_pure_dict(saved))


def test_two_leaves_with_one_path_are_an_error(tmp_path):
  clash = {"head/kernel": jnp.ones(2), "head": {"kernel": jnp.zeros(2)}}
  with SparseCheckpointManager(str(tmp_path)) as manager:
    with pytest.raises(CheckpointError, match=r"Item 'params': two leaves have the path "
                                              r"'head/kernel'"):
      manager.save(1, params=clash)
    with pytest.raises(CheckpointError, match=r"Item 'train_state': leaf 'a/b' lies under leaf "
                                              r"'a'"):
      manager.save(1, train_state={"a": jnp.ones(1), "a/b": jnp.ones(1)})


def test_optimizer_state_written_before_the_plain_form_still_restores(tmp_path):
  params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  tx = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.5, 0)).wrap(optax.adam(1e-2))
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  with SparseCheckpointManager(str(tmp_path)) as manager:  # as Orbax stored it before
    manager._manager.save(1, args=ocp.args.Composite(
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave({"step": 1, "level": None, "versions": {}})))
  restored = _restore(tmp_path, opt_state_like=tx.init(params)).opt_state
  assert type(restored) is type(opt_state)
  _assert_bitwise_equal(restored, opt_state)


def _is_none(x):
  return x is None


def test_masks_from_the_optimizer_and_from_a_checkpoint_are_one_type(tmp_path):
  model = models.NnxMLP(nnx.Rngs(0))
  schedule = sparsejax.PolynomialSchedule(0.0, 0.75, begin_step=0, end_step=2)
  optimizer = nnx.Optimizer(model, sparsejax.GradualMagnitudePruning(schedule).wrap(optax.sgd(0.1)),
                            wrt=nnx.Param)
  x, y = models.batch()

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - jax.nn.one_hot(y, 4)) ** 2))(model))

  for _ in range(3):  # through the schedule's last mask update (step 2): 75% of each kernel pruned
    step(model, optimizer)
  params = _params(model)
  from_optimizer = sparsejax.state_masks(optimizer.opt_state)
  _save(tmp_path, params=params, masks=from_optimizer)
  restored = _restore(tmp_path, masks_like=_params(models.NnxMLP(nnx.Rngs(1)))).masks
  structure = jax.tree.structure(params, is_leaf=_is_none)  # as magnitude_masks(params) gives
  for masks in (from_optimizer, restored, sparsejax.state_masks(optimizer.opt_state, params)):
    assert jax.tree.structure(masks, is_leaf=_is_none) == structure  # nnx.Param-wrapped
    assert type(masks["out"]["kernel"]) is nnx.Param
  assert from_optimizer["out"]["bias"].get_value() is None
  both = jax.tree.map(lambda a, b: None if a is None else a & b, from_optimizer, restored,
                      is_leaf=_is_none)
  for layer in ("hidden0", "hidden1", "out"):
    kernel = np.asarray(params[layer]["kernel"][...])  # the wrapper zeroed exactly the pruned
    np.testing.assert_array_equal(np.asarray(both[layer]["kernel"][...]), kernel != 0)
    assert np.mean(kernel == 0) == 0.75, layer

  new = jax.tree.map(lambda m: None if m is None else  # a new level: every other kept weight
                     m & (np.arange(m.size).reshape(m.shape) % 2 == 0), restored, is_leaf=_is_none)
  opt_state = sparsejax.with_masks(optimizer.opt_state, new)
  assert jax.tree.structure(opt_state) == jax.tree.structure(optimizer.opt_state)  # OptVariables
  optimizer.opt_state = opt_state
  assert not jax.tree.leaves(nnx.state(optimizer, nnx.Param))  # masks are not model params
  step(model, optimizer)
  for layer in ("hidden0", "hidden1", "out"):
    np.testing.assert_array_equal(np.asarray(_params(model)[layer]["kernel"][...]) != 0,
                                  np.asarray(new[layer]["kernel"][...]), err_msg=layer)
