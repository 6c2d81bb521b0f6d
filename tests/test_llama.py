"""The Llama/Qwen-shaped NNX model against a NumPy transcription of the published architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models
from experiments.models import llama


def _rms(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta):
  """x (length, heads, dim), rotating the pairs (i, i + dim/2) by position * theta^(-2i/dim)."""
  length, _, dim = x.shape
  out = np.empty_like(x)
  for p in range(length):
    for i in range(dim // 2):
      angle = p * theta ** (-2.0 * i / dim)
      a, b = x[p, :, i], x[p, :, i + dim // 2]
      out[p, :, i] = a * np.cos(angle) - b * np.sin(angle)
      out[p, :, i + dim // 2] = b * np.cos(angle) + a * np.sin(angle)
  return out


def reference_logits(params: dict, c: llama.LlamaConfig, tokens: np.ndarray) -> np.ndarray:
  """One sequence, in float64, head by head, from the nested pure dict of the NNX state."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x = p["embed_tokens"]["embedding"][tokens]
  length = len(tokens)
  for layer in range(c.num_layers):
    b = p["layers"][layer]
    a = b["self_attn"]
    h = _rms(x, b["input_layernorm"]["weight"], c.rms_eps)
    proj = {n: h @ a[n]["kernel"] + a[n].get("bias", 0.0) for n in ("q_proj", "k_proj", "v_proj")}
    # This layer's head counts, from its kernels (layers may differ: LlamaConfig.layer_kv_heads)
    num_heads = a["q_proj"]["kernel"].shape[1] // c.dim
    kv_heads = a["k_proj"]["kernel"].shape[1] // c.dim
    q = proj["q_proj"].reshape(length, num_heads, c.dim)
    k = proj["k_proj"].reshape(length, kv_heads, c.dim)
    v = proj["v_proj"].reshape(length, kv_heads, c.dim)
    if c.flavour == "qwen3":
      q, k = _rms(q, a["q_norm"]["weight"], c.rms_eps), _rms(k, a["k_norm"]["weight"], c.rms_eps)
    q, k = _rope(q, c.rope_theta), _rope(k, c.rope_theta)
    heads = []
    for head in range(num_heads):
      kv = head // (num_heads // kv_heads)   # the key/value head this query head shares
      s = q[:, head] @ k[:, kv].T / np.sqrt(c.dim)
      s = np.where(np.tril(np.ones((length, length))) > 0, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
    x = x + np.concatenate(heads, -1) @ a["o_proj"]["kernel"] + a["o_proj"].get("bias", 0.0)
    m = b["mlp"]
    h = _rms(x, b["post_attention_layernorm"]["weight"], c.rms_eps)
    g = h @ m["gate_proj"]["kernel"]
    x = x + (g / (1 + np.exp(-g)) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  x = _rms(x, p["norm"]["weight"], c.rms_eps)
  head = p["embed_tokens"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head


def _randomised(model):
  """Every parameter drawn at random (norm weights and biases too, so that they are tested)."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree.unflatten(tree, [
      jnp.asarray(0.5 * rng.standard_normal(v.shape) + (1.0 if v.ndim == 1 else 0.0), jnp.float32)
      for v in leaves]))
  return model


@nnx.jit
def forward(model, tokens):
  return model(tokens)


TINY = dict(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
            num_kv_heads=1, rope_theta=100.0)


@pytest.mark.parametrize("flavour,tied", [
    ("llama", False),
    pytest.param("qwen2", True, marks=pytest.mark.slow),
    pytest.param("qwen3", False, marks=pytest.mark.slow)])
def test_logits_equal_a_numpy_transcription_of_the_architecture(flavour, tied):
  config = llama.LlamaConfig(**TINY, flavour=flavour, tie_embeddings=tied)
  model = _randomised(llama.Llama(config, rngs=nnx.Rngs(0)))
  tokens = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
  logits = np.asarray(forward(model, jnp.asarray(tokens)))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert ("lm_head" in pure) == (not tied)
  assert ("bias" in pure["layers"][0]["self_attn"]["q_proj"]) == (flavour == "qwen2")
  for row, sequence in enumerate(tokens):
    np.testing.assert_allclose(logits[row], reference_logits(pure, config, sequence),
                               rtol=1e-4, atol=1e-4)


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_heads():
  """num_kv_heads=1 with 2 query heads == num_kv_heads=2 whose k/v heads are copies."""
  gqa = _randomised(llama.Llama(llama.LlamaConfig(**TINY), rngs=nnx.Rngs(0)))
  full = llama.Llama(llama.LlamaConfig(**{**TINY, "num_kv_heads": 2}), rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
  for layer in state["layers"].values():
    for name in ("k_proj", "v_proj"):
      layer["self_attn"][name]["kernel"] = jnp.tile(layer["self_attn"][name]["kernel"], (1, 2))
  target = nnx.state(full, nnx.Param)
  nnx.replace_by_pure_dict(target, state)
  nnx.update(full, target)
  tokens = jnp.array([[1, 2, 3, 4]])
  np.testing.assert_allclose(forward(gqa, tokens), forward(full, tokens), rtol=1e-5, atol=1e-5)


def test_linen_model_llama_holds_the_nnx_model_under_model():
  lm = models.create_model("llama", 11, num_layers=1, width=8, num_heads=2, num_kv_heads=1,
                           mlp_dim=12)
  tokens = jnp.array([[1, 2, 3]])
  params = jax.jit(lm.init)(jax.random.key(0), tokens)["params"]
  assert set(params) == {"model"}
  assert params["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"].shape == (8, 4)
  np.testing.assert_allclose(jax.jit(lm.apply)({"params": params}, tokens),
                             forward(lm.nnx_model(params), tokens), rtol=1e-6)


def test_layers_of_their_own_widths_equal_the_numpy_transcription():
  config = llama.LlamaConfig(**{**TINY, "num_heads": 4, "num_kv_heads": 2, "head_dim": 2},
                             layer_kv_heads=(1, 2), layer_intermediate_sizes=(5, 12))
  model = _randomised(llama.Llama(config, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  shapes = [(pure["layers"][i]["self_attn"]["q_proj"]["kernel"].shape,
             pure["layers"][i]["self_attn"]["k_proj"]["kernel"].shape,
             pure["layers"][i]["mlp"]["down_proj"]["kernel"].shape) for i in range(2)]
  # layer 0: 1 key/value head with its 2 query heads of width 2, MLP 5; layer 1: 2 and 4, MLP 12
  assert shapes == [((8, 4), (8, 2), (5, 8)), ((8, 8), (8, 4), (12, 8))]
  assert not config.uniform and llama.LlamaConfig(**TINY, layer_kv_heads=(1, 1)).uniform
  tokens = np.array([[3, 1, 4, 1, 5]])
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(tokens)))[0],
                             reference_logits(pure, config, tokens[0]), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"layer_kv_heads=\(1,\) must give a width of at least 1 "
                                       r"for each of the 2 layers"):
    llama.LlamaConfig(**TINY, layer_kv_heads=(1,))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
    llama.LlamaConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="unknown flavour 'gemma'"):
    llama.LlamaConfig(flavour="gemma")
