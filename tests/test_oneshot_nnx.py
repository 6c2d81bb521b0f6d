"""`oneshot.nnx_hessians` against X^T X computed by hand, and NNX models pruned block by block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models
from experiments.models import llama
from sparsejax import oneshot


class Mixed(nnx.Module):
  """Linear, LinearGeneral over two axes, Einsum, and one Linear called twice."""

  def __init__(self, rngs):
    self.first = nnx.Linear(4, 6, rngs=rngs)
    self.general = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)
    self.mix = nnx.Einsum("btd,dk->btk", (5, 3), rngs=rngs)
    self.shared = nnx.Linear(3, 3, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.first(x))                     # (b, t, 6)
    h = self.general(h.reshape(*h.shape[:-1], 2, 3))   # (b, t, 5)
    h = self.mix(h)                                    # (b, t, 3)
    return self.shared(self.shared(h))


def _numpy_inputs(pure, x):
  """Each layer's inputs as (tokens, d_in), in float64, from the pure dict of the params."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), pure)
  x = np.asarray(x, np.float64).reshape(-1, 4)
  h = np.maximum(x @ p["first"]["kernel"] + p["first"]["bias"], 0)
  general = h   # the (2, 3) axes, row-major, as the kernel (2, 3, 5) reads them
  h = np.einsum("nij,ijk->nk", h.reshape(-1, 2, 3), p["general"]["kernel"]) + p["general"]["bias"]
  mix = h
  h = h @ p["mix"]["kernel"]
  shared = np.concatenate([h, h @ p["shared"]["kernel"]])
  return {"first/kernel": x, "general/kernel": general, "mix/kernel": mix,
          "shared/kernel": shared}


def test_nnx_hessians_equal_x_transpose_x_of_every_layer_summed_over_batches():
  model = Mixed(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32) for _ in range(3)]
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  full = oneshot.nnx_hessians(model, batches)(params)
  diagonal = oneshot.nnx_hessians(model, batches, diagonal=True)(pure)
  assert list(full) == ["first/kernel", "general/kernel", "mix/kernel", "shared/kernel"]
  expected = {}
  for batch in batches:
    for path, x in _numpy_inputs(pure, batch).items():
      expected[path] = expected.get(path, 0) + x.T @ x
  for path, h in expected.items():
    assert full[path].dtype == jnp.float32
    np.testing.assert_allclose(full[path], h, rtol=1e-5, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(diagonal[path], np.diagonal(h), rtol=1e-5, atol=1e-5)


def test_nnx_hessians_use_the_weights_they_are_given_and_restore_the_classes():
  model = Mixed(nnx.Rngs(0))
  batch = jnp.ones((1, 2, 4))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  pure["first"]["kernel"] = 2 * pure["first"]["kernel"]
  got = oneshot.nnx_hessians(model, [batch])(pure)["general/kernel"]
  x = _numpy_inputs(pure, batch)["general/kernel"]
  np.testing.assert_allclose(got, x.T @ x, rtol=1e-5, atol=1e-5)
  assert "wrapper" not in nnx.Linear.__call__.__qualname__


def test_einsum_whose_kernel_index_reaches_the_output_is_named():
  class Batched(nnx.Module):
    def __init__(self, rngs):
      self.heads = nnx.Einsum("bhd,hdk->bhk", (2, 3, 4), rngs=rngs)

    def __call__(self, x):
      return self.heads(x)

  with pytest.raises(ValueError, match=r"heads/kernel: einsum 'bhd,hdk->bhk' maps kernel index 'h'"):
    oneshot.nnx_hessians(Batched(nnx.Rngs(0)), [jnp.ones((1, 2, 3))])(
        nnx.state(Batched(nnx.Rngs(0)), nnx.Param))


TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
            num_kv_heads=1, rope_theta=100.0)


def _tokens():
  rng = np.random.default_rng(3)
  return [jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32) for _ in range(2)]


def _rms_inputs(model, x):
  """The input of a block's q/k/v projections: RMSNorm(x) of the residual stream, in NumPy."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  w = np.asarray(model.input_layernorm.weight[...], np.float64)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w


@pytest.mark.slow
def test_prune_sequentially_calibrates_each_llama_block_on_the_pruned_blocks_before_it():
  model = llama.Llama(llama.LlamaConfig(**TINY), rngs=nnx.Rngs(0))
  batches = _tokens()
  params = nnx.state(model, nnx.Param)
  lines = []
  keep = lambda path, leaf: leaf.ndim == 2 and "layers" in path
  pruned, masks = oneshot.prune_sequentially(params, oneshot.nnx_hessians(model, batches),
                                             "sparsegpt", sparsity=0.5, leaf_filter=keep,
                                             block_size=4, log=lines.append)
  assert [line.split(" ")[3] for line in lines] == ["layers/0:", "layers/1:"]
  assert "7 kernel(s)" in lines[0]
  # Block 1's q_proj by hand: X = RMSNorm(output of the pruned block 0), H = X^T X.
  dense_q = nnx.state(model, nnx.Param)["layers"][1]["self_attn"]["q_proj"]["kernel"][...]
  half = nnx.clone(model)
  state = nnx.state(half, nnx.Param)
  state["layers"][0] = pruned["layers"][0]
  nnx.update(half, state)
  h = 0
  for batch in batches:
    x = _rms_inputs(half.layers[1], half.layers[0](half.embed(batch)))
    h = h + x.T @ x
  expected, _ = oneshot.prune_layer(dense_q, jnp.asarray(h, jnp.float32), "sparsegpt",
                                    sparsity=0.5, block_size=4)
  np.testing.assert_allclose(pruned["layers"][1]["self_attn"]["q_proj"]["kernel"][...], expected,
                             rtol=1e-4, atol=1e-5)
  kept = masks["layers"][1]["mlp"]["down_proj"]["kernel"][...]
  assert int(kept.sum()) == kept.size // 2


@pytest.mark.slow
def test_block_zero_of_the_linen_bridged_llama_is_calibrated_on_rms_of_the_embeddings():
  lm = models.create_model("llama", 11, num_layers=2, width=8, num_heads=2, num_kv_heads=1,
                           mlp_dim=12)
  batches = _tokens()
  params = jax.jit(lm.init)(jax.random.key(0), batches[0])["params"]
  model = lm.nnx_model(params)
  hessians = oneshot.nnx_hessians(model, batches, prefix="model", diagonal=True)(params)
  assert list(hessians)[:3] == ["model/layers/0/self_attn/q_proj/kernel",
                                "model/layers/0/self_attn/k_proj/kernel",
                                "model/layers/0/self_attn/v_proj/kernel"]
  expected = sum((x * x).sum(0) for x in (
      _rms_inputs(model.layers[0], model.embed(batch)) for batch in batches))
  np.testing.assert_allclose(hessians["model/layers/0/self_attn/k_proj/kernel"], expected,
                             rtol=1e-5)
  pruned, masks = oneshot.prune_sequentially(
      params, oneshot.nnx_hessians(model, batches, prefix="model", diagonal=True), "wanda",
      nm=(2, 4), leaf_filter=lambda path, leaf: leaf.ndim == 2 and "layers" in path)
  kernel = masks["model"]["layers"][1]["mlp"]["gate_proj"]["kernel"]
  assert (np.asarray(kernel).reshape(2, 4, -1).sum(1) == 2).all()


@pytest.mark.slow
def test_oneshot_binary_prunes_a_trained_llama_calibrated_by_nnx_hessians(tmp_path):
  from experiments import oneshot as oneshot_binary  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm_llama_stdlib  # pylint: disable=g-import-not-at-top
  from experiments.configs import oneshot_lm  # pylint: disable=g-import-not-at-top
  lm = lm_llama_stdlib.get_config()
  lm.data_dir = str(tmp_path / "tfds")
  lm.model.update(num_layers=2, width=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
  lm.num_train_steps, lm.warmup_steps, lm.batch_size, lm.log_every = 20, 5, 8, 10
  lm.checkpoint_every, lm.eval_batch_size = 0, 256
  train.run(lm, str(tmp_path / "lm"))
  config = oneshot_lm.get_config()
  config.train_workdir = str(tmp_path / "lm")
  config.methods, config.sparsities, config.patterns = ("wanda", "sparsegpt"), (), ((2, 4),)
  config.calibration_sequences = 8
  lines = []
  result = oneshot_binary.run(config, str(tmp_path / "oneshot"), log=lines.append)
  groups = [line.split()[3] for line in lines if "] group " in line]
  assert groups == ["model/layers/0:", "model/layers/1:"] * 2
  for row in result["rows"]:
    assert row["sparsity"] == 0.5 and row["max_nonzeros_per_group"] == 2
    assert row["test_loss"] < 10
