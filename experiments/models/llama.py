"""A Llama / Qwen2 / Qwen3-shaped decoder-only language model in Flax NNX.

The architecture these families share: token embedding, `num_layers` pre-norm
blocks of RMSNorm -> causal grouped-query attention with rotary position
embeddings (`num_kv_heads` <= `num_heads`, each key/value head shared by
`num_heads / num_kv_heads` query heads) -> residual, RMSNorm -> SwiGLU MLP
(down(silu(gate(x)) * up(x))) -> residual; a final RMSNorm and an output
head, tied to the embedding or not. Flavours differ only in small switches:

  llama  no biases (Hugging Face `attention_bias` may turn on q/k/v/o biases)
  qwen2  biases on q/k/v, none on o
  qwen3  no biases, RMSNorm of every query and key head (`q_norm`, `k_norm`)
         before the rotation

Modules and parameters carry the Hugging Face names (`layers/3/self_attn/
q_proj/kernel` is `model.layers.3.self_attn.q_proj.weight`, transposed to the
(in, out) layout of `nnx.Linear`), so import and export (`experiments.hf_io`)
is a table of names. The numerics follow `transformers`' Llama code: RMSNorm
and softmax in float32, rotate-half RoPE, attention scaled by head_dim^-1/2.

`LlamaLM` is the same model as a Linen module (`nnx.bridge.to_linen`) for the
experiment trainer, registered as model 'llama'.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                      num_heads=2, num_kv_heads=1)
>>> Llama(config, rngs=nnx.Rngs(0))(jnp.zeros((2, 5), jnp.int32)).shape
(2, 5, 16)
"""

from __future__ import annotations

import dataclasses

from flax import nnx
from flax.nnx import bridge
import flax.linen as nn
import jax
import jax.numpy as jnp

FLAVOURS = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The sizes and switches of a `Llama` (names as in Hugging Face configs, shortened).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads: sizes.
    num_kv_heads: key/value heads (grouped-query attention); must divide
      num_heads. 0 means num_heads.
    head_dim: width of one head; 0 means hidden_size // num_heads.
    flavour: 'llama', 'qwen2' or 'qwen3' (see the module docstring).
    attention_bias: biases on q/k/v/o (Llama's and Qwen3's `attention_bias`);
      qwen2 always has q/k/v biases.
    tie_embeddings: the output head is the transposed token embedding.
    rope_theta: base of the rotary frequencies.
    rms_eps: RMSNorm epsilon.
    layer_kv_heads: key/value heads of each layer (each with num_heads /
      num_kv_heads query heads), or () for num_kv_heads in every layer: a
      structured pruning that keeps a different count per layer (e.g.
      `sparsejax.structure.keep_global`) gives these. Hugging Face configs have one count.
    layer_intermediate_sizes: the MLP width of each layer, or () for
      intermediate_size in every layer.
  """
  vocab_size: int = 256
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  flavour: str = "llama"
  attention_bias: bool = False
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  layer_kv_heads: tuple[int, ...] = ()
  layer_intermediate_sizes: tuple[int, ...] = ()

  def __post_init__(self):
    if self.flavour not in FLAVOURS:
      raise ValueError(f"unknown flavour {self.flavour!r}; use one of {FLAVOURS}.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                       f"{self.num_heads}; give head_dim.")
    if self.dim % 2:
      raise ValueError(f"head_dim={self.dim} must be even (rotary embeddings rotate pairs).")
    for name in ("layer_kv_heads", "layer_intermediate_sizes"):
      widths = getattr(self, name)
      if widths and (len(widths) != self.num_layers or min(widths) < 1):
        raise ValueError(f"{name}={widths} must give a width of at least 1 for each of the "
                         f"{self.num_layers} layers, or be ().")

  @property
  def uniform(self) -> bool:
    """Every layer has the same widths, as a Hugging Face config says (`layer(0)`'s)."""
    return len(set(self.layer_kv_heads)) <= 1 and len(set(self.layer_intermediate_sizes)) <= 1

  def layer(self, i: int) -> "LlamaConfig":
    """The config of layer `i` alone: its own key/value heads (with their query
    heads) and MLP width in the scalar fields, the head width kept."""
    if not self.layer_kv_heads and not self.layer_intermediate_sizes:
      return self
    group = self.num_heads // self.kv_heads
    kv = self.layer_kv_heads[i] if self.layer_kv_heads else self.kv_heads
    f = self.layer_intermediate_sizes[i] if self.layer_intermediate_sizes else (
        self.intermediate_size)
    return dataclasses.replace(self, num_heads=kv * group, num_kv_heads=kv, head_dim=self.dim,
                               intermediate_size=f, layer_kv_heads=(),
                               layer_intermediate_sizes=())

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim(self) -> int:
    """The head width."""
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def qkv_bias(self) -> bool:
    return self.flavour == "qwen2" or self.attention_bias

  @property
  def o_bias(self) -> bool:
    return self.flavour != "qwen2" and self.attention_bias


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as `transformers` does)."""

  def __init__(self, features: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x.astype(dtype)


def rotary(length: int, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin (length, dim) of the rotary embedding: frequency theta^(-2i/dim), halves repeated.

  >>> cos, sin = rotary(3, 4, 10000.0)
  >>> [round(float(v), 4) for v in sin[1]]
  [0.8415, 0.01, 0.8415, 0.01]
  """
  inverse = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inverse[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (batch, length, heads, dim) rotated: x cos + rotate_half(x) sin, rotate_half(a, b) = (-b, a)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.config = config
    d, dim = config.hidden_size, config.dim
    init = nnx.initializers.normal(0.02)
    self.q_proj = nnx.Linear(d, config.num_heads * dim, use_bias=config.qkv_bias,
                             kernel_init=init, rngs=rngs)
    self.k_proj = nnx.Linear(d, config.kv_heads * dim, use_bias=config.qkv_bias,
                             kernel_init=init, rngs=rngs)
    self.v_proj = nnx.Linear(d, config.kv_heads * dim, use_bias=config.qkv_bias,
                             kernel_init=init, rngs=rngs)
    self.o_proj = nnx.Linear(config.num_heads * dim, d, use_bias=config.o_bias,
                             kernel_init=init, rngs=rngs)
    if config.flavour == "qwen3":
      self.q_norm = RMSNorm(dim, config.rms_eps)
      self.k_norm = RMSNorm(dim, config.rms_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, c.num_heads, c.dim)
    k = self.k_proj(x).reshape(batch, length, c.kv_heads, c.dim)
    v = self.v_proj(x).reshape(batch, length, c.kv_heads, c.dim)
    if c.flavour == "qwen3":
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = rotary(length, c.dim, c.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    group = c.num_heads // c.kv_heads     # query heads per key/value head
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * c.dim ** -0.5
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, c.num_heads * c.dim)
    return self.o_proj(out)


class MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nnx.Linear(d, f, use_bias=False, kernel_init=init, rngs=rngs)
    self.up_proj = nnx.Linear(d, f, use_bias=False, kernel_init=init, rngs=rngs)
    self.down_proj = nnx.Linear(f, d, use_bias=False, kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One decoder layer: x + attn(norm(x)), then + mlp(norm(x)). Maps (batch, length, hidden) to itself."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
    self.self_attn = Attention(config, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
    self.mlp = MLP(config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """tokens (batch, length) int -> next-token logits (batch, length, vocab_size), float32.

  `embed` and `head` split the model around its blocks (`layers`, an
  `nnx.List`) so that a caller can run it one block at a time
  (`experiments.hf_oneshot`).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([Block(config.layer(i), rngs) for i in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_eps)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens(tokens)

  def head(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    if self.config.tie_embeddings:
      return self.embed_tokens.attend(x).astype(jnp.float32)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.layers:
      x = block(x)
    return self.head(x)


class LlamaLM(nn.Module):
  """`Llama` as a Linen module for the experiment trainer (model 'llama').

  Parameters live under 'model' (`model/layers/0/self_attn/q_proj/kernel`),
  the `nnx.state(Llama(...), nnx.Param)` paths with that prefix.

  Attributes:
    num_classes: the vocabulary (256 for bytes).
    num_layers, width (hidden_size), num_heads, num_kv_heads, head_dim,
      mlp_dim (intermediate_size), flavour, tie_embeddings, rope_theta: see
      `LlamaConfig`.
    max_length: accepted for the trainer's language-model configs; RoPE has
      no length limit.
    block_kv_heads, block_mlp_dims: per-layer key/value heads and MLP widths
      (`LlamaConfig.layer_kv_heads`, `layer_intermediate_sizes`), set by a
      structured shrink; None: num_kv_heads and mlp_dim in every layer.
  """

  num_classes: int = 256
  num_layers: int = 4
  width: int = 128
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 384
  flavour: str = "llama"
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  max_length: int = 256
  block_kv_heads: tuple[int, ...] | None = None
  block_mlp_dims: tuple[int, ...] | None = None

  def llama_config(self) -> LlamaConfig:
    """The `LlamaConfig` of these fields."""
    return LlamaConfig(vocab_size=self.num_classes, hidden_size=self.width,
                       intermediate_size=self.mlp_dim, num_layers=self.num_layers,
                       num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       head_dim=self.head_dim, flavour=self.flavour,
                       tie_embeddings=self.tie_embeddings, rope_theta=self.rope_theta,
                       layer_kv_heads=tuple(self.block_kv_heads or ()),
                       layer_intermediate_sizes=tuple(self.block_mlp_dims or ()))

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train   # no dropout
    return bridge.to_linen(Llama, self.llama_config(), name="model")(tokens)

  def nnx_model(self, params) -> Llama:
    """The `Llama` holding `params` (this module's 'params' collection) as its weights."""
    model = nnx.eval_shape(lambda: Llama(self.llama_config(), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x, dict(params["model"])))
    nnx.update(model, state)
    return model
