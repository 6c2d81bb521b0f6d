"""Flax Linen models for the experiment binaries, built by name.

Every image model maps float32 NHWC images (batch, H, W, C) to logits
(batch, num_classes) with `model.apply(variables, x, train=...)`; the
language models 'lm' and 'llama' (an NNX model
bridged to Linen) map int tokens (batch, length) to next-token logits
(batch, length, num_classes). Every model names
its submodules explicitly so that pruning configs can select leaves by path.

>>> model = create_model("mlp", num_classes=10, features=(32,))
>>> type(model).__name__, model.features
('MLP', (32,))
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from experiments.models.lenet5 import LeNet5
from experiments.models.llama import LlamaLM
from experiments.models.lm import TransformerLM
from experiments.models.mlp import MLP
from experiments.models.resnet import ResNet20
from experiments.models.resnet50 import ResNet50
from experiments.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": ResNet20,
    "resnet50": ResNet50,
    "vit": ViT,
    "lm": TransformerLM,
    "llama": LlamaLM,
}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model registered as `name`.

  Args:
    name: a key of `MODELS`.
    num_classes: width of the output logits.
    **kwargs: other fields of that model (e.g. `patch_size` for 'vit').

  Returns:
    An unbound Linen module.

  Raises:
    ValueError: if `name` is unknown, a keyword is not a field of that model,
      or `num_classes` is not positive.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  cls = MODELS[name]
  # `parent` and `name` are Linen plumbing, not architecture.
  known = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"unknown argument(s) for model {name!r}: {', '.join(unknown)}; "
                     f"its fields are: {', '.join(sorted(known))}")
  return cls(num_classes=num_classes, **kwargs)


__all__ = [
    "LeNet5",
    "LlamaLM",
    "MLP",
    "MODELS",
    "ResNet20",
    "ResNet50",
    "TransformerLM",
    "ViT",
    "create_model",
]
