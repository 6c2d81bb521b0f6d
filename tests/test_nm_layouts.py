"""N:M along the contraction axes of real Flax kernels: Dense, Conv, attention (Linen and NNX).

The reference reads each output unit's input vector straight from the
kernel, in the order the layer contracts it, and checks every run of m
consecutive entries: exactly n kept, the n largest |w| (ties to the lower
index), with no use of the library's grouping code.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax import checkpoint
from sparsejax import layouts
from tests import reference

EMBED, HEADS, HEAD_DIM = 16, 2, 8


def _input_vectors(path, kernel):
  """(units, fan_in): row u is output unit u's input vector in contraction order.

  Written out per layer kind from Flax's definitions, independently of
  `sparsejax.layouts`.
  """
  k = np.asarray(kernel)
  if path.endswith(("query/kernel", "key/kernel", "value/kernel")):  # (in, heads, head_dim)
    return k.reshape(k.shape[0], -1).T
  if path.endswith("out/kernel") and k.ndim == 3:  # (heads, head_dim, out): h * head_dim + d
    return k.reshape(-1, k.shape[-1]).T
  if k.ndim == 4:  # Conv (H, W, Cin, Cout): per (h, w, cout) the Cin vector
    return np.moveaxis(k, 2, -1).reshape(-1, k.shape[2])
  return k.T  # Dense (in, out)


def _check_nm_rows(path, kernel, mask, n, m):
  rows, kept = _input_vectors(path, kernel), _input_vectors(path, mask)
  counts = kept.reshape(kept.shape[0], -1, m).sum(-1)
  assert np.all(counts == n), f"{path}: groups keep {np.unique(counts)} of {m}, not {n}"
  np.testing.assert_array_equal(kept, reference.nm_mask(np.abs(rows), n, m, axis=-1),
                                err_msg=path)


class LinenModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(EMBED, (3, 3), name="Conv_0")(x)
    x = x.reshape(x.shape[0], -1, EMBED)
    x = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD_DIM)(x)
    return nn.Dense(8)(x)


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(8, EMBED, (3, 3), rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=EMBED,
                                            qkv_features=HEADS * HEAD_DIM, decode=False, rngs=rngs)
    self.head = nnx.Linear(EMBED, 8, rngs=rngs)

  def __call__(self, x):
    x = self.conv(x)
    x = x.reshape(x.shape[0], -1, EMBED)
    return self.head(self.attention(x))


def _linen_params():
  return LinenModel().init(jax.random.key(0), jnp.ones((1, 4, 4, 8)))["params"]


def _nnx_params():
  return nnx.state(NnxModel(nnx.Rngs(0)), nnx.Param)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("make", [_linen_params, _nnx_params], ids=["linen", "nnx"])
def test_nm_masks_keep_n_of_m_along_every_output_units_input_vector(make, n, m):
  params = make()
  masks = sparsejax.nm_masks(params, n, m)
  checked = set()
  for leaf in sparsejax.leaves_with_masks(params, masks):
    if leaf.path.endswith("kernel"):
      _check_nm_rows(leaf.path, leaf.param, leaf.mask, n, m)
      checked.add(leaf.path.split("/")[-2])
    else:
      assert leaf.mask is None, leaf.path
  assert {"query", "key", "value", "out"} <= checked


def test_attention_query_groups_differ_from_the_old_heads_axis_grouping():
  # Axis -2 of (in, heads, head_dim) is the heads axis: grouping there (what
  # the library did before) gives masks that are not N:M per output unit.
  kernel = np.asarray(_linen_params()["MultiHeadDotProductAttention_0"]["query"]["kernel"])
  old = np.asarray(sparsejax.nm_mask(jnp.abs(jnp.asarray(kernel)), 1, 2, axis=-2))
  rows = _input_vectors("query/kernel", old)
  assert np.any(rows.reshape(rows.shape[0], -1, 2).sum(-1) != 1)


def test_nm_sparsity_trains_an_nnx_attention_model_to_nm_weights():
  model = NnxModel(nnx.Rngs(1))
  schedule = sparsejax.NMSchedule(2, 4, num_steps=6, dense_steps=1, finetune_steps=2)
  nm = sparsejax.NMSparsity.from_method("srste", schedule)
  optimizer = nnx.Optimizer(model, nm.wrap(optax.adam(1e-2)), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      params = nnx.state(model, nnx.Param)
      graphdef, _, rest = nnx.split(model, nnx.Param, ...)
      forward = nnx.merge(graphdef, nm.forward(params, optimizer.opt_state), rest)
      return jnp.mean(forward(x) ** 2)
    optimizer.update(model, nnx.grad(loss_fn)(model))

  for _ in range(6):
    step(model, optimizer)
  params = nnx.state(model, nnx.Param)
  masks = sparsejax.find_pruning_state(optimizer.opt_state).masks
  for leaf in sparsejax.leaves_with_masks(params, masks):
    if leaf.mask is not None:
      w = np.asarray(leaf.param)
      _check_nm_rows(leaf.path, w, w != 0, 2, 4)
  worst = sparsejax.nm.max_nonzeros_per_group(params, masks, 4)
  assert set(worst.values()) == {2}


def test_export_and_max_nonzeros_follow_the_same_rule(tmp_path):
  params = _linen_params()
  masks = sparsejax.nm_masks(params, 2, 4)
  pruned = sparsejax.apply_masks(params, masks)
  assert set(sparsejax.nm.max_nonzeros_per_group(pruned, masks, 4).values()) == {2}
  file = tmp_path / "model.npz"
  checkpoint.export_sparse(pruned, masks, file, nm=(2, 4))
  restored, restored_masks = checkpoint.load_sparse(file, like=params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(a, b)
  out = restored_masks["MultiHeadDotProductAttention_0"]["out"]["kernel"]
  np.testing.assert_array_equal(out, masks["MultiHeadDotProductAttention_0"]["out"]["kernel"])


def test_dense_general_kernel_is_ambiguous_until_its_axes_are_named():
  params = nn.DenseGeneral((2, 4), axis=(-2, -1)).init(jax.random.key(0), jnp.ones((1, 4, 8)))
  params = params["params"]  # kernel (4, 8, 2, 4): contracts axes 0 and 1
  with pytest.raises(ValueError, match=re.escape(
      "cannot tell which axes of 'kernel' (shape (4, 8, 2, 4)) are its input")) as info:
    sparsejax.nm_masks(params, 2, 4)
  assert "axes={" in str(info.value)
  masks = sparsejax.nm_masks(params, 2, 4, axes={"^kernel$": (0, 1)})
  rows = np.asarray(masks["kernel"]).reshape(32, 8).T  # per output (o1, o2): the (i1, i2) vector
  np.testing.assert_array_equal(
      rows, reference.nm_mask(np.abs(np.asarray(params["kernel"]).reshape(32, 8).T), 2, 4, -1))


def test_rules_are_regex_first_then_default_and_accept_names_and_callables():
  rule = layouts.ContractionRule({"patch": "conv_flat", "proj": (0, 1)})
  assert rule("patch_embed/kernel", (2, 2, 3, 8)) == (0, 1, 2)
  assert rule("block/proj/kernel", (4, 8, 16)) == (0, 1)
  assert rule("Conv_0/kernel", (3, 3, 4, 8)) == (2,)
  assert layouts.ContractionRule(conv_flat=True)("Conv_0/kernel", (3, 3, 4, 8)) == (0, 1, 2)
  assert layouts.leaf_axes(lambda path, shape: -1, "w", (4, 8)) == (1,)
  with pytest.raises(ValueError, match="does not compile"):
    layouts.ContractionRule({"(": 0})


def test_grouped_view_round_trips_non_adjacent_axes():
  x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  view = layouts.GroupedView(x.shape, (0, 2))
  y = view.to_view(x)
  assert y.shape == (8, 3, 5) and view.axis == 0
  np.testing.assert_array_equal(y[:, 1, 2], x[:, 1, :, 2].reshape(-1))  # row-major over (0, 2)
  np.testing.assert_array_equal(view.from_view(y), x)


def test_attention_nm_masks_are_the_same_under_jit_and_sharding():
  params = _linen_params()
  eager = sparsejax.nm_masks(params, 2, 4)
  jitted = jax.jit(lambda p: sparsejax.nm_masks(p, 2, 4))(params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*([None] * (x.ndim - 1) + ["fsdp"]))))
  sharded_params = jax.tree.map(shard, params)  # every leaf split along its last axis
  sharded = jax.jit(lambda p: sparsejax.nm_masks(p, 2, 4))(sharded_params)
  for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
