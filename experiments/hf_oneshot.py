"""One-shot pruning of a local Hugging Face checkpoint (Llama / Qwen2 / Qwen3), written back as one.

  python -m experiments.hf_oneshot --config=experiments/configs/oneshot_hf.py \
      --config.model_path=<dir with config.json + *.safetensors> --workdir=<output dir> \
      --config.method=sparsegpt --config.pattern=2,4

(`python -m experiments.oneshot` with the same config does the same.) Reads
the checkpoint (`experiments.hf_io`: every tensor checked against
config.json first), draws `calibration_sequences` calibration sequences of
`sequence_length` tokens, and prunes the model block by block as the Wanda
and SparseGPT papers do: the calibration activations enter block 0 from the
embedding; each block's linear layers (q/k/v/o, gate/up/down) are pruned
from the X^T X of their inputs captured on that block alone
(`sparsejax.oneshot.nnx_hessians`, `prune_sequentially` with the block as
one group); the pruned block then maps the activations to the next block's
inputs. One progress line per block. Embeddings and the output head stay
dense. The output directory (`--workdir`) gets the pruned checkpoint in the
same layout and dtype (or `config.dtype`), sharded like `max_shard_bytes`
says, with the source's tokenizer and other files copied; it is written to
a temporary name and renamed at the end, so a failed run leaves nothing.

Calibration tokens (`config.calibration`): 'random' (uniform token ids,
seeded: needs no tokenizer, what a smoke test wants), 'stdlib_text' (the
bundled Python-source bytes; byte-level vocabularies of 256), or the path of
a .npy file of int token ids, shape (sequences, length).

Memory: every weight is held in memory (float32) for the whole run, plus the
calibration activations (sequences x length x hidden, float32) and one
block's X^T X matrices; the design target of streaming one block's weights
at a time is not reached (README, "Pruning a Hugging Face checkpoint").
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
  if config.max_shard_bytes < 0:
    raise config_checks.ConfigError("config.max_shard_bytes must be >= 0 (0: one file).")
  target(config)


def calibration_tokens(config: ml_collections.ConfigDict, vocab_size: int) -> np.ndarray:
  """(calibration_sequences, sequence_length) int32 token ids from config.calibration."""
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
    tokens = tokens[:count].astype(np.int32)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise config_checks.ConfigError(f"config.calibration={source!r}: token ids in "
                                    f"[{tokens.min()}, {tokens.max()}], vocabulary {vocab_size}.")
  return tokens


@nnx.jit
def _block_forward(block, x):
  return block(x)


@nnx.jit
def _embed(model, tokens):
  return model.embed(tokens)


@nnx.jit
def _loss(model, tokens):
  """Mean next-token cross-entropy (nats) of a batch."""
  logits = model(tokens)[:, :-1]
  labels = tokens[:, 1:]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


def _mean_loss(model, batches) -> float:
  return float(np.mean([float(_loss(model, b)) for b in batches]))


def prune_blocks(model, batches: list, method: str, *, block_size: int = 128,
                 dampening: float = 0.01, log=print, **target) -> dict:
  """Prunes every block's kernels in place, block after block; returns {block: keep-masks}.

  Block i is calibrated on the activations the (already pruned) blocks
  before it produce from `batches`; its linear layers' X^T X (or, for
  Wanda, diagonal) are captured by `oneshot.nnx_hessians` on the block alone.
  """
  x = [_embed(model, jnp.asarray(b)) for b in batches]
  masks = {}
  for i, block in enumerate(model.layers):
    start = time.perf_counter()
    params = nnx.state(block, nnx.Param)
    hessians = (None if method == "magnitude" else
                oneshot_lib.nnx_hessians(block, x, diagonal=method == "wanda"))
    pruned, block_masks = oneshot_lib.prune_sequentially(
        params, hessians, method, group=lambda path: f"layers/{i}",
        block_size=block_size, dampening=dampening, **target)
    nnx.update(block, pruned)
    x = [_block_forward(block, h) for h in x]
    jax.block_until_ready(x)
    leaves = [m for m in jax.tree.leaves(block_masks) if m is not None]
    kept, total = sum(int(m.sum()) for m in leaves), sum(m.size for m in leaves)
    masks[i] = block_masks
    log(f"[hf_oneshot] block {i + 1}/{len(model.layers)}: {len(leaves)} kernels, kept "
        f"{kept}/{total} ({kept / total:.1%}), {time.perf_counter() - start:.1f} s")
  return masks


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        log=print) -> dict:
  """Prunes config.model_path and writes the pruned checkpoint to `workdir`; returns a summary."""
  check_config(config)
  value = target(config)
  try:
    model_config, params, hf, dtype = hf_io.load(config.model_path)
  except hf_io.HFError as e:
    raise config_checks.ConfigError(f"config.model_path: {e}") from e
  out_dtype = config.dtype or dtype
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise config_checks.ConfigError(f"--workdir {workdir} exists and is not empty; pass "
                                    "--overwrite to replace it.")
  block_paths = {"/".join(str(k) for k in path): np.shape(v)
                 for path, v in jax.tree_util.tree_flatten_with_path(params["layers"][0])[0]
                 for path in [[getattr(k, "key", k) for k in path]]}
  shapes = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in block_paths.items()}
  try:   # every kernel against the target before any work
    oneshot_lib.check_layers(shapes, config.method, block_size=config.block_size, **value)
  except ValueError as e:
    key = "block_size" if str(e).startswith("sparsegpt N:M") else "pattern"
    raise config_checks.ConfigError(f"config.{key}: {e}") from e
  tokens = calibration_tokens(config, model_config.vocab_size)
  batches = [tokens[i:i + config.calibration_batch]
             for i in range(0, len(tokens), config.calibration_batch)]
  model = hf_io.to_model(model_config, params)
  del params
  count = sum(math.prod(np.shape(v)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"[hf_oneshot] {hf_io.MODEL_TYPES[model_config.flavour]} from {config.model_path}: "
      f"{model_config.num_layers} blocks, {count / 1e6:.2f}M parameters ({dtype}); "
      f"{config.method} at {_describe(value)}, {len(tokens)} calibration sequences of "
      f"{tokens.shape[1]} tokens ({config.calibration})")
  dense_loss = _mean_loss(model, batches)
  start = time.perf_counter()
  masks = prune_blocks(model, batches, config.method, block_size=config.block_size,
                       dampening=config.dampening, log=log, **value)
  seconds = time.perf_counter() - start
  pruned_loss = _mean_loss(model, batches)
  pruned = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  kept = sum(int(m.sum()) for b in masks.values() for m in jax.tree.leaves(b))
  total = sum(m.size for b in masks.values() for m in jax.tree.leaves(b))
  files = hf_io.save(workdir, model_config, pruned, dtype=out_dtype, hf_config=hf,
                     max_shard_bytes=config.max_shard_bytes or None,
                     copy_from=config.model_path, overwrite=overwrite)
  summary = {"method": config.method, "target": _describe(value), "dtype": out_dtype,
             "block_sparsity": 1 - kept / total, "prune_seconds": seconds,
             "calibration_loss_dense": dense_loss, "calibration_loss_pruned": pruned_loss,
             "files": files, "output": workdir}
  log(f"[hf_oneshot] pruned in {seconds:.1f} s: {1 - kept / total:.2%} of the blocks' linear "
      f"weights zeroed; calibration loss {dense_loss:.4f} -> {pruned_loss:.4f} nats/token")
  return summary


def _describe(value: dict) -> str:
  return (f"{value['nm'][0]}:{value['nm'][1]}" if "nm" in value
          else f"{value['sparsity']:.0%} sparsity")


def report(result: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  del config
  print(f"wrote {', '.join(result['files'])} ({result['dtype']}) to {workdir}")


main = cli.main_for(run, report)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
