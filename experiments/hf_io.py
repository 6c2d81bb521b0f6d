"""Hugging Face checkpoints (safetensors + config.json) in and out of the NNX `Llama`.

A directory as `save_pretrained` writes it: `config.json` and either
`model.safetensors` or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` (`weight_map`: tensor name -> file). Llama,
Qwen2 and Qwen3 (`architectures` LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM) map onto `experiments.models.llama.Llama`, whose modules
carry the Hugging Face names::

  model.embed_tokens.weight                      (vocab, hidden)  embed_tokens/embedding
  model.layers.N.self_attn.q_proj.weight         (out, in)        layers/N/self_attn/q_proj/kernel (in, out)
  model.layers.N.self_attn.q_proj.bias           (out,)           layers/N/self_attn/q_proj/bias
  model.layers.N.self_attn.q_norm.weight         (head_dim,)      layers/N/self_attn/q_norm/weight (qwen3)
  model.layers.N.mlp.gate_proj.weight            (out, in)        layers/N/mlp/gate_proj/kernel (in, out)
  model.layers.N.input_layernorm.weight          (hidden,)        layers/N/input_layernorm/weight
  model.norm.weight, lm_head.weight              (vocab, hidden)  norm/weight, lm_head/kernel (in, out)

and likewise k/v/o_proj, k_norm, up/down_proj, post_attention_layernorm.
Linear weights are stored by torch as (out, in) and transposed on the way in
and out; `lm_head.weight` is absent when the embeddings are tied. Tensors
may be bfloat16, float16 or float32; they are read into float32 (the
model's parameter dtype) and written back in the dtype asked for (default:
the checkpoint's own, from the safetensors headers, not config.json's
`dtype` / `torch_dtype`: a disagreement is reported, `Checkpoint.mismatch`). Reading uses the `safetensors` package's NumPy
backend (`ml_dtypes` bfloat16), one tensor at a time; nothing needs network
access.

Every problem is a one-line `HFError` (a ValueError) that names the file,
field or tensor: an architecture or a config field the model cannot take, a
missing or unexpected tensor, a shape that disagrees with config.json, a
dtype other than the three. `save` writes into a temporary directory beside
the target and renames it at the end, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from experiments.models import llama

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
# safetensors dtype names -> NumPy dtypes, and the config.json spellings of each.
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some old checkpoints saved


class HFError(ValueError):
  """A checkpoint the model cannot read or write; the message names the file, field or tensor."""


def config_from_hf(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> llama.LlamaConfig:
  """The `LlamaConfig` of a Hugging Face config.json dict.

  Raises:
    HFError: naming the field, for an architecture other than Llama / Qwen2 /
      Qwen3, or a feature the model has not (rope scaling, MLP biases,
      another activation, sliding-window attention).
  """
  architectures = list(hf.get("architectures") or [])
  model_type = hf.get("model_type")
  flavour = next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
  if flavour is None and not architectures and model_type in MODEL_TYPES:
    flavour = model_type
  if flavour is None:
    raise HFError(f"{where}: architectures={architectures} (model_type={model_type!r}) is not "
                  f"supported; supported: {sorted(ARCHITECTURES)}.")
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling")
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or rope.get(
      "rope_type", "default")
  if rope_type != "default":
    raise HFError(f"{where}: rope type {rope_type!r} (rope_scaling / rope_parameters) is not "
                  "supported; only the default rotary embedding is.")
  if hf.get("hidden_act", "silu") != "silu":
    raise HFError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; the MLP is SwiGLU "
                  "(silu).")
  if hf.get("mlp_bias"):
    raise HFError(f"{where}: mlp_bias=true is not supported (the MLP has no biases).")
  if hf.get("use_sliding_window"):
    raise HFError(f"{where}: use_sliding_window=true is not supported (full causal attention).")
  try:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or 0)
    if head_dim * heads == int(hf["hidden_size"]):
      head_dim = 0   # the default width, as LlamaConfig spells it
    bias = bool(hf.get("attention_bias", False))
    if flavour == "qwen2" and "attention_bias" in hf and not bias:
      raise HFError(f"{where}: attention_bias=false with Qwen2 (whose q/k/v carry biases).")
    return llama.LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim, flavour=flavour,
        attention_bias=bias and flavour != "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)))
  except KeyError as e:
    raise HFError(f"{where}: field {e.args[0]!r} is missing.") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, HFError):
      raise
    raise HFError(f"{where}: {e}") from None


def config_to_hf(config: llama.LlamaConfig, dtype: str = "float32",
                 base: Mapping[str, Any] | None = None) -> dict:
  """A config.json dict for `config`: `base` (the source checkpoint's) with the sizes and dtype set.

  Raises:
    HFError: if the layers have different widths (`check_uniform`).
  """
  check_uniform(config)
  config = config.layer(0)   # the one width of every layer in the scalar fields
  hf = dict(base or {})
  hf.update({
      "architectures": [MODEL_TYPES[config.flavour]], "model_type": config.flavour,
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.kv_heads,
      "head_dim": config.dim, "hidden_act": "silu", "rms_norm_eps": config.rms_eps,
      "tie_word_embeddings": config.tie_embeddings, "dtype": dtype})
  if "torch_dtype" in hf:
    hf["torch_dtype"] = dtype
  if config.flavour != "qwen2":
    hf["attention_bias"] = config.attention_bias
  if "rope_parameters" in hf:
    hf["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": config.rope_theta}
  else:
    hf["rope_theta"] = config.rope_theta
  return hf


def check_uniform(config: llama.LlamaConfig) -> None:
  """Raises HFError unless every layer has the same widths: a Hugging Face Llama / Qwen config
  has one `num_key_value_heads` and one `intermediate_size` (a structured shrink that keeps
  a different count per layer, FLAP's, gives a model it cannot describe)."""
  if not config.uniform:
    raise HFError(f"the layers have different widths (key/value heads {config.layer_kv_heads}, "
                  f"MLP {config.layer_intermediate_sizes}); a Hugging Face config has one "
                  "num_key_value_heads and one intermediate_size for all layers.")


def tensor_table(config: llama.LlamaConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
  """{Hugging Face tensor name: (pure-dict path, torch shape, transposed)} of every tensor.

  >>> table = tensor_table(llama.LlamaConfig(num_layers=1))
  >>> table['model.layers.0.self_attn.q_proj.weight']
  (('layers', 0, 'self_attn', 'q_proj', 'kernel'), (128, 128), True)
  """
  c = config
  d = c.hidden_size
  table = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), (c.vocab_size, d), False),
           "model.norm.weight": (("norm", "weight"), (d,), False)}
  if not c.tie_embeddings:
    table["lm_head.weight"] = (("lm_head", "kernel"), (c.vocab_size, d), True)
  for n in range(c.num_layers):
    layer = c.layer(n)
    f, heads, kv = layer.intermediate_size, layer.num_heads * c.dim, layer.kv_heads * c.dim
    pre, path = f"model.layers.{n}.", ("layers", n)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      table[f"{pre}{norm}.weight"] = (path + (norm, "weight"), (d,), False)
    for name, out in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
      table[f"{pre}self_attn.{name}.weight"] = (path + ("self_attn", name, "kernel"), (out, d), True)
      if c.qkv_bias:
        table[f"{pre}self_attn.{name}.bias"] = (path + ("self_attn", name, "bias"), (out,), False)
    table[f"{pre}self_attn.o_proj.weight"] = (path + ("self_attn", "o_proj", "kernel"), (d, heads),
                                              True)
    if c.o_bias:
      table[f"{pre}self_attn.o_proj.bias"] = (path + ("self_attn", "o_proj", "bias"), (d,), False)
    if c.flavour == "qwen3":
      for name in ("q_norm", "k_norm"):
        table[f"{pre}self_attn.{name}.weight"] = (path + ("self_attn", name, "weight"), (c.dim,),
                                                  False)
    for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
      table[f"{pre}mlp.{name}.weight"] = (path + ("mlp", name, "kernel"), shape, True)
  return table


def read_config(directory: str) -> dict:
  """config.json of a checkpoint directory as a dict (HFError if absent or not JSON)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise HFError(f"{path}: no config.json; give a directory written by save_pretrained.")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{path}: not valid JSON ({e}).") from None


def weight_files(directory: str) -> dict[str, str]:
  """{tensor name: its .safetensors file} from the index, or every tensor of model.safetensors."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFError(f"{index}: no 'weight_map'.")
    for name, file in weight_map.items():
      if not os.path.isfile(os.path.join(directory, file)):
        raise HFError(f"{index}: tensor {name} is in {file}, which is missing.")
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  single = os.path.join(directory, SINGLE_FILE)
  if not os.path.isfile(single):
    raise HFError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}.")
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


class Checkpoint(NamedTuple):
  """A checked checkpoint directory, no tensor read yet (`inspect`).

  Attributes:
    config: the model's `LlamaConfig`.
    hf_config: config.json as a dict.
    dtype: the tensors' dtype name ('bfloat16', 'float16' or 'float32'), from
      the safetensors headers (the one holding the most entries if they mix).
    files: {tensor name: its .safetensors file}.
    table: `tensor_table(config)`.
    mismatch: one line if config.json's `dtype` (or `torch_dtype`) is not
      the tensors' dtype, or the tensors mix dtypes; None if they agree.
  """
  config: llama.LlamaConfig
  hf_config: dict
  dtype: str
  files: dict
  table: dict
  mismatch: str | None = None


def inspect(directory: str) -> Checkpoint:
  """Reads config.json and every tensor's header: all checks of `load`, no tensor data read.

  The dtype is the tensors' own, from the safetensors headers; where
  config.json's `dtype` / `torch_dtype` disagrees (or the tensors mix
  dtypes), `Checkpoint.mismatch` says so in one line.

  Raises:
    HFError: naming the tensor: missing, unexpected, of another shape than
      config.json implies, or of a dtype other than F32 / F16 / BF16; or the
      config field (`config_from_hf`).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  hf = read_config(directory)
  config = config_from_hf(hf, os.path.join(directory, CONFIG_FILE))
  table = tensor_table(config)
  files = weight_files(directory)
  unexpected = [n for n in files if n not in table and not n.endswith(IGNORED_SUFFIXES)
                and not (n == "lm_head.weight" and config.tie_embeddings)]
  if unexpected:
    raise HFError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]} for "
                  f"{MODEL_TYPES[config.flavour]} ({len(unexpected)} unexpected).")
  missing = [n for n in table if n not in files]
  if missing:
    raise HFError(f"{directory}: tensor {missing[0]} is missing ({len(missing)} missing).")
  stored = {}
  for file, names in _by_file(files, table).items():
    with safe_open(file, framework="numpy") as f:
      for name in names:
        view = f.get_slice(name)
        dtype, shape = view.get_dtype(), tuple(view.get_shape())
        if dtype not in DTYPES:
          raise HFError(f"{file}: tensor {name} has dtype {dtype}; the model takes "
                        f"{sorted(DTYPES)}.")
        if shape != table[name][1]:
          raise HFError(f"{file}: tensor {name} has shape {shape}, config.json implies "
                        f"{table[name][1]}.")
        stored[dtype] = stored.get(dtype, 0) + int(np.prod(shape))
  dtype, mismatch = _stored_dtype(hf, stored, directory)
  return Checkpoint(config, hf, dtype, files, table, mismatch)


def _stored_dtype(hf: Mapping[str, Any], stored: Mapping[str, int],
                  directory: str) -> tuple[str, str | None]:
  """(the tensors' dtype name, a one-line mismatch or None) from {header dtype: entries}."""
  names = {v: k for k, v in DTYPE_NAMES.items()}
  code = max(sorted(stored), key=lambda c: stored[c])   # ties: alphabetical, so deterministic
  dtype = names[code]
  notes = []
  if len(stored) > 1:
    total = sum(stored.values())
    notes.append("the tensors mix dtypes (" + ", ".join(
        f"{names[c]} {stored[c] / total:.1%}" for c in sorted(stored, key=lambda c: -stored[c]))
        + f" of the entries): the checkpoint's dtype is taken as {dtype}")
  declared = hf.get("dtype") or hf.get("torch_dtype")
  if declared is not None and declared != dtype:
    notes.append(f"config.json says dtype {declared!r} but the tensors are stored as {dtype}: "
                 f"{dtype} is used")
  return dtype, (f"{directory}: " + "; ".join(notes) + ".") if notes else None


def _by_file(files: Mapping[str, str], names) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for name in names:
    out.setdefault(files[name], []).append(name)
  return out


def read(checkpoint: Checkpoint, names=None) -> dict:
  """The tensors `names` (default all) as a nested pure dict of float32 arrays, `Llama`'s layout.

  Only these tensors are read (one file open at a time), so a caller can
  hold one block's weights at a time.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  params: dict = {}
  for file, chosen in _by_file(checkpoint.files, names or checkpoint.table).items():
    with safe_open(file, framework="numpy") as f:
      for name in chosen:
        path, _, transposed = checkpoint.table[name]
        value = np.asarray(f.get_tensor(name), np.float32)
        node = params
        for key in path[:-1]:
          node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value.T) if transposed else value
  return params


def load(directory: str) -> tuple[llama.LlamaConfig, dict, dict, str]:
  """(config, params as the nested pure dict of `Llama`'s nnx.Param state, config.json, dtype).

  Every tensor is checked against config.json before any is read
  (`inspect`); params are float32 NumPy arrays; dtype is the tensors' (e.g.
  'bfloat16').

  Raises:
    HFError: as `inspect`.
  """
  checkpoint = inspect(directory)
  return checkpoint.config, read(checkpoint), checkpoint.hf_config, checkpoint.dtype


def to_model(config: llama.LlamaConfig, params: Mapping) -> llama.Llama:
  """A `Llama` of `config` holding `params` (pure dict) as its weights, no random init run."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, dict(params)))
  nnx.update(model, state)
  return model


def _get(params: Mapping, path: tuple) -> Any:
  node = params
  for key in path:
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError):
      raise HFError(f"params have no {'/'.join(map(str, path))}.") from None
  return node


def to_tensors(config: llama.LlamaConfig, params: Mapping, names=None) -> dict[str, np.ndarray]:
  """{tensor name: float32 array in torch's layout} of `names` (default all) from a pure dict.

  Raises:
    HFError: naming the params path and tensor, for a leaf missing or of
      another shape than `config` implies.
  """
  table = tensor_table(config)
  tensors = {}
  for name in names or table:
    path, shape, transposed = table[name]
    value = np.asarray(_get(params, path), np.float32)
    value = value.T if transposed else value
    if tuple(value.shape) != shape:
      raise HFError(f"{'/'.join(map(str, path))} (tensor {name}) has shape "
                    f"{tuple(value.T.shape) if transposed else value.shape}, config implies "
                    f"{shape[::-1] if transposed else shape}.")
    tensors[name] = value
  return tensors


class Writer:
  """Writes a checkpoint shard by shard into a temporary directory; `finish` renames it in place.

  `write(tensors)` adds one shard ({name: float32 array in torch layout},
  cast to `dtype`); `finish()` names the shards `model-0000i-of-0000n
  .safetensors` (or `model.safetensors` if there is one) and writes the
  index, config.json (`hf_config`, the source's, with sizes and dtype set)
  and the other files of `copy_from` (tokenizer, generation config), then
  renames the temporary directory to `directory` (an existing one is
  replaced only with `overwrite`); `abort()` removes it. Used as a context
  manager, an exception aborts.

  Raises:
    HFError: for an unknown dtype, or an existing non-empty `directory`
      without `overwrite`.
  """

  def __init__(self, directory: str, config: llama.LlamaConfig, *, dtype: str = "float32",
               hf_config: Mapping[str, Any] | None = None, copy_from: str | None = None,
               overwrite: bool = False):
    if dtype not in DTYPE_NAMES:
      raise HFError(f"dtype={dtype!r}; write one of {sorted(DTYPE_NAMES)}.")
    check_uniform(config)
    self.directory = os.path.abspath(directory)
    if os.path.isdir(self.directory) and os.listdir(self.directory) and not overwrite:
      raise HFError(f"{self.directory} exists and is not empty; pass overwrite=True to replace "
                    "it.")
    self.config, self.dtype, self.hf_config = config, dtype, hf_config
    self.copy_from = copy_from
    self.target = DTYPES[DTYPE_NAMES[dtype]]
    self.shards: list[list[str]] = []
    self.total = 0
    self.parent = os.path.dirname(self.directory)
    os.makedirs(self.parent, exist_ok=True)
    self.temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(self.directory)}.tmp-",
                                      dir=self.parent)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is not None:
      self.abort()

  def _shard(self, i: int) -> str:
    return os.path.join(self.temporary, f"shard-{i}.safetensors")

  def write(self, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` as the next shard, cast to the writer's dtype."""
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    safetensors.numpy.save_file(
        {n: np.ascontiguousarray(np.asarray(v).astype(self.target)) for n, v in tensors.items()},
        self._shard(len(self.shards)), metadata={"format": "pt"})
    self.shards.append(list(tensors))
    self.total += sum(np.size(v) for v in tensors.values()) * self.target.itemsize

  def finish(self) -> list[str]:
    """Names the shards, writes index, config and copied files, renames; returns the file names."""
    try:
      count = len(self.shards)
      names = ([SINGLE_FILE] if count == 1 else
               [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
      for i, name in enumerate(names):
        os.rename(self._shard(i), os.path.join(self.temporary, name))
      written = list(names)
      if count > 1:
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {n: file for file, shard in zip(names, self.shards) for n in shard}}
        with open(os.path.join(self.temporary, INDEX_FILE), "w", encoding="utf-8") as f:
          json.dump(index, f, indent=2)
        written.append(INDEX_FILE)
      with open(os.path.join(self.temporary, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(self.config, self.dtype, self.hf_config), f, indent=2)
      written.append(CONFIG_FILE)
      if self.copy_from:
        for file in sorted(os.listdir(self.copy_from)):
          source = os.path.join(self.copy_from, file)
          if (os.path.isfile(source) and file not in written and file != INDEX_FILE
              and not file.endswith(".safetensors")):
            shutil.copy2(source, os.path.join(self.temporary, file))
            written.append(file)
      if os.path.isdir(self.directory):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.directory)}.old-",
                               dir=self.parent)
        os.rename(self.directory, os.path.join(old, "previous"))
        os.rename(self.temporary, self.directory)
        shutil.rmtree(old)
      else:
        os.rename(self.temporary, self.directory)
    except BaseException:
      self.abort()
      raise
    return written

  def abort(self) -> None:
    """Removes the temporary directory: nothing of this writer is left."""
    shutil.rmtree(self.temporary, ignore_errors=True)


def save(directory: str, config: llama.LlamaConfig, params: Mapping, *,
         dtype: str = "float32", hf_config: Mapping[str, Any] | None = None,
         max_shard_bytes: int | None = None, copy_from: str | None = None,
         overwrite: bool = False) -> list[str]:
  """Writes `params` (pure dict of `Llama`'s state) as a Hugging Face checkpoint in `directory`.

  Linear weights are transposed to torch's (out, in); tensors are cast to
  `dtype` ('bfloat16', 'float16' or 'float32'); with `max_shard_bytes`,
  tensors fill shards of at most that size (a tensor larger than it gets a
  shard of its own) and `model.safetensors.index.json` maps them. config.json
  is `hf_config` (the source's) with the sizes and dtype set. `copy_from`: a
  checkpoint directory whose other files (tokenizer, generation config) are
  copied along. Everything is written to a temporary directory beside
  `directory` and renamed at the end (`Writer`): on any error nothing is
  left. Returns the names of the files written.

  Raises:
    HFError: for an unknown dtype, a params leaf missing or of another shape
      than `config` implies (named), or an existing non-empty `directory`
      without `overwrite`.
  """
  if dtype not in DTYPE_NAMES:
    raise HFError(f"dtype={dtype!r}; write one of {sorted(DTYPE_NAMES)}.")
  tensors = to_tensors(config, params)   # every leaf checked before anything is written
  itemsize = DTYPES[DTYPE_NAMES[dtype]].itemsize
  shards: list[list[str]] = [[]]
  size = 0
  for name, value in tensors.items():
    nbytes = value.size * itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  with Writer(directory, config, dtype=dtype, hf_config=hf_config, copy_from=copy_from,
              overwrite=overwrite) as writer:
    for shard in shards:
      writer.write({n: tensors[n] for n in shard})
    return writer.finish()


def from_trained(train_workdir: str) -> tuple[llama.LlamaConfig, dict]:
  """(config, params as NumPy pure dict) of a finished `experiments.train` run of model 'llama'.

  Raises:
    HFError: the run's model is not 'llama'.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from experiments import oneshot
  from experiments import trainer as trainer_lib
  from sparsejax.checkpoint import SparseCheckpointManager
  trainer = oneshot.trained(train_workdir)
  if not hasattr(trainer.model, "llama_config"):
    raise HFError(f"{train_workdir}: model {trainer.config.model.name!r} is not 'llama'; only "
                  "the Llama-shaped model has a Hugging Face layout.")
  manager = SparseCheckpointManager(os.path.join(train_workdir, trainer_lib.CHECKPOINT_DIR),
                                    read_only=True)
  try:
    state = trainer.restore(manager, log=print)
  finally:
    manager.close()
  return trainer.model.llama_config(), jax.tree.map(np.asarray, dict(state.params["model"]))


def main(argv: list[str] | None = None) -> None:
  """`python -m experiments.hf_io --train_workdir=runs/llama --out=runs/llama_hf [--dtype=...]`.

  Writes the trained Llama-shaped model of an `experiments.train` run as a
  Hugging Face checkpoint (what `transformers` and `experiments.hf_oneshot` read).
  """
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
  parser.add_argument("--train_workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES))
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    config, params = from_trained(args.train_workdir)
    files = save(args.out, config, params, dtype=args.dtype, overwrite=args.overwrite,
                 hf_config={"max_position_embeddings": 4096})
  except (HFError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {', '.join(files)} ({args.dtype}) to {args.out}")


if __name__ == "__main__":
  main()
