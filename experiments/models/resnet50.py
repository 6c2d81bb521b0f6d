"""ResNet-50 for ImageNet (He et al., 2016), version 1.5.

A 7x7/2 stem convolution with BatchNorm and ReLU, a 3x3/2 max pool, four
stages of 3, 4, 6 and 3 bottleneck blocks at widths w, 2w, 4w and 8w
(w = 64), global average pooling and a linear classifier: 25,557,032
parameters at w = 64 with 1000 classes, as torchvision's `resnet50`.

A bottleneck block is 1x1 (w) -> 3x3 (w) -> 1x1 (4w), each followed by
BatchNorm. "v1.5" (as torchvision and the Flax ImageNet example): the stride 2
of the first block of stages 2 to 4 sits on the 3x3 convolution, not on the
first 1x1 as in the paper. Where the shape changes (the first block of each
stage) the shortcut is a projection, a strided 1x1 convolution and BatchNorm;
elsewhere it is the identity.

The scale of each block's last BatchNorm (`bn3`) starts at zero (Goyal et al.,
2017, "Accurate, Large Minibatch SGD", section 5.1), so every block starts as
its shortcut; torchvision's `zero_init_residual=True`. The projection's
BatchNorm starts at one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.resnet import conv_init

EXPANSION = 4  # output channels of a bottleneck block per channel of its 3x3 conv
STAGE_SIZES = (3, 4, 6, 3)


def _batch_norm(train: bool, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  # PyTorch's defaults (momentum 0.1 there is 0.9 here), as in resnet.py.
  scale_init = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=scale_init, name=name)


def _conv(channels: int, size: int, stride: int, name: str) -> nn.Conv:
  # Explicit padding size // 2 (not 'SAME', which pads a stride-2 conv on an
  # even input only at the end): output pixel i is centred on input pixel
  # stride * i for every kernel size, the pixel the strided 1x1 shortcut takes.
  return nn.Conv(channels, (size, size), strides=stride, padding=size // 2, use_bias=False,
                 kernel_init=conv_init, name=name)


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided) and 1x1 conv + BatchNorm, and an identity or projection shortcut.

  Attributes:
    width: channels of the 1x1 and 3x3 convolutions; the block outputs
      `EXPANSION * width`.
    stride: stride of the 3x3 convolution and of the projection.
  """

  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = EXPANSION * self.width
    y = _conv(self.width, 1, 1, "conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv(self.width, 3, self.stride, "conv2")(y)
    y = nn.relu(_batch_norm(train, "bn2")(y))
    y = _conv(channels, 1, 1, "conv3")(y)
    y = _batch_norm(train, "bn3", zero_scale=True)(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != channels:
      shortcut = _conv(channels, 1, self.stride, "shortcut_conv")(x)
      shortcut = _batch_norm(train, "shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet50(nn.Module):
  """ResNet-50 v1.5 with BatchNorm and zero-initialised last BatchNorm per block.

  Submodules: `stem_conv`, `stem_bn`, `stage{i}_block{j}` (i in 0..3, j below
  3, 4, 6, 3; each with `conv1`, `bn1`, `conv2`, `bn2`, `conv3`, `bn3`, and
  in block 0 of each stage `shortcut_conv`, `shortcut_bn`) and `head`. Every
  convolution's name contains 'conv' (the N:M layouts treat such leaves as
  convolutions) and has no bias. BatchNorm keeps its running statistics in the
  'batch_stats' collection, as in `ResNet20`: apply with `train=True,
  mutable=['batch_stats']` to train, `train=False` to evaluate.

  Attributes:
    num_classes: width of the output logits.
    width: channels of the stem and of the first stage's 3x3 convolutions;
      the later stages have 2x, 4x and 8x as many, and every block outputs
      `EXPANSION` times its width.
  """

  num_classes: int = 1000
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (batch, H, W, C) to logits (batch, num_classes).

    Args:
      x: float images, NHWC; any size (224x224 for ImageNet, 32x overall
        downsampling).
      train: normalise with batch statistics and update the running ones
        (requires `mutable=['batch_stats']`), else use the running ones.

    Returns:
      Logits of shape (batch, num_classes).
    """
    x = _conv(self.width, 7, 2, "stem_conv")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    # Padding with -inf (max_pool's own), so a border pixel is a max over the image only.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(STAGE_SIZES):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(self.width * 2**i, stride, name=f"stage{i}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
