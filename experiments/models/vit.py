"""A small Vision Transformer (Dosovitskiy et al., 2021) for 32x32 images.

Non-overlapping patches are embedded by a strided convolution, a learned
position embedding is added, and pre-LayerNorm transformer blocks follow; the
tokens are mean-pooled (no class token) into a linear classifier.

Attention is written out with four separate 2-D `nn.Dense` projections
(`query`, `key`, `value`, `out`, each hidden_dim x hidden_dim), which keeps
the checkpoints of earlier runs readable. `nn.MultiHeadDotProductAttention`'s
3-D kernels work as well: N:M masks follow their contraction axes
(`sparsejax.layouts`, tested in tests/test_nm_layouts.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_heads(hidden_dim: int, num_heads: int):
  if num_heads < 1 or hidden_dim % num_heads:
    raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")


class MultiHeadSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention over all tokens.

  Head h uses features [h * d, (h + 1) * d) of the query, key and value
  projections, d = hidden_dim // num_heads. The softmax is taken in float32.

  Attributes:
    num_heads: number of attention heads; must divide the input width
      unless `head_dim` is given.
    head_dim: width of a head (None: input width // num_heads); a structured
      shrink keeps it and lowers `num_heads`.
  """

  num_heads: int
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends over the tokens of x (batch, tokens, hidden_dim); same shape out."""
    batch, tokens, hidden_dim = x.shape
    if self.head_dim is None:
      _check_heads(hidden_dim, self.num_heads)
    head_dim = self.head_dim or hidden_dim // self.num_heads
    inner = self.num_heads * head_dim

    def heads(name):
      y = nn.Dense(inner, name=name)(x)
      return y.reshape((batch, tokens, self.num_heads, head_dim))

    query, key, value = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape((batch, tokens, inner))
    return nn.Dense(hidden_dim, name="out")(y)


class MlpBlock(nn.Module):
  """The transformer feed-forward layer: `fc_0`, GELU, `fc_1`.

  Attributes:
    mlp_dim: width of the hidden layer.
  """

  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.gelu(nn.Dense(self.mlp_dim, name="fc_0")(x))
    return nn.Dense(x.shape[-1], name="fc_1")(y)


class EncoderBlock(nn.Module):
  """A pre-LayerNorm transformer block with residual connections.

  x + dropout(attention(norm_0(x))), then the same with `norm_1` and `mlp`.

  Attributes:
    num_heads: attention heads.
    mlp_dim: width of the feed-forward hidden layer.
    dropout_rate: dropout on the attention and MLP outputs while training.
    head_dim: width of a head (None: token width // num_heads).
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = MultiHeadSelfAttention(self.num_heads, self.head_dim, name="attention")(nn.LayerNorm(name="norm_0")(x))
    x = x + dropout(y)
    y = MlpBlock(self.mlp_dim, name="mlp")(nn.LayerNorm(name="norm_1")(x))
    return x + dropout(y)


class ViT(nn.Module):
  """A small Vision Transformer with mean-pooled tokens.

  Submodules: `patch_embed` (conv, kernel = stride = patch_size), the param
  `pos_embedding` of shape (1, num_patches, hidden_dim), `block_{i}` (each
  with `norm_0`, `attention/{query,key,value,out}`, `norm_1`,
  `mlp/{fc_0,fc_1}`), `norm_final` and `head`. With `dropout_rate > 0`,
  applying with `train=True` needs a 'dropout' rng.

  Attributes:
    num_classes: width of the output logits.
    patch_size: side of the square patches; must divide H and W.
    hidden_dim: token width; must be divisible by num_heads.
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    mlp_dim: width of the feed-forward hidden layers.
    dropout_rate: dropout after attention and the MLP while training.
    block_heads: heads of each block (None: num_heads in every block); a
      structured shrink sets them, each head keeping hidden_dim // num_heads
      features.
    block_mlp_dims: feed-forward width of each block (None: mlp_dim).
  """

  num_classes: int = 10
  patch_size: int = 4
  hidden_dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  block_heads: tuple[int, ...] | None = None
  block_mlp_dims: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (batch, H, W, C) to logits (batch, num_classes).

    Args:
      x: float images, NHWC, with H and W multiples of `patch_size`.
      train: enable dropout (when `dropout_rate > 0`).

    Returns:
      Logits of shape (batch, num_classes).

    Raises:
      ValueError: if x is not 4-D, H or W is not a multiple of `patch_size`,
        or `hidden_dim` is not a multiple of `num_heads`.
    """
    if x.ndim != 4:
      raise ValueError(f"ViT expects NHWC images, got shape {x.shape}")
    height, width = x.shape[1:3]
    if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
      raise ValueError(f"image size {height}x{width} is not divisible by "
                       f"patch_size={self.patch_size}")
    _check_heads(self.hidden_dim, self.num_heads)

    p = self.patch_size
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
    x = x.reshape((x.shape[0], -1, self.hidden_dim))
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.hidden_dim))
    x = x + pos.astype(x.dtype)
    head_dim = self.hidden_dim // self.num_heads
    for i in range(self.depth):
      heads = self.block_heads[i] if self.block_heads else self.num_heads
      mlp_dim = self.block_mlp_dims[i] if self.block_mlp_dims else self.mlp_dim
      x = EncoderBlock(heads, mlp_dim, self.dropout_rate, head_dim, name=f"block_{i}")(x, train)
    x = jnp.mean(nn.LayerNorm(name="norm_final")(x), axis=1)
    return nn.Dense(self.num_classes, name="head")(x)
