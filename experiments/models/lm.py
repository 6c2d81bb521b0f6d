"""A small decoder-only transformer language model over bytes, with Flax's attention module.

Tokens (batch, length) int in [0, num_classes) (the vocabulary) are embedded, a learned
position embedding is added, and `num_layers` pre-LayerNorm blocks follow
(`block_<i>`: causal `nn.MultiHeadDotProductAttention` named `attention`,
with 3-D query/key/value/out kernels, and the MLP `fc_0`, `fc_1`);
a final LayerNorm and the `head` Dense give next-token logits (batch,
length, num_classes). The block names are what one-shot pruning groups by
(`sparsejax.oneshot.block_group`).

>>> import jax, jax.numpy as jnp
>>> model = TransformerLM(num_layers=1, width=16, num_heads=2, mlp_dim=32, max_length=8)
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
>>> model.apply({'params': params}, jnp.zeros((2, 8), jnp.int32)).shape
(2, 8, 256)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
  """Pre-LayerNorm causal self-attention and GELU MLP, each with a residual."""

  num_heads: int
  mlp_dim: int
  head_dim: int | None = None   # None: width // num_heads

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = nn.LayerNorm(name="ln_0")(x)
    qkv = self.num_heads * self.head_dim if self.head_dim else None
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=qkv,
                                            out_features=width, name="attention")(
        y, y, mask=mask)
    y = nn.LayerNorm(name="ln_1")(x)
    y = nn.Dense(self.mlp_dim, name="fc_0")(y)
    return x + nn.Dense(width, name="fc_1")(nn.gelu(y))


class TransformerLM(nn.Module):
  """Decoder-only transformer: tokens (batch, length) -> logits (batch, length, num_classes).

  Attributes:
    num_classes: the vocabulary, number of token values (256 for bytes); so
      named because the next token is the class every position predicts.
    num_layers, width, num_heads, mlp_dim: the blocks.
    max_length: the longest sequence (size of the position embedding).
    block_heads: heads of each block (None: num_heads everywhere); a
      structured shrink sets them, each head keeping width // num_heads
      features.
    block_mlp_dims: MLP width of each block (None: mlp_dim).
  """

  num_classes: int = 256
  num_layers: int = 4
  width: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  max_length: int = 256
  block_heads: tuple[int, ...] | None = None
  block_mlp_dims: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout: the runs are short and the data is large
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
    length = tokens.shape[-1]
    if length > self.max_length:
      raise ValueError(f"sequence of {length} tokens, longer than max_length={self.max_length}")
    x = nn.Embed(self.num_classes, self.width, name="embed")(tokens)
    position = self.param("position", nn.initializers.normal(0.02), (self.max_length, self.width))
    x = x + position[:length]
    mask = nn.make_causal_mask(tokens)
    head_dim = self.width // self.num_heads
    for i in range(self.num_layers):
      heads = self.block_heads[i] if self.block_heads else self.num_heads
      mlp_dim = self.block_mlp_dims[i] if self.block_mlp_dims else self.mlp_dim
      x = Block(heads, mlp_dim, head_dim, name=f"block_{i}")(x, mask)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="ln_final")(x))
