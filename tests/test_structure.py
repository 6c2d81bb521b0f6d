"""Structured pruning: groups, scores against the authors' formulas, masks, physical shrink."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
import tests
from sparsejax import structure
from experiments.models import create_model
from experiments.models import structure as model_structure
from tests import reference


def _randomise(variables, seed=1):
  """Every leaf redrawn (BatchNorm variances positive), so masked units are not zero by chance."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, l.shape, l.dtype)
                                     for k, l in zip(keys, leaves)])
  if "batch_stats" in out:
    out["batch_stats"] = jax.tree.map(lambda v: jnp.abs(v) + 0.1, out["batch_stats"])
  return out


def _images(shape):
  return jax.random.normal(jax.random.key(2), shape)


def _tokens(shape, vocab=32):
  return jax.random.randint(jax.random.key(2), shape, 0, vocab)


MODELS = {
    "mlp": (dict(features=(16, 12)), lambda: _images((3, 8, 8, 1))),
    "lenet5": ({}, lambda: _images((2, 28, 28, 1))),
    "resnet20": (dict(width=4), lambda: _images((2, 8, 8, 3))),
    "vit": (dict(hidden_dim=16, depth=2, num_heads=4, mlp_dim=24, patch_size=4),
            lambda: _images((2, 8, 8, 1))),
    "lm": (dict(num_layers=2, width=16, num_heads=4, mlp_dim=24, max_length=8),
           lambda: _tokens((2, 8))),
    "llama": (dict(num_layers=2, width=16, num_heads=4, num_kv_heads=2, mlp_dim=24),
              lambda: _tokens((2, 8))),
}


@functools.lru_cache(maxsize=None)
def _model(name):
  kwargs, inputs = MODELS[name]
  model = create_model(name, num_classes=32 if name in ("lm", "llama") else 10, **kwargs)
  x = inputs()
  variables = _randomise(model.init(jax.random.key(0), x))
  return model, variables, x


@functools.lru_cache(maxsize=None)
def _shapes(name):
  """The model and its params as zeros of the right shapes (no init compute)."""
  kwargs, inputs = MODELS[name]
  model = create_model(name, num_classes=10, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), inputs())
  return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def _apply(model, variables, x):
  return jax.jit(model.apply)(variables, x)


def _count(tree):
  return sum(int(np.size(v)) for v in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_model_equals_masked_model(name):
  model, variables, x = _model(name)
  found = model_structure.groups(model, variables["params"])
  pruned = sparsejax.prune_structured(variables["params"], found, "magnitude_sp", 0.5)
  masked = {**variables, "params": pruned.params}
  small, small_model = model_structure.shrink_model(model, masked, found, pruned.keep)
  expected = _apply(model, masked, x)
  np.testing.assert_allclose(_apply(small_model, small, x), expected, atol=1e-5, rtol=1e-5)
  assert np.abs(expected - _apply(model, variables, x)).max() > 1e-3   # pruning changed outputs
  shapes = jax.eval_shape(small_model.init, jax.random.key(0), x)
  assert jax.tree.map(np.shape, small) == jax.tree.map(lambda s: s.shape, shapes)
  assert _count(small["params"]) < 0.75 * _count(variables["params"]) or name == "resnet20"
  for g in found:   # half of every group's units is gone, and the config says so
    fields = ((g.field, 1),) if isinstance(g.field, str) else g.field
    for field, per_unit in fields:
      width = getattr(small_model, field)
      width = width if g.index is None else width[g.index]
      assert width == (g.units - g.units // 2) * per_unit, g.name


@pytest.mark.parametrize("name", ["vit", "lm"])
def test_flap_shrunk_model_equals_masked_model_with_its_bias(name):
  model, variables, x = _model(name)
  found = model_structure.groups(model, variables["params"])
  stats = structure.linen_input_stats(model, [x, x[::-1]], variables["params"],
                                      paths=[g.consumer.path for g in found])
  pruned = sparsejax.prune_structured(variables["params"], found, "flap", 0.5, stats=stats)
  masked = {**variables, "params": pruned.params}
  small, small_model = model_structure.shrink_model(model, masked, found, pruned.keep)
  np.testing.assert_allclose(_apply(small_model, small, x), _apply(model, masked, x),
                             atol=1e-5, rtol=1e-5)
  bias = [g.bias for g in found]
  changed = [leaf.path for leaf, old in zip(sparsejax.trees.named_leaves(pruned.params),
                                            sparsejax.trees.named_leaves(variables["params"]))
             if leaf.path in bias and not np.allclose(leaf.value, old.value)]
  assert changed, "FLAP added no compensation"


def test_flap_on_the_mlp_adds_its_compensation_to_the_next_layers_bias():
  model, variables, x = _model("mlp")
  found = model_structure.groups(model, variables["params"])
  assert [g.bias for g in found] == ["hidden_1/bias", "head/bias"]
  stats = structure.linen_input_stats(model, [x], variables["params"],
                                      paths=[g.consumer.path for g in found])
  pruned = sparsejax.prune_structured(variables["params"], found, "flap", 0.5, stats=stats)
  # The head's bias gains mean(X_j) * W[j, :] summed over the pruned inputs j of the head.
  s = stats["head/kernel"]
  pruned_rows = ~np.asarray(pruned.keep["hidden_1"])
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  expected = np.asarray(variables["params"]["head"]["bias"]) + (
      np.asarray(s.mean, np.float64) * pruned_rows) @ w
  np.testing.assert_allclose(pruned.params["head"]["bias"], expected, rtol=1e-5, atol=1e-6)
  masked = {**variables, "params": pruned.params}
  small, small_model = model_structure.shrink_model(model, masked, found, pruned.keep)
  np.testing.assert_allclose(_apply(small_model, small, x), _apply(model, masked, x),
                             atol=1e-5, rtol=1e-5)


def test_flap_on_a_consumer_without_a_bias_fails_before_scoring_naming_it():
  import dataclasses  # pylint: disable=g-import-not-at-top
  params, found = _lm_like()
  found = tuple(dataclasses.replace(g, bias=None) if g.kind == "channel" else g for g in found)
  with pytest.raises(ValueError, match=r"group 'block_0/mlp': FLAP's compensation needs a bias "
                                       r"on its consumer 'block_0/fc_1/kernel'"):
    sparsejax.prune_structured(params, found, "flap", 0.3, stats={})   # no scores computed
  pruned = sparsejax.prune_structured(params, found, "magnitude_sp", 0.3, bias=False)
  assert pruned.keep
  orphan = tuple(dataclasses.replace(g, consumer=None) for g in found)
  with pytest.raises(ValueError, match=r"group 'block_0/\w+': FLAP's compensation needs a "
                                       r"consumer with a bias; the group has no consumer"):
    sparsejax.prune_structured(params, orphan, "flap", 0.3, stats={})


def test_llama_kv_groups_take_their_query_heads_and_each_layer_shrinks_to_its_own_widths():
  model, variables, x = _model("llama")
  found = {g.name: g for g in model_structure.groups(model, variables["params"])}
  attention = found["model/layers/0/self_attn"]
  assert attention.units == 2                       # KV heads, each with 2 query heads of 4 wide
  masks = sparsejax.structured_masks(variables["params"], [attention],
                                     {attention.name: np.array([False, True])})
  layer = masks["model"]["layers"]["0"]["self_attn"] if "0" in masks["model"]["layers"] else (
      masks["model"]["layers"][0]["self_attn"])
  np.testing.assert_array_equal(np.asarray(layer["q_proj"]["kernel"][0]), np.arange(16) >= 8)
  np.testing.assert_array_equal(np.asarray(layer["k_proj"]["kernel"][0]), np.arange(8) >= 4)
  # A different count per layer, as FLAP's global choice keeps: layer 0 one KV group and 9
  # MLP units, layer 1 both groups and 17 units.
  keep = {"model/layers/0/self_attn": np.array([False, True]),
          "model/layers/1/self_attn": np.array([True, True]),
          "model/layers/0/mlp": np.arange(24) % 3 == 0, "model/layers/1/mlp": np.arange(24) < 17}
  params = variables["params"]
  masked = {**variables, "params": sparsejax.masks.apply_masks(
      params, sparsejax.structured_masks(params, tuple(found.values()), keep))}
  small, small_model = model_structure.shrink_model(model, masked, tuple(found.values()), keep)
  assert (small_model.block_kv_heads, small_model.block_mlp_dims) == ((1, 2), (8, 17))
  c = small_model.llama_config()
  assert [(c.layer(i).num_heads, c.layer(i).intermediate_size) for i in range(2)] == [(2, 8),
                                                                                     (4, 17)]
  np.testing.assert_allclose(_apply(small_model, small, x), _apply(model, masked, x), atol=1e-5,
                             rtol=1e-5)
  shapes = jax.eval_shape(small_model.init, jax.random.key(0), x)
  assert jax.tree.map(np.shape, small) == jax.tree.map(lambda s: s.shape, shapes)


def test_rounding_to_a_multiple_keeps_zero_units_and_the_masked_outputs():
  model, variables, x = _model("lm")
  found = model_structure.groups(model, variables["params"])
  pruned = sparsejax.prune_structured(variables["params"], found, "magnitude_sp", 0.7)
  masked = {**variables, "params": pruned.params}
  small, small_model = model_structure.shrink_model(model, masked, found, pruned.keep,
                                                    multiple={"channel": 4, "head": 2})
  assert small_model.block_mlp_dims == (8, 8)      # round(0.3 * 24) = 7 kept units, rounded up
  assert small_model.block_heads == (2, 2)         # 1 kept head, 1 zero head
  assert int((np.asarray(small["params"]["block_0"]["fc_1"]["kernel"]) == 0).all(1).sum()) == 1
  out = np.asarray(small["params"]["block_0"]["attention"]["out"]["kernel"])
  assert int((out == 0).all((1, 2)).sum()) == 1
  np.testing.assert_allclose(_apply(small_model, small, x), _apply(model, masked, x), atol=1e-5)


def _lm_like(seed=0, layers=2, d=6, heads=3, hd=2, m=10):
  """A TransformerLM-shaped params dict of random numbers, and its groups."""
  rng = np.random.default_rng(seed)
  params = {}
  for l in range(layers):
    att = {p: {"kernel": rng.normal(size=(d, heads, hd)), "bias": rng.normal(size=(heads, hd))}
           for p in ("query", "key", "value")}
    att["out"] = {"kernel": rng.normal(size=(heads, hd, d)), "bias": rng.normal(size=d)}
    params[f"block_{l}"] = {"attention": att,
                            "fc_0": {"kernel": rng.normal(size=(d, m)), "bias": rng.normal(size=m)},
                            "fc_1": {"kernel": rng.normal(size=(m, d)), "bias": rng.normal(size=d)}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  model = create_model("lm", num_classes=8, num_layers=layers, width=d, num_heads=heads, mlp_dim=m)
  return params, model_structure.groups(model, params)


def _stats(rng, d_in, tokens=50):
  x = rng.normal(size=(tokens, d_in)) * rng.uniform(0.2, 2.0, size=d_in) + rng.normal(size=d_in)
  x = x.astype(np.float32)
  stats = structure.InputStats(jnp.float32(tokens), jnp.asarray(x.sum(0)),
                               jnp.asarray((x * x).sum(0)))
  return stats, x.astype(np.float64)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_flap_scores_masks_and_bias_match_a_numpy_port_of_the_authors_code(ratio):
  params, found = _lm_like()
  rng = np.random.default_rng(1)
  stats, inputs = {}, {}
  for g in found:
    stats[g.consumer.path], inputs[g.consumer.path] = _stats(rng, 6 if g.kind == "head" else 10)
  pruned = sparsejax.prune_structured(params, found, "flap", ratio, stats=stats)

  heads = [g for g in found if g.kind == "head"]
  mlps = [g for g in found if g.kind == "channel"]
  kernel = lambda g: np.asarray(params[g.consumer.path.split("/")[0]]["attention"]["out"]["kernel"]
                                if g.kind == "head" else
                                params[g.consumer.path.split("/")[0]]["fc_1"]["kernel"], np.float64)
  torch_w = lambda g: kernel(g).reshape(-1, 6).T          # (out, in) as torch stores it
  var = lambda g: inputs[g.consumer.path].var(axis=0)
  mean = lambda g: inputs[g.consumer.path].mean(axis=0)
  shapes = {l.path: l.value.shape for l in sparsejax.trees.named_leaves(params)}
  attn, mlp, attn_mask, mlp_mask, attn_bias, mlp_bias = reference.flap_al_am(
      [torch_w(g) for g in heads], [var(g) for g in heads], [mean(g) for g in heads],
      [torch_w(g) for g in mlps], [var(g) for g in mlps], [mean(g) for g in mlps], head_dim=2,
      head_cost=heads[0].cost(shapes), channel_cost=mlps[0].cost(shapes), pruning_ratio=ratio)
  for i, g in enumerate(heads):
    np.testing.assert_allclose(pruned.scores[g.name], attn[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pruned.keep[g.name], attn_mask[i])
  for i, g in enumerate(mlps):
    np.testing.assert_allclose(pruned.scores[g.name], mlp[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pruned.keep[g.name], mlp_mask[i])
  for i, (ga, gm) in enumerate(zip(heads, mlps)):
    b = ga.consumer.path.split("/")[0]
    np.testing.assert_allclose(pruned.params[b]["attention"]["out"]["bias"],
                               params[b]["attention"]["out"]["bias"] + attn_bias[i], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(pruned.params[b]["fc_1"]["bias"],
                               params[b]["fc_1"]["bias"] + mlp_bias[i], rtol=1e-4, atol=1e-4)
  # The target: removed parameters come closest to `ratio` of the groups' parameters.
  removed = sum(g.cost(shapes) * int((~np.asarray(pruned.keep[g.name])).sum()) for g in found)
  total = sum(g.cost(shapes) * g.units for g in found)
  assert abs(removed / total - ratio) < 0.2


def test_flap_reads_the_consumers_input_width_from_the_stats_for_several_output_axes():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class TwoAxisOut(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 3), name="down")(nn.relu(nn.Dense(5, name="up")(x)))

  model = TwoAxisOut()
  x = jax.random.normal(jax.random.key(3), (40, 4))
  params = model.init(jax.random.key(0), x)["params"]
  rule = structure.Rule("up/kernel", "mlp", "channel",
                        (structure.Member("up/kernel", 1), structure.Member("up/bias", 0),
                         structure.Member("down/kernel", 0)),
                        consumer="down/kernel", bias="down/bias")
  found = sparsejax.build_groups(params, [rule])
  stats = structure.linen_input_stats(model, [x], params)
  # NumPy: the consumer is (5 inputs, 2 x 3 outputs); WIFV_j = Var(X_j) sum_k W_jk^2, standardised.
  h = np.maximum(np.asarray(x, np.float64) @ np.asarray(params["up"]["kernel"], np.float64)
                 + np.asarray(params["up"]["bias"], np.float64), 0.0)
  w = np.asarray(params["down"]["kernel"], np.float64).reshape(5, 6)
  wifv = h.var(0) * (w * w).sum(1)
  expected = (wifv - wifv.mean()) / wifv.std(ddof=1)
  np.testing.assert_allclose(structure.flap(params, found, stats)["mlp"], expected, rtol=1e-4,
                             atol=1e-5)
  pruned = sparsejax.prune_structured(params, found, "flap", 0.4, stats=stats)
  gone = ~np.asarray(pruned.keep["mlp"])
  bias = np.asarray(params["down"]["bias"]) + ((h.mean(0) * gone) @ w).reshape(2, 3)
  np.testing.assert_allclose(pruned.params["down"]["bias"], bias, rtol=1e-4, atol=1e-5)


def test_wanda_sp_and_magnitude_sp_match_their_numpy_formulas():
  params, found = _lm_like(seed=3)
  rng = np.random.default_rng(4)
  stats, inputs = {}, {}
  for g in found:
    stats[g.consumer.path], inputs[g.consumer.path] = _stats(rng, 6 if g.kind == "head" else 10)
  wanda = structure.wanda_sp(params, found, stats)
  magnitude = structure.magnitude_sp(params, found, ord=2)
  l1 = structure.magnitude_sp(params, found, ord=1)
  leaves = {l.path: np.asarray(l.value, np.float64) for l in sparsejax.trees.named_leaves(params)}
  for g in found:
    w = leaves[g.consumer.path].reshape(-1, 6)
    sq = (inputs[g.consumer.path]**2).sum(0)
    hd = 2 if g.kind == "head" else 1
    np.testing.assert_allclose(wanda[g.name], reference.wanda_sp_scores(w.T, sq, hd), rtol=1e-5)
    # the group norm: every member's slices of a unit, by hand
    b = g.name.split("/")[0]
    if g.kind == "head":
      rows = [np.concatenate([leaves[f"{b}/attention/{p}/kernel"][:, h].ravel() for p in
                              ("query", "key", "value")] +
                             [leaves[f"{b}/attention/{p}/bias"][h]
                              for p in ("query", "key", "value")] +
                             [leaves[f"{b}/attention/out/kernel"][h].ravel()]) for h in range(3)]
    else:
      rows = [np.concatenate([leaves[f"{b}/fc_0/kernel"][:, u], [leaves[f"{b}/fc_0/bias"][u]],
                              leaves[f"{b}/fc_1/kernel"][u]]) for u in range(10)]
    np.testing.assert_allclose(magnitude[g.name], [np.linalg.norm(r) for r in rows], rtol=1e-5)
    np.testing.assert_allclose(l1[g.name], [np.abs(r).sum() for r in rows], rtol=1e-5)


def test_uniform_keep_removes_round_fraction_of_each_group_and_keeps_one():
  scores = {"a": jnp.array([3., 1., 2., 5.]), "b": jnp.array([1., 1.])}
  groups = [structure.Group("a", "channel", 4, ()), structure.Group("b", "channel", 2, ())]
  keep = structure.keep_uniform(scores, groups, 0.5)
  assert keep["a"].tolist() == [True, False, False, True]
  assert keep["b"].tolist() == [True, False]        # ties: the lower index
  keep = structure.keep_uniform(scores, groups, 0.9)
  assert keep["b"].tolist() == [True, False]        # round(0.1 * 2) = 0 -> the best one stays
  jitted = jax.jit(lambda s: structure.keep_uniform(scores, groups, s))(0.5)
  assert jitted["a"].tolist() == [True, False, False, True]


def test_input_stats_are_the_mean_and_variance_of_the_layer_inputs():
  model, variables, x = _model("mlp")
  stats = structure.linen_input_stats(model, [x[:2], x[2:]], variables["params"])
  p = variables["params"]
  hidden = np.asarray(x).reshape(3, -1) @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"]
  hidden = np.maximum(hidden, 0)
  s = stats["hidden_1/kernel"]
  np.testing.assert_allclose(s.mean, hidden.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s.var, hidden.var(0), rtol=1e-4, atol=1e-5)


def test_lenet5_groups_couple_the_flattened_map_rows_of_each_conv_channel():
  model, params = _shapes("lenet5")
  found = {g.name: g for g in model_structure.groups(model, params)}
  g = found["conv_1"]
  keep = np.ones(16, bool)
  keep[3] = False
  masks = sparsejax.structured_masks(params, [g], {"conv_1": keep})
  rows = np.asarray(masks["fc_0"]["kernel"][:, 0])
  assert rows.shape == (400,) and (~rows).sum() == 25
  np.testing.assert_array_equal(np.nonzero(~rows)[0], np.arange(25) * 16 + 3)


def test_the_parameter_cost_of_a_channel_counts_its_batchnorm_scale_and_bias():
  model, params = _shapes("resnet20")
  shapes = {leaf.path: np.shape(leaf.value) for leaf in sparsejax.trees.named_leaves(params)}
  found = {g.name: g for g in model_structure.groups(model, params)}
  block = found["stage1_block0"]               # 8 inner channels between 4 and 8 wide convs
  c_in = shapes["stage1_block0/conv_0/kernel"][2]
  c_out = shapes["stage1_block0/conv_1/kernel"][3]
  # Hand-worked: a 3x3 conv_0 output channel (9 c_in), a 3x3 conv_1 input channel (9 c_out),
  # and bn_0's scale and bias entry.
  assert block.cost(shapes) == 9 * c_in + 9 * c_out + 2
  assert shapes["stage1_block0/bn_0/scale"] == (block.units,)


def test_resnet_groups_leave_the_residual_channels_out():
  model, params = _shapes("resnet20")
  found = model_structure.groups(model, params)
  paths = {m.path for g in found for m in g.members}
  assert len(found) == 9 and not any("conv_1/kernel" in p and "stem" in p for p in paths)
  assert all(m.axis == 2 for g in found for m in g.members if m.path.endswith("conv_1/kernel"))


# Bad input: one-line errors naming the leaf or group; nothing modified.

def _snapshot(tree):
  return jax.tree.map(np.array, tree)


def test_a_fraction_that_removes_every_unit_is_an_error():
  params, found = _lm_like()
  before = _snapshot(params)
  with pytest.raises(ValueError, match="removing every unit"):
    sparsejax.prune_structured(params, found, "magnitude_sp", 1.0)
  empty = {g.name: np.ones(g.units, bool) for g in found}
  empty[found[0].name] = np.zeros(found[0].units, bool)
  with pytest.raises(ValueError, match="keeps no unit of 'block_0/attention/query/kernel'"):
    sparsejax.shrink(params, found, empty)
  jax.tree.map(np.testing.assert_array_equal, params, before)


def test_a_spec_that_does_not_match_the_tree_names_the_rule_or_leaf():
  params, _ = _lm_like()
  mlp = create_model("mlp", num_classes=10, features=(4,))
  with pytest.raises(ValueError, match=r"rule 'hidden_0' .* matches no leaf"):
    sparsejax.build_groups(params, model_structure.spec(mlp))
  broken = jax.tree.map(lambda a: a, params)
  del broken["block_1"]["fc_1"]
  lm = create_model("lm", num_classes=8, num_layers=2, width=6, num_heads=3, mlp_dim=10)
  with pytest.raises(ValueError, match="leaf 'block_1/fc_1/kernel', coupled to "
                                       "'block_1/fc_0/kernel', is not in the params"):
    sparsejax.build_groups(broken, model_structure.spec(lm))
  odd = jax.tree.map(lambda a: a, params)
  odd["block_0"]["fc_1"]["kernel"] = jnp.zeros((11, 6))
  with pytest.raises(ValueError, match=r"'block_0/fc_1/kernel' of shape \(11, 6\): axis 0 has 11"):
    sparsejax.build_groups(odd, model_structure.spec(lm))
  twice = structure.Rule("block_0/fc_0/kernel", "again", "channel",
                         (structure.Member("block_0/fc_0/kernel", 1),))
  with pytest.raises(ValueError, match="axis 1 of leaf 'block_0/fc_0/kernel' is already coupled"):
    sparsejax.build_groups(params, model_structure.spec(lm) + (twice,))


def test_a_multiple_rounds_groups_larger_than_it_and_leaves_smaller_ones_as_chosen():
  params, found = _lm_like(heads=3, m=10)           # 3 heads and 10 MLP units per block
  keep = {g.name: (np.arange(g.units) < (1 if g.kind == "head" else 5)) for g in found}
  small, _ = sparsejax.shrink(params, found, keep, multiple=8)
  # Hand-worked: 3 heads <= 8 stay as chosen (1 head); 5 of 10 MLP units round up to 8.
  assert small["block_0"]["attention"]["out"]["kernel"].shape == (1, 2, 6)
  assert small["block_1"]["fc_1"]["kernel"].shape == (8, 6)
  fc_1 = np.asarray(small["block_1"]["fc_1"]["kernel"])
  np.testing.assert_array_equal((fc_1 == 0).all(1), np.arange(8) >= 5)   # units 5-7 are zeros
  np.testing.assert_array_equal(fc_1[:5], np.asarray(params["block_1"]["fc_1"]["kernel"])[:5])
  # Per kind: heads to a multiple of 2 (1 -> 2, one zero head), the MLP units not rounded.
  small, _ = sparsejax.shrink(params, found, keep, multiple={"head": 2})
  out = np.asarray(small["block_0"]["attention"]["out"]["kernel"])
  assert out.shape == (2, 2, 6) and (out[1] == 0).all() and not (out[0] == 0).all()
  assert small["block_0"]["fc_1"]["kernel"].shape == (5, 6)
  small, _ = sparsejax.shrink(params, found, keep, multiple={"channel": 4, "head": 1})
  assert small["block_0"]["fc_1"]["kernel"].shape == (8, 6)
  assert small["block_0"]["attention"]["out"]["kernel"].shape == (1, 2, 6)
  # 9 of 10 MLP units: the next multiple of 8 (16) is above 10, so 9 stay (not all 10).
  keep = {g.name: (np.arange(g.units) < (1 if g.kind == "head" else 9)) for g in found}
  small, _ = sparsejax.shrink(params, found, keep, multiple=8)
  assert small["block_1"]["fc_1"]["kernel"].shape == (9, 6)


def test_a_bad_multiple_or_a_config_without_the_field_is_an_error_naming_it():
  params, found = _lm_like()
  before = _snapshot(params)
  keep = {g.name: np.ones(g.units, bool) for g in found}
  for bad, message in ((0, r"multiple must be a positive int, got 0"),
                       (2.0, r"multiple must be a positive int, got 2.0"),
                       ({"mlp": 8}, r"multiple has key 'mlp'; give one per group kind"),
                       ({"head": 0}, r"multiple\['head'\] must be a positive int, got 0")):
    with pytest.raises(ValueError, match=message):
      sparsejax.shrink(params, found, keep, multiple=bad)
  with pytest.raises(ValueError, match="config field 'block_heads' is None"):
    sparsejax.shrink(params, found, keep, config=create_model("lm", num_classes=8))
  jax.tree.map(np.testing.assert_array_equal, params, before)


def test_calibration_methods_without_stats_are_an_error():
  params, found = _lm_like()
  with pytest.raises(ValueError, match="flap needs stats="):
    sparsejax.prune_structured(params, found, "flap", 0.3)
  with pytest.raises(ValueError, match="unknown structured method 'l0'"):
    sparsejax.prune_structured(params, found, "l0", 0.3)


def test_readme_structured_example_runs_as_written():
  block = tests.doc_code_block("prune_structured")
  namespace = {}
  exec(block, namespace)  # pylint: disable=exec-used
  # FLAP's threshold is the unit where the kept parameters come closest to half; it goes too.
  assert namespace["small_model"].hidden == 31


def test_flap_global_choice_drops_the_threshold_unit_as_the_authors_do_and_keeps_all_at_zero():
  from sparsejax.structure import groups as groups_lib  # pylint: disable=g-import-not-at-top
  from sparsejax.structure import masks as masks_lib    # pylint: disable=g-import-not-at-top
  params = {"w": jnp.ones((3, 8))}                       # 8 units of 3 parameters each
  group = groups_lib.Group("layer", "channel", 8, (groups_lib.Member("w", 1),))
  scores = {"layer": jnp.arange(8.0)}
  # Hand-worked: sorted descending the cumulative costs are 3, 6, ..., 24; half of 24 is reached
  # at the 4th unit (score 4), which is the threshold; scores strictly above it stay: 5, 6, 7.
  kept = masks_lib.keep_global(scores, [group], params, 0.5)["layer"]
  np.testing.assert_array_equal(kept, np.arange(8) > 4)
  np.testing.assert_array_equal(masks_lib.keep_global(scores, [group], params, np.float32(0.5))
                                ["layer"], kept)
  assert bool(masks_lib.keep_global(scores, [group], params, 0.0)["layer"].all())
  for bad in (True, 1.0, "0.5", np.ones(2)):
    with pytest.raises(ValueError, match="fraction"):
      masks_lib.keep_global(scores, [group], params, bad)
