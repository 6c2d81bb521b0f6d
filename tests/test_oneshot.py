"""One-shot pruning (magnitude, Wanda, SparseGPT) against NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import oneshot
from tests import reference


def correlated_inputs(rng, n, d, scale_spread=3.0):
  """Inputs with correlated features of very different scales (as in LLM activations)."""
  mixing = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
  scales = np.exp(rng.uniform(-scale_spread / 2, scale_spread / 2, size=d))
  return (rng.normal(size=(n, d)) @ mixing) * scales


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(sparsity=0.7), dict(nm=(2, 4)),
                                    dict(nm=(4, 8))])
def test_sparsegpt_equals_numpy_reference(target):
  rng = np.random.default_rng(0)
  x = correlated_inputs(rng, 256, 64)
  w = rng.normal(size=(64, 24))
  expected_w, expected_keep = reference.sparsegpt(w, x, block_size=16, **target)
  h = jnp.asarray(x.T @ x, jnp.float32)
  got_w, got_keep = oneshot.sparsegpt(jnp.asarray(w, jnp.float32), h, block_size=16, **target)
  np.testing.assert_array_equal(np.asarray(got_keep), expected_keep)
  np.testing.assert_allclose(np.asarray(got_w), expected_w, rtol=2e-3, atol=2e-4)
  assert not np.any(np.asarray(got_w)[~expected_keep])


@pytest.mark.parametrize("d_in, d_out, block_size, target", [
    (200, 30, 16, dict(sparsity=0.6)),   # 13 blocks: 4 panels of 4 (padded), a partial last block
    (330, 12, 32, dict(sparsity=0.5)),   # 11 blocks, the last one of 10 inputs
    (200, 30, 16, dict(nm=(2, 4))),
    (136, 17, 8, dict(sparsity=0.3)),    # 17 blocks: 5 panels of 4, 3 padded blocks skipped
])
def test_sparsegpt_over_several_panels_and_a_partial_block_equals_numpy_reference(
    d_in, d_out, block_size, target):
  rng = np.random.default_rng(d_in + d_out)
  x = correlated_inputs(rng, 3 * d_in, d_in)
  x[:, 3] = 0.0                                     # a dead input too
  w = rng.normal(size=(d_in, d_out))
  expected_w, expected_keep = reference.sparsegpt(w, x, block_size=block_size, **target)
  got_w, got_keep = oneshot.sparsegpt(jnp.asarray(w, jnp.float32),
                                      jnp.asarray(x.T @ x, jnp.float32), block_size=block_size,
                                      **target)
  np.testing.assert_array_equal(np.asarray(got_keep), expected_keep)
  np.testing.assert_allclose(np.asarray(got_w), expected_w, rtol=2e-3, atol=2e-4)


def test_sparsegpt_dead_inputs_are_zeroed_and_count_exact():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(100, 32))
  x[:, 5] = 0.0                                     # an input never active
  w = rng.normal(size=(32, 8))
  expected_w, _ = reference.sparsegpt(w, x, sparsity=0.5, block_size=32)
  got_w, keep = oneshot.sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32),
                                  sparsity=0.5)
  np.testing.assert_allclose(np.asarray(got_w), expected_w, rtol=2e-3, atol=2e-4)
  assert int(keep.sum()) == 128                     # exactly half of 256
  assert not np.any(np.asarray(got_w)[5])


def test_wanda_mask_equals_numpy():
  rng = np.random.default_rng(2)
  x = correlated_inputs(rng, 128, 48)
  w = rng.normal(size=(48, 20))
  h = jnp.asarray(x.T @ x, jnp.float32)
  new, keep = oneshot.prune_layer(jnp.asarray(w, jnp.float32), h, "wanda", sparsity=0.6)
  expected = reference.wanda_mask(w, x, 0.6)
  np.testing.assert_array_equal(np.asarray(keep), expected)
  np.testing.assert_allclose(np.asarray(new), np.where(expected, w, 0.0), rtol=1e-6)
  assert (np.asarray(keep).sum(axis=0) == round(0.4 * 48)).all()   # per output unit


def test_magnitude_is_per_layer_by_default_and_per_output_on_request():
  w = np.array([[1., -8.], [2., 7.], [-3., 6.], [4., 5.]])
  _, default = oneshot.prune_layer(jnp.asarray(w), None, "magnitude", sparsity=0.5)
  _, per_output = oneshot.prune_layer(jnp.asarray(w), None, "magnitude", sparsity=0.5,
                                      per_output=True)
  _, per_layer = oneshot.prune_layer(jnp.asarray(w), None, "magnitude", sparsity=0.5,
                                     per_output=False)
  np.testing.assert_array_equal(per_output, [[0, 1], [0, 1], [1, 0], [1, 0]])
  np.testing.assert_array_equal(per_layer, [[0, 1], [0, 1], [0, 1], [0, 1]])
  np.testing.assert_array_equal(default, per_layer)
  params = {"a": {"kernel": jnp.asarray(w)}}
  _, masks = oneshot.prune_sequentially(params, None, "magnitude", sparsity=0.5)
  np.testing.assert_array_equal(masks["a"]["kernel"], per_layer)


def test_wanda_is_always_per_output_and_per_layer_wanda_is_an_error():
  rng = np.random.default_rng(7)
  x = correlated_inputs(rng, 64, 8)
  w = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  h = jnp.asarray(x.T @ x, jnp.float32)
  _, default = oneshot.prune_layer(w, h, "wanda", sparsity=0.5)
  _, explicit = oneshot.prune_layer(w, h, "wanda", sparsity=0.5, per_output=True)
  np.testing.assert_array_equal(default, reference.wanda_mask(np.asarray(w), x, 0.5))
  np.testing.assert_array_equal(explicit, default)
  with pytest.raises(ValueError, match="wanda compares scores within each output unit only"):
    oneshot.prune_layer(w, h, "wanda", sparsity=0.5, per_output=False)
  with pytest.raises(ValueError, match="wanda compares scores within each output unit only"):
    oneshot.prune_sequentially({"a": {"kernel": w}}, lambda p: {"a/kernel": h}, "wanda",
                               sparsity=0.5, per_output=False)
  with pytest.raises(ValueError, match="applies to magnitude only"):
    oneshot.prune_layer(w, h, "sparsegpt", sparsity=0.5, per_output=True)


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(target):
  rng = np.random.default_rng(3)
  x = correlated_inputs(rng, 512, 64)
  w = rng.normal(size=(64, 32))
  h = jnp.asarray(x.T @ x, jnp.float32)
  errors = {}
  for method in oneshot.METHODS:
    new, _ = oneshot.prune_layer(jnp.asarray(w, jnp.float32), h, method, **target)
    errors[method] = float(np.sum((x @ w - x @ np.asarray(new, np.float64)) ** 2))
  assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], errors


@pytest.mark.parametrize("method", oneshot.METHODS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_keeps_n_of_every_m_along_the_contraction_axes(method, nm):
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(4, 8, 16)).astype(np.float32)   # attention out: (heads, head_dim, out)
  x = rng.normal(size=(64, 32))
  new, keep = oneshot.prune_layer(jnp.asarray(kernel), jnp.asarray(x.T @ x, jnp.float32), method,
                                  nm=nm, axes=(0, 1))
  groups = np.asarray(keep).reshape(32 // nm[1], nm[1], 16)   # (heads*head_dim) read in order
  assert (groups.sum(axis=1) == nm[0]).all()
  assert not np.any(np.asarray(new)[~np.asarray(keep)])


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="second")(nn.relu(nn.Dense(16, name="first")(x)))


def test_prune_sequentially_calibrates_each_layer_on_the_pruned_layers_before():
  rng = np.random.default_rng(5)
  x = correlated_inputs(rng, 96, 12).astype(np.float32)
  model = TwoLayers()
  params = model.init(jax.random.key(0), x[:1])["params"]
  hessians = oneshot.linen_hessians(model, [x[:48], x[48:]])
  lines = []
  pruned, masks = oneshot.prune_sequentially(params, hessians, "sparsegpt", sparsity=0.5,
                                             group=lambda path: path, log=lines.append)
  first = {k: np.asarray(v, np.float64) for k, v in params["first"].items()}
  second = np.asarray(params["second"]["kernel"], np.float64)
  w0, keep0 = reference.sparsegpt(first["kernel"], x, sparsity=0.5)
  hidden = np.maximum(x @ w0 + first["bias"], 0.0)           # the pruned first layer's outputs
  w1, keep1 = reference.sparsegpt(second, hidden, sparsity=0.5)
  np.testing.assert_array_equal(masks["first"]["kernel"], keep0)
  np.testing.assert_array_equal(masks["second"]["kernel"], keep1)
  np.testing.assert_allclose(pruned["second"]["kernel"], w1, rtol=2e-3, atol=2e-4)
  assert masks["first"]["bias"] is None
  np.testing.assert_array_equal(pruned["first"]["bias"], params["first"]["bias"])
  assert len(lines) == 2 and "group 1/2 first" in lines[0]


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attention")(x)
    return nn.Dense(4, name="head")(y)


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def test_linen_hessians_capture_flax_attention_projections():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(3, 5, 8)).astype(np.float32)           # (batch, length, features)
  model = Attention()
  params = model.init(jax.random.key(0), x)["params"]
  hessians = oneshot.linen_hessians(model, [x])(params)
  assert list(hessians) == [f"attention/{n}/kernel" for n in ("query", "key", "value", "out")] + [
      "head/kernel"]
  tokens = x.reshape(-1, 8).astype(np.float64)
  for name in ("query", "key", "value"):
    np.testing.assert_allclose(hessians[f"attention/{name}/kernel"], tokens.T @ tokens, rtol=1e-5)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["attention"])
  q, k, v = (np.einsum("bld,dhe->blhe", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
  weights = _softmax(np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(4))
  heads = np.einsum("bhqk,bkhe->bqhe", weights, v).reshape(-1, 8)
  np.testing.assert_allclose(hessians["attention/out/kernel"], heads.T @ heads, rtol=1e-4, atol=1e-5)
  pruned, masks = oneshot.prune_sequentially(params, oneshot.linen_hessians(model, [x]), "wanda",
                                             nm=(2, 4))
  out_keep = np.asarray(masks["attention"]["out"]["kernel"]).reshape(2, 4, 8)  # (8 inputs / M, M, 8 outputs)
  assert (out_keep.sum(axis=1) == 2).all()


def test_bad_input_is_named():
  w = jnp.ones((8, 4))
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    oneshot.prune_layer(w, None, "magnitude", sparsity=1.0)
  with pytest.raises(ValueError, match="0 < N <= M"):
    oneshot.prune_layer(w, None, "magnitude", nm=(4, 2))
  with pytest.raises(ValueError, match="either sparsity"):
    oneshot.prune_layer(w, None, "magnitude", sparsity=0.5, nm=(2, 4))
  with pytest.raises(ValueError, match="unknown one-shot method 'obs'"):
    oneshot.prune_layer(w, None, "obs", sparsity=0.5)
  with pytest.raises(ValueError, match="Gram matrix of shape"):
    oneshot.prune_layer(w, jnp.eye(4), "wanda", sparsity=0.5)
  with pytest.raises(ValueError, match="not divisible by M=8"):
    oneshot.prune_layer(jnp.ones((12, 4)), jnp.eye(12), "sparsegpt", nm=(2, 8))
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match=r"captured for \['b/kernel'\]"):
    oneshot.prune_sequentially(params, lambda p: {"a/kernel": jnp.eye(4)}, "wanda", sparsity=0.5)
  with pytest.raises(ValueError, match="needs calibration"):
    oneshot.prune_sequentially(params, None, "sparsegpt", sparsity=0.5)


def test_sparsegpt_all_zero_hessian_zeroes_every_weight_and_the_mask_says_so():
  # The authors: H_ii = 0 -> H_ii = 1 and that input's weights zeroed; every input is dead.
  w = jnp.asarray(np.arange(1.0, 33.0).reshape(8, 4), jnp.float32)
  new, keep = oneshot.prune_layer(w, jnp.zeros((8, 8)), "sparsegpt", sparsity=0.5)
  np.testing.assert_array_equal(np.asarray(new), np.zeros((8, 4)))
  assert not np.asarray(keep).any()


def test_sparsegpt_more_dead_inputs_than_the_target_prunes_them_all():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(64, 8))
  x[:, :6] = 0.0                                    # 6 of 8 inputs never active, target prunes 4
  w = rng.normal(size=(8, 3))
  new, keep = oneshot.prune_layer(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32),
                                  "sparsegpt", sparsity=0.5, block_size=8)
  new, keep = np.asarray(new), np.asarray(keep)
  assert not keep[:6].any() and not new[:6].any()
  np.testing.assert_array_equal(keep, new != 0)     # the mask is what the weights hold


@pytest.mark.parametrize("method", oneshot.METHODS)
def test_non_finite_weights_or_gram_matrix_is_an_error_naming_the_layer(method):
  w = np.ones((8, 4), np.float32)
  h = np.eye(8, dtype=np.float32)
  bad_w = w.copy()
  bad_w[2, 1] = np.inf
  with pytest.raises(ValueError, match=r"^block_0/fc/kernel: the weights hold NaN or inf"):
    oneshot.prune_layer(jnp.asarray(bad_w), jnp.asarray(h), method, sparsity=0.5,
                        name="block_0/fc/kernel")
  if method == "magnitude":
    return
  bad_h = h.copy()
  bad_h[3, 3] = np.nan
  with pytest.raises(ValueError, match=r"^kernel of shape \(8, 4\): the inputs' Gram matrix"):
    oneshot.prune_layer(jnp.asarray(w), jnp.asarray(bad_h), method, sparsity=0.5)
  # Through calibration: a NaN in the inputs X names the path of the layer that saw it.
  model = TwoLayers()
  x = np.ones((4, 12), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  x[1, 3] = np.nan
  with pytest.raises(ValueError, match=r"^first/kernel: the inputs' Gram matrix X\^T X \(so the "
                                       r"calibration inputs X\) hold NaN or inf"):
    oneshot.prune_sequentially(params, oneshot.linen_hessians(model, [x]), method, sparsity=0.5)


def test_sparsegpt_indefinite_gram_matrix_is_an_error_naming_dampening():
  with pytest.raises(ValueError, match=r"^q/kernel: X\^T X \+ lambda I is not positive definite"):
    oneshot.prune_layer(jnp.ones((8, 4)), -jnp.eye(8), "sparsegpt", sparsity=0.5, name="q/kernel")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dampening=float("inf")), r"dampening=inf must be a finite number > 0"),
    (dict(dampening=float("nan")), r"dampening=nan must be"),
    (dict(dampening=0.0), r"dampening=0.0 must be"),
    (dict(dampening=-0.1), r"dampening=-0.1 must be"),
    (dict(block_size=0), r"block_size=0 must be an integer >= 1"),
    (dict(block_size=16.0), r"block_size=16.0 must be an integer >= 1"),
])
def test_bad_solver_settings_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    oneshot.prune_layer(jnp.ones((8, 4)), jnp.eye(8), "sparsegpt", sparsity=0.5, **kwargs)
  with pytest.raises(ValueError, match=message):
    oneshot.prune_sequentially({"a": {"kernel": jnp.ones((8, 4))}}, lambda p: {}, "sparsegpt",
                               sparsity=0.5, **kwargs)


def test_nm_that_a_kernel_cannot_take_fails_before_any_kernel_is_pruned():
  params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((6, 4))}}
  calls, lines = [], []
  with pytest.raises(ValueError, match=r"^b/kernel: kernel of shape \(6, 4\) has 6 inputs "
                                       r"\(axes \(0,\)\), not divisible by M=4"):
    oneshot.prune_sequentially(params, lambda p: calls.append(1) or {}, "wanda", nm=(2, 4),
                               log=lines.append)
  assert not calls and not lines
  shapes = jax.eval_shape(lambda: params)
  with pytest.raises(ValueError, match=r"^b/kernel"):
    oneshot.check_layers(shapes, "magnitude", nm=(2, 4))
  with pytest.raises(ValueError, match=r"block_size \(6\) divisible by M=4"):
    oneshot.check_layers(shapes, "sparsegpt", nm=(2, 4), block_size=6)


def test_wanda_from_squared_norms_alone_equals_wanda_from_the_gram_matrix():
  rng = np.random.default_rng(9)
  x = correlated_inputs(rng, 3 * 40, 16).astype(np.float32)
  model = TwoLayers()
  params = model.init(jax.random.key(0), x[:1])["params"]
  batches = [x[:40], x[40:80], x[80:]]
  norms = oneshot.linen_hessians(model, batches, diagonal=True)(params)
  np.testing.assert_allclose(norms["first/kernel"], (x.astype(np.float64) ** 2).sum(axis=0),
                             rtol=1e-5)
  assert norms["second/kernel"].shape == (16,)
  from_norms, masks = oneshot.prune_sequentially(
      params, oneshot.linen_hessians(model, batches, diagonal=True), "wanda", sparsity=0.5)
  from_gram, gram_masks = oneshot.prune_sequentially(
      params, oneshot.linen_hessians(model, batches), "wanda", sparsity=0.5)
  jax.tree.map(np.testing.assert_array_equal, from_norms, from_gram)
  np.testing.assert_array_equal(masks["first"]["kernel"],
                                reference.wanda_mask(np.asarray(params["first"]["kernel"]), x, 0.5))
  with pytest.raises(ValueError, match=r"sparsegpt needs the inputs' Gram matrix of shape \(16, 16\)"):
    oneshot.prune_layer(params["second"]["kernel"], norms["second/kernel"], "sparsegpt",
                        sparsity=0.5)


def test_prune_layer_is_compiled_once_per_shape_and_target():
  w = jnp.asarray(np.random.default_rng(10).normal(size=(16, 8)), jnp.float32)
  h = jnp.eye(16)
  oneshot.prune_layer(w, h, "wanda", sparsity=0.5)
  before = oneshot._prune._cache_size()  # pylint: disable=protected-access
  for _ in range(3):
    oneshot.prune_layer(w + 1.0, h, "wanda", sparsity=0.5)
  assert oneshot._prune._cache_size() == before  # pylint: disable=protected-access


def test_sparsegpt_program_does_not_grow_with_the_layer():
  # Panels and blocks run in loops: one copy of the block code for any d_in.
  # Panels unrolled in Python compiled to 13k lines at 256 inputs, 50k at
  # 1024 (98 s to compile), 99k at 4096.
  lines = {}
  for d_in in (256, 1024):
    compiled = oneshot.sparsegpt.lower(jnp.ones((d_in, 8)), jnp.eye(d_in), block_size=16,
                                       sparsity=0.5).compile()
    lines[d_in] = len(compiled.as_text().splitlines())
  assert lines[1024] <= 1.05 * lines[256], lines
