"""Benchmark: size on disk of `export_sparse` vs a dense Orbax checkpoint.

LeNet-300-100 (784-300-100-10 Dense layers, 266,610 weights, flax.linen init
with a fixed seed) is pruned with `sparsejax.magnitude_masks` (kernels only,
biases stay dense) and the masks are applied. The pruned params are then
written twice: as a dense checkpoint with `ocp.StandardCheckpointer` (size =
all files under its directory) and with `export_sparse` (one file). Both
sizes and their ratio are printed, plus the ratio to the raw dense bytes and
to an Orbax checkpoint of the unpruned params.

Orbax (OCDBT + zarr3) compresses chunks with zstd, which removes most of
the zeros of a pruned dense checkpoint: at 90% sparsity it is already about
as small as the uncompressed export, so "export / dense checkpoint" is close
to 1, while "export / raw dense bytes" shows what the format itself saves.

  python benchmarks/export_size.py                  # 90% sparse, seed 0
  python benchmarks/export_size.py --sparsity 0.95
"""

from __future__ import annotations

import argparse
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import sparsejax
from sparsejax.checkpoint import export

TARGET = 0.15  # export / dense checkpoint at 90% sparsity


class LeNet300100(nn.Module):
  """The 784-300-100-10 MLP of LeCun et al. (1998), used by most pruning papers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def _orbax_bytes(directory: str, params) -> int:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return _dir_bytes(directory)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  unpruned = LeNet300100().init(jax.random.key(args.seed), jnp.ones((1, 784)))["params"]
  masks = sparsejax.magnitude_masks(unpruned, args.sparsity)
  params = sparsejax.apply_masks(unpruned, masks)
  report = sparsejax.sparsity_report(params, masks)
  print(f"LeNet-300-100: {report.size:,} weights, {report.kept:,} kept by the masks "
        f"(overall sparsity {report.sparsity:.3f}; kernels {args.sparsity:.0%}, biases dense)")

  with tempfile.TemporaryDirectory() as workdir:
    unpruned_ckpt = _orbax_bytes(os.path.join(workdir, "unpruned"), unpruned)
    dense_ckpt = _orbax_bytes(os.path.join(workdir, "dense"), params)
    stats = export.export_sparse(params, masks, os.path.join(workdir, "lenet.npz"))

  print(f"raw dense bytes (sum of nbytes)      {stats.dense_bytes:>10,}")
  print(f"Orbax checkpoint of the dense model  {unpruned_ckpt:>10,}")
  print(f"Orbax checkpoint of the pruned params{dense_ckpt:>10,}  (zeros kept; zstd squeezes them)")
  print(f"export_sparse file on disk           {stats.file_bytes:>10,}")
  print(f"export / raw dense bytes = {stats.ratio:.3f}")
  print(f"export / Orbax checkpoint of the pruned params = {stats.file_bytes / dense_ckpt:.3f}")
  ratio = stats.file_bytes / unpruned_ckpt
  target = ""
  if args.sparsity == 0.9:
    target = f" (target <= {TARGET}: {'met' if ratio <= TARGET else 'missed'})"
  print(f"export / dense checkpoint = {ratio:.3f}{target}")


if __name__ == "__main__":
  main()
