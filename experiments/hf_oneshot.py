"""One-shot pruning of a local Hugging Face checkpoint (Llama / Qwen2 / Qwen3), written back as one.

  python -m experiments.hf_oneshot --config=experiments/configs/oneshot_hf.py \
      --config.model_path=<dir with config.json + *.safetensors> --workdir=<output dir> \
      --config.method=sparsegpt --config.pattern=2,4

(`python -m experiments.oneshot` with the same config does the same.) Checks
the checkpoint (`experiments.hf_io.inspect`: every tensor's name, shape and
dtype against config.json, and every kernel against the N:M pattern) before
reading any weight, draws `calibration_sequences` calibration sequences of
`sequence_length` tokens, and prunes the model block by block as the Wanda
and SparseGPT papers do: the calibration activations enter block 0 from the
embedding; each block's linear layers (q/k/v/o, gate/up/down) are pruned
from the X^T X of their inputs captured on that block alone
(`sparsejax.oneshot.nnx_hessians`, `prune_sequentially` with the block as
one group); the pruned block then maps the activations to the next block's
inputs. Weights are streamed: the embeddings, final norm and head are read
and written as the first shard, then each block is read, pruned and written
as a shard of its own before the next is read. One progress line per block,
with the block's relative output error on the calibration tokens.
Embeddings and the output head stay dense. The output directory
(`--workdir`) gets the pruned checkpoint (shards + index) in the source's
dtype (or `config.dtype`), with the source's tokenizer and other files
copied; it is written to a temporary name and renamed at the end, so a
failed run leaves nothing.

Calibration tokens (`config.calibration`): 'random' (uniform token ids,
seeded: needs no tokenizer, what a smoke test wants), 'stdlib_text' (the
bundled Python-source bytes; byte-level vocabularies of 256), or the path of
a .npy file of int token ids, shape (sequences, length), at least
(calibration_sequences, sequence_length): its first rows and tokens are used,
a smaller file is an error naming it.

Memory: one block's weights (float32) at a time, or the embedding while the
calibration activations are made; the calibration activations (sequences x
length x hidden, float32: held in full, twice during a block, for its dense
and pruned outputs) and one block's X^T X matrices.
"""

from __future__ import annotations

import math
import os
import time

from absl import app
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparsejax import oneshot as oneshot_lib
from experiments import cli
from experiments import config_checks
from experiments import hf_io
from experiments.models import llama


def target(config: ml_collections.ConfigDict) -> dict:
  """{'sparsity': s} or {'nm': (n, m)} from config.sparsity / config.pattern (one line if bad)."""
  pattern = tuple(config.pattern or ())
  if pattern:
    if len(pattern) != 2:
      raise config_checks.ConfigError(f"config.pattern: {pattern!r} is not an (N, M) pair.")
    value = {"nm": (int(pattern[0]), int(pattern[1]))}
  else:
    value = {"sparsity": float(config.sparsity)}
  try:
    oneshot_lib.check_target(**value)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.{'pattern' if pattern else 'sparsity'}: {e}") from e
  return value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects, naming the key, what the run could not do."""
  if not config.model_path:
    raise config_checks.ConfigError("config.model_path is empty: give a directory with "
                                    "config.json and model*.safetensors.")
  try:
    oneshot_lib.check_method(config.method)
    oneshot_lib.check_solver(config.block_size, config.dampening)
  except ValueError as e:
    raise config_checks.ConfigError(f"config.method / block_size / dampening: {e}") from e
  config_checks.at_least(config.calibration_sequences, 1, "calibration_sequences")
  config_checks.at_least(config.sequence_length, 1, "sequence_length")
  config_checks.at_least(config.calibration_batch, 1, "calibration_batch")
  if config.dtype and config.dtype not in hf_io.DTYPE_NAMES:
    raise config_checks.ConfigError(f"config.dtype={config.dtype!r}: use '' (the checkpoint's) "
                                    f"or one of {sorted(hf_io.DTYPE_NAMES)}.")
  target(config)


def calibration_tokens(config: ml_collections.ConfigDict, vocab_size: int) -> np.ndarray:
  """(calibration_sequences, sequence_length) int32 token ids from config.calibration.

  A .npy file gives its first calibration_sequences rows, each cut to its
  first sequence_length tokens; a file with fewer rows or shorter rows is a
  ConfigError saying how many tokens it needs and has.
  """
  count, length = config.calibration_sequences, config.sequence_length
  source = config.calibration
  if source == "random":
    return np.random.default_rng(config.seed).integers(0, vocab_size, (count, length),
                                                       dtype=np.int32)
  if source == "stdlib_text":
    from experiments import stdlib_text  # pylint: disable=g-import-not-at-top
    data = stdlib_text.split_bytes(stdlib_text.source_files()["train"])
    starts = np.random.default_rng(config.seed).integers(0, len(data) - length, count)
    tokens = np.stack([data[s:s + length] for s in starts]).astype(np.int32)
  else:
    if not os.path.isfile(source):
      raise config_checks.ConfigError(f"config.calibration={source!r}: not 'random', "
                                      "'stdlib_text' or an existing .npy file of token ids.")
    tokens = np.load(source)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise config_checks.ConfigError(f"config.calibration={source!r}: holds {tokens.dtype} of "
                                      f"shape {tokens.shape}, not int token ids (sequences, length).")
    have, need = tokens.shape, (count, length)
    if have[0] < count or have[1] < length:   # a short file is never used silently
      raise config_checks.ConfigError(
          f"config.calibration={source!r}: needs {count} sequences x {length} tokens "
          f"({count * length:,} tokens: calibration_sequences x sequence_length), has "
          f"{have[0]} x {have[1]} ({tokens.size:,}).")
    tokens = tokens[:count, :length].astype(np.int32)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise config_checks.ConfigError(f"config.calibration={source!r}: token ids in "
                                    f"[{tokens.min()}, {tokens.max()}], vocabulary {vocab_size}.")
  return tokens


@nnx.jit
def _block_forward(block, x):
  return block(x)


def _block(config: llama.LlamaConfig, params: dict) -> llama.Block:
  """A decoder block of `config` holding `params` (pure dict), no random init run."""
  block = nnx.eval_shape(lambda: llama.Block(config, nnx.Rngs(0)))
  state = nnx.state(block, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(block, state)
  return block


def prune_block(block: llama.Block, x: list, method: str, *, block_size: int = 128,
                dampening: float = 0.01, **target) -> tuple[list, dict, float]:
  """Prunes `block`'s kernels in place from its inputs `x` (one array per batch).

  Its linear layers' X^T X (or, for Wanda, diagonal) are captured on the
  block alone by `oneshot.nnx_hessians`. Returns the pruned block's outputs
  (the next block's inputs), its keep-masks, and the relative output error
  ||B'(x) - B(x)|| / ||B(x)|| over all calibration tokens.
  """
  dense = [_block_forward(block, h) for h in x]
  hessians = (None if method == "magnitude" else
              oneshot_lib.nnx_hessians(block, x, diagonal=method == "wanda"))
  pruned, masks = oneshot_lib.prune_sequentially(
      nnx.state(block, nnx.Param), hessians, method, group=lambda path: "block",
      block_size=block_size, dampening=dampening, **target)
  nnx.update(block, pruned)
  out = [_block_forward(block, h) for h in x]
  error = math.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(out, dense))
                    / max(sum(float(jnp.sum(b ** 2)) for b in dense), 1e-30))
  return out, masks, error


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Prunes config.model_path block by block, writing the pruned checkpoint to `workdir`.

  Only one block's weights (and the embedding, while the calibration
  activations are made) are read at a time; each pruned block is written as
  its own shard before the next is read.
  """
  check_config(config)
  value = target(config)
  try:
    checkpoint = hf_io.inspect(config.model_path)
  except hf_io.HFError as e:
    raise config_checks.ConfigError(f"config.model_path: {e}") from e
  model_config, table = checkpoint.config, checkpoint.table
  if checkpoint.mismatch:
    log(f"[hf_oneshot] note: {checkpoint.mismatch}")
  out_dtype = config.dtype or checkpoint.dtype
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise config_checks.ConfigError(f"--workdir {workdir} exists and is not empty; pass "
                                    "--overwrite to replace it.")
  prefix = "model.layers.0."
  shapes = {"/".join(map(str, path[2:])): jax.ShapeDtypeStruct(
      shape[::-1] if transposed else shape, jnp.float32)
            for name, (path, shape, transposed) in table.items() if name.startswith(prefix)}
  try:   # every kernel against the target before any work
    oneshot_lib.check_layers(shapes, config.method, block_size=config.block_size, **value)
  except ValueError as e:
    key = "block_size" if str(e).startswith("sparsegpt N:M") else "pattern"
    raise config_checks.ConfigError(f"config.{key}: {e}") from e
  tokens = calibration_tokens(config, model_config.vocab_size)
  batches = [tokens[i:i + config.calibration_batch]
             for i in range(0, len(tokens), config.calibration_batch)]
  count = sum(math.prod(shape) for _, shape, _ in table.values())
  log(f"[hf_oneshot] {hf_io.MODEL_TYPES[model_config.flavour]} from {config.model_path}: "
      f"{model_config.num_layers} blocks, {count / 1e6:.2f}M parameters ({checkpoint.dtype}); "
      f"{config.method} at {_describe(value)}, {len(tokens)} calibration sequences of "
      f"{tokens.shape[1]} tokens ({config.calibration})")
  start = time.perf_counter()
  kept = total = 0
  errors = []
  with hf_io.Writer(workdir, model_config, dtype=out_dtype, hf_config=checkpoint.hf_config,
                    copy_from=config.model_path, overwrite=overwrite) as writer:
    outer = [n for n in table if not n.startswith("model.layers.")]   # embeddings, norm, head
    params = hf_io.read(checkpoint, outer)
    writer.write(hf_io.to_tensors(model_config, params, outer))
    embedding = jnp.asarray(params["embed_tokens"]["embedding"])
    del params
    x = [embedding[jnp.asarray(b)] for b in batches]
    del embedding
    for i in range(model_config.num_layers):
      begin = time.perf_counter()
      names = [n for n in table if n.startswith(f"model.layers.{i}.")]
      block = _block(model_config, hf_io.read(checkpoint, names)["layers"][i])
      x, masks, error = prune_block(block, x, config.method, block_size=config.block_size,
                                    dampening=config.dampening, **value)
      leaves = [m for m in jax.tree.leaves(masks) if m is not None]
      block_kept, block_total = sum(int(m.sum()) for m in leaves), sum(m.size for m in leaves)
      pruned = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(block, nnx.Param)))
      writer.write(hf_io.to_tensors(model_config, {"layers": {i: pruned}}, names))
      del block, pruned
      kept, total = kept + block_kept, total + block_total
      errors.append(error)
      log(f"[hf_oneshot] block {i + 1}/{model_config.num_layers}: {len(leaves)} kernels, kept "
          f"{block_kept}/{block_total} ({block_kept / block_total:.1%}), output error "
          f"{error:.4f}, {time.perf_counter() - begin:.1f} s")
    files = writer.finish()
  seconds = time.perf_counter() - start
  log(f"[hf_oneshot] pruned in {seconds:.1f} s: {1 - kept / total:.2%} of the blocks' linear "
      f"weights zeroed")
  return {"method": config.method, "target": _describe(value), "dtype": out_dtype,
          "block_sparsity": 1 - kept / total, "prune_seconds": seconds,
          "block_output_errors": errors, "files": files, "output": workdir}


def _describe(value: dict) -> str:
  return (f"{value['nm'][0]}:{value['nm'][1]}" if "nm" in value
          else f"{value['sparsity']:.0%} sparsity")


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  del config
  print(f"wrote {', '.join(result['files'])} ({result['dtype']}) to {workdir}")


main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
