"""The README's NNX + attention example runs as written."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
import tests


_block = tests.doc_code_block


def test_readme_nnx_attention_example_prunes_2_of_4_and_trains_with_the_wrapper():
  namespace = {
      "jax": jax, "optax": optax, "sparsejax": sparsejax,
      "schedule": sparsejax.PolynomialSchedule(0.0, 0.5, begin_step=0, end_step=4,
                                               update_frequency=2),
      "loss_fn": lambda out, y: jnp.mean((out - y) ** 2),
  }
  exec(_block("class Block(nnx.Module)"), namespace)  # pylint: disable=exec-used
  model = namespace["model"]
  query = np.asarray(model.attention.query.kernel[...])  # (in, heads, head_dim)
  rows = (query != 0).reshape(query.shape[0], -1).T      # per output unit: its 64 inputs
  assert np.all(rows.reshape(rows.shape[0], -1, 4).sum(-1) == 2)
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  for _ in range(5):
    namespace["nnx_step"](model, namespace["optimizer"], x, jnp.zeros_like(x))
  masks = sparsejax.find_pruning_state(namespace["optimizer"].opt_state).masks
  report = sparsejax.sparsity_report(nnx.state(model, nnx.Param), masks)
  assert report.leaves["mlp/kernel"].sparsity == 0.5
  assert report.leaves["mlp/kernel"].zero_fraction == 0.5
  assert report.leaves["attention/out/bias"].kept == 64  # not pruned


def test_readme_oneshot_example_prunes_2_of_4_and_updates_the_kept_weights():
  namespace = {}
  exec(_block('oneshot.prune_sequentially(params, hessians, "sparsegpt", nm=(2, 4))'), namespace)  # pylint: disable=exec-used
  params, pruned, masks = namespace["params"], namespace["pruned"], namespace["masks"]
  for path in ("block_0/mlp/kernel", "block_1/attention/query/kernel"):
    module, name = path.rsplit("/", 1)
    node, mask = pruned, masks
    for key in path.split("/"):
      node, mask = node[key], mask[key]
    kernel, mask = np.asarray(node), np.asarray(mask)
    groups = (kernel != 0).reshape(kernel.shape[0] // 4, 4, -1).sum(1)  # 4 inputs per group
    assert np.all(groups == 2), (module, name)
    assert np.array_equal(kernel != 0, mask)
  before = np.asarray(params["block_1"]["mlp"]["kernel"])
  after = np.asarray(pruned["block_1"]["mlp"]["kernel"])
  kept = np.asarray(masks["block_1"]["mlp"]["kernel"])
  assert not np.allclose(before[kept], after[kept])  # SparseGPT's update moved them
  assert masks["block_0"]["mlp"]["bias"] is None


def test_front_page_example_prunes_the_largest_weights_and_trains_to_exactly_205_kept(capsys):
  namespace = {}
  exec(_block("sparsejax.magnitude_masks(params, 0.9)            # one-shot"), namespace)  # pylint: disable=exec-used
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (64, 32)))
  expected = np.zeros(kernel.size, bool)
  expected[np.argsort(-np.abs(kernel), axis=None, kind="stable")[:205]] = True  # round(0.1 * 2048)
  np.testing.assert_array_equal(np.asarray(namespace["masks"]["dense"]["kernel"]).ravel(), expected)
  assert namespace["masks"]["dense"]["bias"] is None                  # not pruned
  assert "dense/kernel        2048         205    0.8999" in capsys.readouterr().out
  trained = namespace["params"]["dense"]
  assert int(np.count_nonzero(np.asarray(trained["kernel"]))) == 205
  assert int(np.count_nonzero(np.asarray(trained["bias"]))) == 32     # left dense, and trained


@pytest.mark.slow
def test_readme_nnx_llama_example_prunes_every_block_projection_2_of_4():
  namespace = {}
  exec(_block("oneshot.nnx_hessians(model, calibration)"), namespace)  # pylint: disable=exec-used
  model = namespace["model"]
  for layer in range(2):
    for name, module in (("q_proj", model.layers[layer].self_attn.q_proj),
                         ("down_proj", model.layers[layer].mlp.down_proj)):
      kernel = np.asarray(module.kernel[...])   # (in, out): groups of 4 inputs per output
      assert np.all((kernel != 0).reshape(-1, 4, kernel.shape[1]).sum(1) == 2), (layer, name)
  assert (np.asarray(model.embed_tokens.embedding[...]) != 0).all()


def test_readme_learned_mask_example_learns_2_of_4_masks_over_frozen_weights():
  namespace = {}
  exec(_block("sparsejax.MaskLLM(2, 4, num_steps=20)"), namespace)  # pylint: disable=exec-used
  masks, params, pruned = namespace["masks"], namespace["params"], namespace["pruned"]
  first = params["layers_0"]["kernel"]                                # (16, 64): groups of 4 inputs
  np.testing.assert_array_equal(first, namespace["model"].init(jax.random.key(1), namespace["x"])
                                ["params"]["layers_0"]["kernel"])     # weights frozen
  kept = np.asarray(masks["layers_0"]["kernel"]).reshape(4, 4, 64).sum(1)
  assert (kept == 2).all() and masks["layers_0"]["bias"] is None
  np.testing.assert_array_equal(pruned["layers_2"]["kernel"],
                                np.where(masks["layers_2"]["kernel"], params["layers_2"]["kernel"], 0))
