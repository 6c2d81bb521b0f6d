"""The experiment models: output shapes, parameter counts, names, modes."""

import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from experiments import models
from experiments.models import lenet5
from experiments.models import resnet
from experiments.models import resnet50
from experiments.models import vit


def _key(seed=0):
  # RBG keys: threefry initialisers take seconds to compile on CPU, one per
  # parameter; the models do not depend on the key implementation.
  return jax.random.key(seed, impl="rbg")


# Parameter counts written out from the architecture descriptions, not from
# the models: a layer's count is the size of its kernel plus its bias.


def _dense(fan_in, fan_out):
  return fan_in * fan_out + fan_out


def _conv(k, c_in, c_out, bias=True):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _norm(c):  # BatchNorm or LayerNorm: scale and bias
  return 2 * c


def _mlp_count(h, w, c, features=(300, 100), classes=10):
  widths = [h * w * c, *features, classes]
  return sum(_dense(a, b) for a, b in zip(widths[:-1], widths[1:]))


def _lenet5_count(c, classes=10):
  return (_conv(5, c, 6) + _conv(5, 6, 16) + _dense(16 * 5 * 5, 120) + _dense(120, 84)
          + _dense(84, classes))


def _resnet20_count(c, width=16, classes=10):
  total = _conv(3, c, width, bias=False) + _norm(width)
  c_in = width
  for stage in range(3):
    c_out = width * 2**stage
    for _ in range(3):  # option A shortcuts have no parameters
      total += _conv(3, c_in, c_out, bias=False) + _conv(3, c_out, c_out, bias=False)
      total += 2 * _norm(c_out)
      c_in = c_out
  return total + _dense(4 * width, classes)


def _resnet50_count(c, width=64, classes=1000):
  total = _conv(7, c, width, bias=False) + _norm(width)
  c_in = width
  for stage, blocks in enumerate([3, 4, 6, 3]):
    w = width * 2**stage
    for block in range(blocks):  # bottleneck: 1x1 (w), 3x3 (w), 1x1 (4w)
      total += (_conv(1, c_in, w, bias=False) + _conv(3, w, w, bias=False)
                + _conv(1, w, 4 * w, bias=False) + 2 * _norm(w) + _norm(4 * w))
      if block == 0:  # projection shortcut: 1x1 conv + BatchNorm
        total += _conv(1, c_in, 4 * w, bias=False) + _norm(4 * w)
      c_in = 4 * w
  return total + _dense(c_in, classes)


def _vit_count(h, w, c, patch, hidden=64, depth=4, mlp=128, classes=10):
  patches = (h // patch) * (w // patch)
  block = (_norm(hidden) + 4 * _dense(hidden, hidden) + _norm(hidden)
           + _dense(hidden, mlp) + _dense(mlp, hidden))
  return (_conv(patch, c, hidden) + patches * hidden + depth * block + _norm(hidden)
          + _dense(hidden, classes))


def _param_count(model, shape):
  # eval_shape: only shapes are needed, so nothing is computed.
  variables = jax.eval_shape(model.init, _key(0), jnp.zeros(shape, jnp.float32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def _paths(tree):
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _images(shape, seed=0):
  return jax.random.normal(_key(seed), shape, jnp.float32)


@functools.cache
def _init(name, shape, **kwargs):
  """(model, variables) of `create_model(name, 7, **kwargs)` built for `shape`.

  Cached: initialising a model compiles it, the slowest step of these tests,
  and the variables are immutable, so tests that need the same model share it.
  """
  model = models.create_model(name, num_classes=7, **kwargs)
  return model, jax.jit(model.init)(_key(0), jnp.zeros(shape, jnp.float32))


# --- forward shapes -----------------------------------------------------------

# Cases that share parameters (LeNet-5 pads 28x28 to 32x32; ResNet-20 pools
# globally) are initialised once and applied to every size.
FORWARD_CASES = [
    pytest.param("mlp", {}, [(1, 8, 8, 1)], id="mlp-8x8x1"),
    pytest.param("mlp", {}, [(1, 28, 28, 1)], id="mlp-28x28x1"),
    pytest.param("lenet5", {}, [(1, 32, 32, 1), (1, 28, 28, 1)], id="lenet5-32x32x1+28x28x1"),
    pytest.param("resnet20", {}, [(1, 8, 8, 3), (1, 32, 32, 3)], id="resnet20-8x8x3+32x32x3"),
    pytest.param("resnet50", {"width": 8}, [(1, 32, 32, 3)], id="resnet50-width8-32x32x3"),
    pytest.param("vit", {"patch_size": 4}, [(1, 32, 32, 3)], id="vit-32x32x3-patch4"),
    pytest.param("vit", {"patch_size": 2}, [(1, 8, 8, 1)], id="vit-8x8x1-patch2"),
]


@pytest.mark.parametrize("name,kwargs,shapes", FORWARD_CASES)
def test_forward_returns_finite_batch_by_classes_logits_same_jitted_and_eager(
    name, kwargs, shapes):
  model, variables = _init(name, shapes[0], **kwargs)
  apply = jax.jit(model.apply)
  for i, shape in enumerate(shapes):
    x = _images((3, *shape[1:]))
    logits = apply(variables, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32, shape
    assert np.all(np.isfinite(logits)), shape
    if i == 0:  # eager ops are compiled one by one: compare at one size only
      chex.assert_trees_all_close(model.apply(variables, x), logits, rtol=1e-5, atol=1e-5)


# --- parameter counts ---------------------------------------------------------


def test_mlp_lenet300_100_has_266610_params_on_28x28():
  assert _mlp_count(28, 28, 1) == 266_610
  assert _param_count(models.MLP(), (1, 28, 28, 1)) == 266_610


def test_mlp_on_8x8_digits_has_50610_params():
  assert _mlp_count(8, 8, 1) == 50_610
  assert _param_count(models.MLP(), (1, 8, 8, 1)) == 50_610


def test_mlp_custom_features_match_formula_and_names():
  model = models.MLP(features=(32, 16, 8), num_classes=3)
  assert _param_count(model, (1, 4, 4, 2)) == _mlp_count(4, 4, 2, (32, 16, 8), 3)
  params = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 4, 4, 2)))["params"]
  assert sorted(params) == ["head", "hidden_0", "hidden_1", "hidden_2"]


@pytest.mark.parametrize("side", [32, 28])
def test_lenet5_has_61706_params_on_32x32x1_and_on_padded_28x28x1(side):
  assert _lenet5_count(1) == 61_706
  assert _param_count(models.LeNet5(), (1, side, side, 1)) == 61_706


def test_lenet5_on_28x28_equals_lenet5_on_the_image_zero_padded_to_32x32():
  model, variables = _init("lenet5", (1, 32, 32, 1))
  x = _images((2, 28, 28, 1))
  padded = jnp.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
  chex.assert_trees_all_close(model.apply(variables, x), model.apply(variables, padded))
  assert lenet5.pad_to_input_size(jnp.zeros((1, 29, 40, 3))).shape == (1, 32, 40, 3)


def test_lenet5_param_names_and_kernel_shapes():
  shapes = _paths(jax.eval_shape(models.LeNet5().init, _key(0),
                                 jnp.zeros((1, 32, 32, 1)))["params"])
  assert shapes == {
      "conv_0/kernel": (5, 5, 1, 6), "conv_0/bias": (6,),
      "conv_1/kernel": (5, 5, 6, 16), "conv_1/bias": (16,),
      "fc_0/kernel": (400, 120), "fc_0/bias": (120,),
      "fc_1/kernel": (120, 84), "fc_1/bias": (84,),
      "head/kernel": (84, 10), "head/bias": (10,),
  }


@pytest.mark.parametrize("side", [32, 8])
def test_resnet20_option_a_param_count_matches_formula(side):
  assert _resnet20_count(3) == 269_722
  assert _param_count(models.ResNet20(), (1, side, side, 3)) == 269_722


def test_resnet20_param_count_scales_with_width():
  model = models.ResNet20(width=4, num_classes=5)
  assert _param_count(model, (1, 8, 8, 3)) == _resnet20_count(3, width=4, classes=5)


@pytest.mark.parametrize("shape,patch,count", [
    ((1, 32, 32, 3), 4, 141_898),
    ((1, 8, 8, 1), 2, 136_010),
])
def test_vit_param_count_matches_formula(shape, patch, count):
  assert _vit_count(*shape[1:], patch) == count
  assert _param_count(models.ViT(patch_size=patch), shape) == count


# --- ResNet-20: names, shortcuts, BatchNorm -------------------------------------


def test_resnet20_param_tree_has_named_stages_blocks_and_bias_free_convs():
  variables = jax.eval_shape(models.ResNet20().init, _key(0), jnp.zeros((1, 8, 8, 3)))
  shapes = _paths(variables["params"])
  assert shapes["stem_conv/kernel"] == (3, 3, 3, 16)
  assert shapes["stage0_block0/conv_0/kernel"] == (3, 3, 16, 16)
  assert shapes["stage1_block0/conv_0/kernel"] == (3, 3, 16, 32)
  assert shapes["stage1_block0/conv_1/kernel"] == (3, 3, 32, 32)
  assert shapes["stage2_block2/bn_1/scale"] == (64,)
  assert shapes["head/kernel"] == (64, 10)
  blocks = [f"stage{i}_block{j}" for i in range(3) for j in range(3)]
  assert sorted(variables["params"]) == sorted(["stem_conv", "stem_bn", "head", *blocks])
  for block in blocks:  # option A: nothing besides the two conv + BN pairs
    assert sorted(variables["params"][block]) == ["bn_0", "bn_1", "conv_0", "conv_1"]
  assert not [p for p in shapes if "conv" in p and p.endswith("bias")]
  stats = _paths(variables["batch_stats"])
  assert stats["stage2_block0/bn_0/mean"] == (64,) and stats["stem_bn/var"] == (16,)


def test_option_a_shortcut_subsamples_and_zero_pads_channels_evenly():
  x = _images((2, 5, 6, 4))
  y = resnet.option_a_shortcut(x, channels=8, stride=2)
  assert y.shape == (2, 3, 3, 8)
  np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0.0)
  np.testing.assert_array_equal(y[..., 6:], 0.0)
  np.testing.assert_array_equal(resnet.option_a_shortcut(x, 4, 1), x)
  with pytest.raises(ValueError, match="cannot shrink 4 channels to 2"):
    resnet.option_a_shortcut(x, 2, 1)


@pytest.fixture(scope="module")
def resnet_small():
  """ResNet-20, its variables, a batch, and jitted train and eval applies."""
  model, variables = _init("resnet20", (1, 8, 8, 3))
  train = jax.jit(functools.partial(model.apply, train=True, mutable="batch_stats"))
  return model, variables, _images((4, 8, 8, 3)), train, jax.jit(model.apply)


def test_resnet20_train_mode_returns_updated_batch_stats_for_every_bn(resnet_small):
  model, variables, x, train, _ = resnet_small
  logits, updates = train(variables, x)
  assert logits.shape == (4, 7)
  chex.assert_trees_all_equal_shapes(variables["batch_stats"], updates["batch_stats"])
  changed = jax.tree.map(lambda old, new: bool(np.any(old != new)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed)), changed
  # momentum 0.9: the first update moves the running mean a tenth of the way.
  stem = jnp.mean(nn.Conv(model.width, (3, 3), padding=1, use_bias=False).apply(
      {"params": variables["params"]["stem_conv"]}, x), axis=(0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"], 0.1 * stem,
                             rtol=1e-4, atol=1e-6)


def test_resnet20_eval_is_deterministic_per_example_and_uses_running_averages(resnet_small):
  _, variables, x, train, evaluate = resnet_small
  logits = evaluate(variables, x)  # no mutable collection needed in eval mode
  chex.assert_trees_all_equal(logits, evaluate(variables, x))
  # Running statistics, not batch ones: an example's logits ignore the rest of the batch.
  chex.assert_trees_all_close(evaluate(variables, x[:2]), logits[:2], rtol=1e-5, atol=1e-6)
  # ... and they follow the running statistics once training has updated them.
  train_logits, updates = train(variables, x)
  assert not np.allclose(evaluate({**variables, **updates}, x), logits)
  assert not np.allclose(train_logits, logits)


# --- ResNet-50: parameter count, strides, names, zero-initialised BatchNorm ------------


@functools.cache
def _resnet50_224():
  """Shapes (no compute) of ResNet-50's variables and of its logits and conv outputs at 224x224."""
  model = models.ResNet50(num_classes=1000)
  x = jnp.zeros((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, _key(0), x)
  logits, state = jax.eval_shape(functools.partial(
      model.apply, capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
      mutable="intermediates"), variables, x)
  convs = {path.removesuffix("/__call__/0"): shape
           for path, shape in _paths(state["intermediates"]).items()}
  return variables, logits, convs


def test_resnet50_has_torchvision_25557032_trainable_params_at_width_64():
  assert _resnet50_count(3) == 25_557_032
  variables, _, _ = _resnet50_224()
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"])) == 25_557_032
  # BatchNorm's running mean and variance are state, not parameters: 2 per BN channel.
  bn_channels = sum(shape[0] for path, shape in _paths(variables["params"]).items()
                    if path.endswith("/scale"))
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["batch_stats"])) == (
      2 * bn_channels)


def test_resnet50_param_count_scales_with_width_and_classes():
  assert _param_count(models.ResNet50(width=8, num_classes=5), (1, 32, 32, 3)) == (
      _resnet50_count(3, width=8, classes=5))


def test_resnet50_maps_224x224x3_to_batch_by_1000_logits_with_stride_on_the_3x3_conv():
  _, logits, convs = _resnet50_224()
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert convs["stem_conv"] == (2, 112, 112, 64)  # then the 3x3/2 max pool: 56x56
  assert convs["stage0_block0/conv1"] == (2, 56, 56, 64)
  assert convs["stage0_block0/shortcut_conv"] == (2, 56, 56, 256)  # projection, stride 1
  # v1.5: the first 1x1 keeps the resolution, the 3x3 and the projection halve it.
  assert convs["stage1_block0/conv1"] == (2, 56, 56, 128)
  assert convs["stage1_block0/conv2"] == (2, 28, 28, 128)
  assert convs["stage1_block0/shortcut_conv"] == (2, 28, 28, 512)
  assert convs["stage2_block5/conv3"] == (2, 14, 14, 1024)
  assert convs["stage3_block2/conv3"] == (2, 7, 7, 2048)
  assert len(convs) == 53  # stem, 16 blocks x 3, 4 projections


def test_resnet50_every_conv_path_contains_conv_and_is_a_bias_free_conv_for_nm():
  variables, _, _ = _resnet50_224()
  shapes = _paths(variables["params"])
  kernels = {p: s for p, s in shapes.items() if p.endswith("/kernel")}
  convs = {p: s for p, s in kernels.items() if len(s) == 4}
  assert len(convs) == 53 and set(kernels) - set(convs) == {"head/kernel"}
  for path, shape in convs.items():
    assert "conv" in path.split("/")[-2], path
    assert sparsejax.layouts.default_axes(path, shape) == (2,), path  # groups along Cin
  assert sparsejax.layouts.default_axes("head/kernel", kernels["head/kernel"]) == (0,)
  assert not [p for p in shapes if "conv" in p and not p.endswith("/kernel")]  # no biases
  assert shapes["stem_conv/kernel"] == (7, 7, 3, 64)
  assert shapes["stage1_block0/conv2/kernel"] == (3, 3, 128, 128)
  assert shapes["head/kernel"] == (2048, 1000)
  bottleneck = ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3"]
  for i, blocks in enumerate(resnet50.STAGE_SIZES):
    assert sorted(variables["params"][f"stage{i}_block0"]) == sorted(
        bottleneck + ["shortcut_bn", "shortcut_conv"])
    for j in range(1, blocks):  # identity shortcut
      assert sorted(variables["params"][f"stage{i}_block{j}"]) == bottleneck
  assert len(variables["params"]) == 3 + sum(resnet50.STAGE_SIZES)


def test_resnet50_last_batchnorm_scale_of_each_block_starts_at_zero_others_at_one():
  _, variables = _init("resnet50", (1, 32, 32, 3), width=8)
  scales = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
            if path[-1].key == "scale"}
  last = [p for p in scales if p.endswith("/bn3/scale")]
  assert len(last) == 16 and len(scales) == 1 + 16 * 3 + 4
  for path, scale in scales.items():
    np.testing.assert_array_equal(scale, 0.0 if path in last else 1.0, err_msg=path)


def test_resnet50_train_mode_returns_updated_batch_stats_for_every_bn():
  model, variables = _init("resnet50", (1, 32, 32, 3), width=8)
  x = _images((4, 32, 32, 3))
  logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable="batch_stats"))(
      variables, x)
  assert logits.shape == (4, 7) and np.all(np.isfinite(logits))
  chex.assert_trees_all_equal_shapes(variables["batch_stats"], updates["batch_stats"])
  changed = jax.tree.map(lambda old, new: bool(np.any(old != new)),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed)), changed


# --- ViT --------------------------------------------------------------------------


def test_vit_attention_has_four_2d_hidden_by_hidden_projections_per_block():
  model = models.ViT(hidden_dim=32, depth=2, num_heads=4, mlp_dim=48)
  params = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  shapes = _paths(params)
  for block in ("block_0", "block_1"):
    for proj in ("query", "key", "value", "out"):
      assert shapes[f"{block}/attention/{proj}/kernel"] == (32, 32)
      assert shapes[f"{block}/attention/{proj}/bias"] == (32,)
    assert shapes[f"{block}/mlp/fc_0/kernel"] == (32, 48)
    assert shapes[f"{block}/mlp/fc_1/kernel"] == (48, 32)
    assert sorted(params[block]) == ["attention", "mlp", "norm_0", "norm_1"]
  assert shapes["patch_embed/kernel"] == (4, 4, 3, 32)
  assert shapes["pos_embedding"] == (1, 4, 32)
  assert "norm_final/scale" in shapes and shapes["head/kernel"] == (32, 10)


def test_vit_pos_embedding_is_initialised_normal_with_std_002():
  _, variables = _init("vit", (1, 8, 8, 1), patch_size=2)
  pos = variables["params"]["pos_embedding"]
  assert pos.shape == (1, 16, 64)
  assert abs(float(jnp.std(pos)) - 0.02) < 0.002 and abs(float(jnp.mean(pos))) < 0.002


def test_vit_attention_matches_flax_multi_head_attention_with_reshaped_kernels():
  hidden, heads = 16, 4
  x = _images((2, 5, hidden))
  ours = vit.MultiHeadSelfAttention(heads)
  rng = np.random.default_rng(0)
  params = {p: {"kernel": jnp.asarray(rng.normal(size=(hidden, hidden)) / 4, jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(hidden,)), jnp.float32)}
            for p in ("query", "key", "value", "out")}
  chex.assert_trees_all_equal_shapes(jax.eval_shape(ours.init, _key(0), x)["params"], params)
  ref = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=hidden)
  split = lambda a: a.reshape(a.shape[:-1] + (heads, hidden // heads))
  ref_params = {p: {"kernel": split(params[p]["kernel"]), "bias": split(params[p]["bias"])}
                for p in ("query", "key", "value")}
  ref_params["out"] = {"kernel": params["out"]["kernel"].reshape(heads, hidden // heads, hidden),
                       "bias": params["out"]["bias"]}
  chex.assert_trees_all_close(ours.apply({"params": params}, x),
                              ref.apply({"params": ref_params}, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,patch", [((1, 30, 32, 3), 4), ((1, 32, 30, 3), 4),
                                         ((1, 8, 8, 1), 3)])
def test_vit_rejects_image_size_not_divisible_by_patch_size(shape, patch):
  with pytest.raises(ValueError, match=f"not divisible by patch_size={patch}"):
    models.ViT(patch_size=patch).init(_key(0), jnp.zeros(shape))


def test_vit_rejects_hidden_dim_not_divisible_by_num_heads():
  with pytest.raises(ValueError, match="hidden_dim=30 is not divisible by num_heads=4"):
    models.ViT(hidden_dim=30).init(_key(0), jnp.zeros((1, 8, 8, 1)))


def test_vit_dropout_is_random_in_train_mode_and_off_in_eval():
  _, variables = _init("vit", (1, 8, 8, 1), patch_size=2)
  model = models.create_model("vit", 7, patch_size=2, dropout_rate=0.5)  # same params
  x = _images((2, 8, 8, 1))
  apply = jax.jit(model.apply, static_argnames="train")
  train = [apply(variables, x, train=True, rngs={"dropout": _key(s)}) for s in (1, 2)]
  assert not np.allclose(train[0], train[1])
  evaluated = apply(variables, x)  # no 'dropout' rng needed
  chex.assert_trees_all_equal(evaluated, apply(variables, x))
  assert not np.allclose(train[0], evaluated)


# --- create_model ------------------------------------------------------------------


def test_create_model_builds_each_registered_class_with_its_fields():
  assert sorted(models.MODELS) == ["lenet5", "llama", "lm", "mlp", "resnet20", "resnet50", "vit"]
  for name, cls in models.MODELS.items():
    model = models.create_model(name, num_classes=3)
    assert type(model) is cls and model.num_classes == 3
  model = models.create_model("vit", 100, patch_size=2, depth=1)
  assert (model.patch_size, model.depth, model.num_classes) == (2, 1, 100)


def test_create_model_unknown_name_raises_listing_known_names():
  with pytest.raises(ValueError, match=re.escape(
      "unknown model 'resnet18'; known models: lenet5, llama, lm, mlp, resnet20, resnet50, vit")):
    models.create_model("resnet18", 10)


@pytest.mark.parametrize("name,bad", [("vit", "patch"), ("resnet20", "depth"), ("resnet50", "depth"),
                                      ("mlp", "dropout_rate"), ("lenet5", "parent")])
def test_create_model_unknown_kwarg_raises_naming_model_and_key(name, bad):
  with pytest.raises(ValueError, match=f"unknown argument\\(s\\) for model '{name}': {bad};"):
    models.create_model(name, 10, **{bad: 1})


def test_create_model_rejects_non_positive_num_classes():
  with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
    models.create_model("mlp", 0)
