"""LeNet-5 (LeCun et al., 1998) with ReLU and average pooling.

Two 5x5 'VALID' convolutions (6 and 16 channels), each followed by ReLU and
2x2 average pooling, then Dense 120, Dense 84 and a linear classifier. The
architecture is defined on 32x32 inputs (61,706 parameters for one input
channel), where the second pooling leaves a 5x5x16 map.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# The input side the architecture is defined on; smaller inputs are padded up.
INPUT_SIZE = 32


def pad_to_input_size(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Zero-pads the spatial axes of NHWC images up to at least `size`.

  This is how the original LeNet-5 read 28x28 MNIST digits (centred in a
  32x32 field), so the flattened feature map is 16*5*5 for both sizes and the
  parameter count does not depend on the dataset. Axes already at least
  `size` long are left alone; an odd amount of padding puts the extra row or
  column at the end.

  Args:
    x: images of shape (batch, H, W, C).
    size: the smallest spatial side to pad to.

  Returns:
    Images of shape (batch, max(H, size), max(W, size), C).
  """
  pads = [(0, 0)]
  for side in x.shape[1:3]:
    extra = max(size - side, 0)
    pads.append((extra // 2, extra - extra // 2))
  pads.append((0, 0))
  return jnp.pad(x, pads)


class LeNet5(nn.Module):
  """LeNet-5 for small grey-scale or colour images.

  Inputs smaller than 32x32 are zero-padded (centred) to 32x32 first; larger
  inputs are used as they are, and then `fc_0` takes the larger flattened map.
  Layers are named `conv_0`, `conv_1`, `fc_0`, `fc_1` and `head`.

  Attributes:
    num_classes: width of the output logits.
    conv_features: output channels of `conv_0` and `conv_1` (a structured
      shrink makes them smaller).
    fc_features: widths of `fc_0` and `fc_1`.
  """

  num_classes: int = 10
  conv_features: tuple[int, int] = (6, 16)
  fc_features: tuple[int, int] = (120, 84)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (batch, H, W, C) to logits (batch, num_classes).

    Args:
      x: float images, NHWC.
      train: unused (no dropout or batch statistics); kept so all models
        share one signature.

    Returns:
      Logits of shape (batch, num_classes).
    """
    del train
    x = pad_to_input_size(x)
    for i, channels in enumerate(self.conv_features):
      x = nn.Conv(channels, (5, 5), padding="VALID", name=f"conv_{i}")(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.fc_features[0], name="fc_0")(x))
    x = nn.relu(nn.Dense(self.fc_features[1], name="fc_1")(x))
    return nn.Dense(self.num_classes, name="head")(x)
