"""ResNet-20 for CIFAR (He et al., 2016, section 4.2).

A 3x3 stem, three stages of three basic blocks at widths w, 2w and 4w
(w = 16: about 0.27M parameters), stride 2 at the first block of the second
and third stages, global average pooling and a linear classifier. Shortcuts
are the paper's "option A": parameter-free identities that, where the shape
changes, subsample by 2 and zero-pad the new channels, so every prunable
weight sits in a 3x3 convolution or the head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# He et al. (2015) initialisation for ReLU networks, fan-out mode.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def option_a_shortcut(x: jax.Array, channels: int, stride: int) -> jax.Array:
  """The parameter-free shortcut of He et al. (2016), option A.

  Subsamples the spatial axes by `stride` (keeping positions 0, stride, ...,
  the pixels the strided 3x3 convolution is centred on) and zero-pads the
  channel axis evenly on both sides, the extra channel (if the difference is
  odd) at the end.

  Args:
    x: feature map of shape (batch, H, W, C).
    channels: output channels; at least C.
    stride: spatial subsampling factor.

  Returns:
    Feature map of shape (batch, ceil(H / stride), ceil(W / stride), channels).

  Raises:
    ValueError: if `channels` is smaller than C.
  """
  extra = channels - x.shape[-1]
  if extra < 0:
    raise ValueError(f"option A shortcut cannot shrink {x.shape[-1]} channels to {channels}")
  x = x[:, ::stride, ::stride, :]
  return jnp.pad(x, [(0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)])


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv3x3(channels: int, stride: int, name: str) -> nn.Conv:
  # Explicit padding 1 (not 'SAME', which pads a stride-2 conv on an even input
  # only at the end) centres output pixel i on input pixel stride * i, as in the
  # paper's code and as `option_a_shortcut` assumes.
  return nn.Conv(channels, (3, 3), strides=stride, padding=1, use_bias=False,
                 kernel_init=conv_init, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 conv + BatchNorm layers and an option A shortcut.

  Attributes:
    channels: output channels of the block (of `conv_1`).
    stride: stride of the first convolution (and of the shortcut).
    inner: output channels of `conv_0` (None: `channels`); a structured
      shrink makes them fewer.
  """

  channels: int
  stride: int = 1
  inner: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = _conv3x3(self.inner or self.channels, self.stride, "conv_0")(x)
    y = nn.relu(_batch_norm(train, "bn_0")(y))
    y = _conv3x3(self.channels, 1, "conv_1")(y)
    y = _batch_norm(train, "bn_1")(y)
    return nn.relu(y + option_a_shortcut(x, self.channels, self.stride))


class ResNet20(nn.Module):
  """ResNet-20 with option A shortcuts and BatchNorm.

  Submodules: `stem_conv`, `stem_bn`, `stage{i}_block{j}` (i, j in 0..2, each
  with `conv_0`, `bn_0`, `conv_1`, `bn_1`) and `head`. Convolutions have no
  bias. BatchNorm keeps its running statistics in the 'batch_stats'
  collection: apply with `train=True, mutable=['batch_stats']` to train and
  with `train=False` to evaluate on the running averages. There is no
  `axis_name`: under `jax.jit` with a sharded batch the statistics are already
  over the global batch.

  Attributes:
    num_classes: width of the output logits.
    width: channels of the first stage; the others have 2x and 4x as many.
    block_widths: output channels of each block's `conv_0`, nine of them in
      block order (None: the stage widths); a structured shrink sets them.
  """

  num_classes: int = 10
  width: int = 16
  block_widths: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (batch, H, W, C) to logits (batch, num_classes).

    Args:
      x: float images, NHWC; any size (32x32 for CIFAR).
      train: normalise with batch statistics and update the running ones
        (requires `mutable=['batch_stats']`), else use the running ones.

    Returns:
      Logits of shape (batch, num_classes).
    """
    x = _conv3x3(self.width, 1, "stem_conv")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    for i in range(3):
      for j in range(3):
        stride = 2 if i > 0 and j == 0 else 1
        inner = self.block_widths[3 * i + j] if self.block_widths else None
        x = BasicBlock(self.width * 2**i, stride, inner, name=f"stage{i}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
