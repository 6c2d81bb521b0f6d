"""Structured-pruning specs of the bundled models: which slices form a unit.

`spec(model)` gives the `sparsejax.structure.Rule` table of a model (its
groups depend on its sizes only through head_dim); `groups(model, params)`
builds and checks them; `expand(model)` writes every per-layer width out so
that `sparsejax.shrink` can set them; `shrink_model` does both and returns
the smaller variables and model.

  mlp       hidden_i units: hidden_i kernel column and bias, the next
            layer's kernel row
  lenet5    conv_0 channels (kernel, bias, conv_1 input channels); conv_1
            channels (kernel, bias, and fc_0 rows of that channel at every
            position of the flattened 5x5 map); fc_0 and fc_1 units
  resnet20  the inner channels of each basic block: conv_0 output, bn_0's
            scale, bias and running statistics, conv_1 input. The channels
            a block adds to its shortcut are coupled by the residual stream
            across a whole stage (and to the head): left out.
  vit       heads (query/key/value columns and biases of the head, out rows)
            and MLP units (fc_0 column and bias, fc_1 row)
  lm        heads of Flax's attention (query/key/value (d, heads, head_dim)
            kernels and (heads, head_dim) biases, out (heads, head_dim, d)
            rows) and MLP units
  llama     key/value groups of grouped-query attention (a KV head's k_proj
            and v_proj columns with the q_proj columns and o_proj rows of
            its num_heads / num_kv_heads query heads) and SwiGLU units
            (up_proj and gate_proj columns, down_proj row). A shrink writes
            each layer's key/value heads and MLP width (`block_kv_heads`,
            `block_mlp_dims`), so a keep with a different count per layer
            shrinks too (such a model has no Hugging Face config). Today
            only a keep made by hand (e.g. `sparsejax.structure.keep_global` over
            magnitude scores) gives one on llama: FLAP and Wanda-sp need input
            statistics, captured from Linen layers only (llama is NNX),
            and FLAP's compensation needs a bias, which down_proj lacks.

Groups of kind 'head' are the attention heads, 'channel' everything else.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

import sparsejax
from sparsejax.structure import Member
from sparsejax.structure import Rule

PyTree = Any


def _dense_chain(names: list[str], field: str) -> list[Rule]:
  """Units of each Dense in `names` but the last, coupled to the next one's rows."""
  return [Rule(f"{a}/kernel", a, "channel",
               (Member(f"{a}/kernel", 1), Member(f"{a}/bias", 0, optional=True),
                Member(f"{b}/kernel", 0)),
               consumer=f"{b}/kernel", bias=f"{b}/bias", field=field, index=str(i))
          for i, (a, b) in enumerate(zip(names, names[1:]))]


def _mlp_rule(block: str, up: str, down: str, field: str) -> Rule:
  return Rule(rf"(?P<b>{block}_(?P<i>\d+))/{up}/kernel", "{b}/mlp", "channel",
              (Member(f"{{b}}/{up}/kernel", 1), Member(f"{{b}}/{up}/bias", 0, optional=True),
               Member(f"{{b}}/{down}/kernel", 0)),
              consumer=f"{{b}}/{down}/kernel", bias=f"{{b}}/{down}/bias", field=field,
              index="{i}")


def spec(model: nn.Module) -> tuple[Rule, ...]:
  """The structure spec of a bundled model.

  Raises:
    ValueError: for a model without a spec (ResNet-50).
  """
  name = type(model).__name__
  if name == "MLP":
    return tuple(_dense_chain([f"hidden_{i}" for i in range(len(model.features))] + ["head"],
                              "features"))
  if name == "LeNet5":
    conv = Rule("conv_0/kernel", "conv_0", "channel",
                (Member("conv_0/kernel", -1), Member("conv_0/bias", 0),
                 Member("conv_1/kernel", 2)), field="conv_features", index="0")
    flat = Rule("conv_1/kernel", "conv_1", "channel",
                (Member("conv_1/kernel", -1), Member("conv_1/bias", 0), Member("fc_0/kernel", 0)),
                consumer="fc_0/kernel", bias="fc_0/bias", field="conv_features", index="1")
    fcs = [Rule(r.anchor, r.name, r.kind, r.members, r.consumer, r.bias, "fc_features", r.index)
           for r in _dense_chain(["fc_0", "fc_1", "head"], "fc_features")]
    return (conv, flat, *fcs)
  if name == "ResNet20":
    return (Rule(r"(?P<b>stage(?P<s>\d)_block(?P<j>\d))/conv_0/kernel", "{b}", "channel",
                 (Member("{b}/conv_0/kernel", -1), Member("{b}/bn_0", 0),
                  Member("{b}/conv_1/kernel", 2)), field="block_widths",
                 index=lambda m: 3 * int(m["s"]) + int(m["j"])),)
  if name == "ViT":
    hd = model.hidden_dim // model.num_heads
    attention = Rule(
        r"(?P<b>block_(?P<i>\d+))/attention/query/kernel", "{b}/attention", "head",
        tuple(Member(f"{{b}}/attention/{p}/{leaf}", 1 if leaf == "kernel" else 0, hd)
              for p in ("query", "key", "value") for leaf in ("kernel", "bias"))
        + (Member("{b}/attention/out/kernel", 0, hd),),
        consumer="{b}/attention/out/kernel", bias="{b}/attention/out/bias",
        field="block_heads", index="{i}")
    return (attention, _mlp_rule("block", "mlp/fc_0", "mlp/fc_1", "block_mlp_dims"))
  if name == "LlamaLM":
    c = model.llama_config()
    per_kv = c.num_heads // c.kv_heads     # query heads per key/value head
    layer = r"(?P<b>model/layers/(?P<i>\d+))"
    attention = Rule(
        layer + "/self_attn/q_proj/kernel", "{b}/self_attn", "head",
        (Member("{b}/self_attn/q_proj/kernel", 1, c.dim * per_kv),
         Member("{b}/self_attn/q_proj/bias", 0, c.dim * per_kv, optional=True),
         Member("{b}/self_attn/k_proj/kernel", 1, c.dim),
         Member("{b}/self_attn/k_proj/bias", 0, c.dim, optional=True),
         Member("{b}/self_attn/v_proj/kernel", 1, c.dim),
         Member("{b}/self_attn/v_proj/bias", 0, c.dim, optional=True),
         Member("{b}/self_attn/o_proj/kernel", 0, c.dim * per_kv)),
        consumer="{b}/self_attn/o_proj/kernel",
        bias="{b}/self_attn/o_proj/bias" if c.o_bias else None,
        field="block_kv_heads", index="{i}")
    mlp = Rule(layer + "/mlp/up_proj/kernel", "{b}/mlp", "channel",
               (Member("{b}/mlp/up_proj/kernel", 1), Member("{b}/mlp/gate_proj/kernel", 1),
                Member("{b}/mlp/down_proj/kernel", 0)),
               consumer="{b}/mlp/down_proj/kernel", field="block_mlp_dims", index="{i}")
    return (attention, mlp)
  if name == "TransformerLM":
    attention = Rule(
        r"(?P<b>block_(?P<i>\d+))/attention/query/kernel", "{b}/attention", "head",
        tuple(Member(f"{{b}}/attention/{p}/{leaf}", 1 if leaf == "kernel" else 0)
              for p in ("query", "key", "value") for leaf in ("kernel", "bias"))
        + (Member("{b}/attention/out/kernel", 0),),
        consumer="{b}/attention/out/kernel", bias="{b}/attention/out/bias",
        field="block_heads", index="{i}")
    return (attention, _mlp_rule("block", "fc_0", "fc_1", "block_mlp_dims"))
  raise ValueError(f"no structure spec for model {name}; specs: MLP, LeNet5, ResNet20, ViT, "
                   "TransformerLM, LlamaLM.")


def groups(model: nn.Module, params: PyTree, kind: str | None = None):
  """The checked groups of `model`'s params, optionally only those of one kind."""
  found = sparsejax.build_groups(params, spec(model))
  if kind is not None:
    if kind not in sparsejax.structure.groups.KINDS:
      raise ValueError(f"unknown structure kind {kind!r}; use 'channel' or 'head'.")
    found = tuple(g for g in found if g.kind == kind)
    if not found:
      raise ValueError(f"model {type(model).__name__} has no {kind!r} groups.")
  return found


def expand(model: nn.Module) -> nn.Module:
  """`model` with every per-layer width written out (the fields `shrink` sets)."""
  name = type(model).__name__
  if name == "ResNet20" and model.block_widths is None:
    return model.clone(block_widths=tuple(model.width * 2**(k // 3) for k in range(9)))
  if name in ("ViT", "TransformerLM"):
    depth = model.depth if name == "ViT" else model.num_layers
    return model.clone(block_heads=tuple(model.block_heads or (model.num_heads,) * depth),
                       block_mlp_dims=tuple(model.block_mlp_dims or (model.mlp_dim,) * depth))
  if name == "LlamaLM":   # head width and per-layer widths written out
    c = model.llama_config()
    return model.clone(num_kv_heads=c.kv_heads, head_dim=c.dim,
                       block_kv_heads=tuple(model.block_kv_heads or (c.kv_heads,) * c.num_layers),
                       block_mlp_dims=tuple(model.block_mlp_dims
                                            or (c.intermediate_size,) * c.num_layers))
  if name in ("MLP", "LeNet5"):
    return model.clone(**{f: tuple(getattr(model, f)) for f in
                          (("features",) if name == "MLP" else ("conv_features", "fc_features"))})
  return model


def shrink_model(model: nn.Module, variables: Mapping[str, Any], found, keep,
                 multiple: int | None = None):
  """(smaller variables, smaller model): `sparsejax.shrink` on an expanded model."""
  return sparsejax.shrink(dict(variables), found, keep, config=expand(model), multiple=multiple)
