"""LeNet-300-100: the fully connected baseline of the pruning literature.

LeCun et al. (1998) and, for pruning, Han et al. (2015): a flattened image,
two ReLU hidden layers of 300 and 100 units, and a linear classifier. On
28x28x1 MNIST it has 266,610 parameters.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """A ReLU multilayer perceptron on flattened images.

  Layers are named `hidden_0`, `hidden_1`, ... and `head` so that pruning
  configs can select them by path.

  Attributes:
    features: widths of the hidden layers; the default is LeNet-300-100.
    num_classes: width of the output logits.
  """

  features: Sequence[int] = (300, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images (batch, H, W, C) to logits (batch, num_classes).

    Args:
      x: float images; every axis after the first is flattened.
      train: unused (the MLP has no dropout or batch statistics); kept so all
        models share one signature.

    Returns:
      Logits of shape (batch, num_classes).
    """
    del train
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)
