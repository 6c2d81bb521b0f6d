"""Benchmark: sparsejax SparseGPT on one layer vs a NumPy implementation of the same algorithm.

A (1024, 1024) float32 layer and 128 x 256 calibration tokens (X: 32768 x
1024), 50% unstructured and 2:4. The baseline is SparseGPT written in NumPy
the way the authors' PyTorch code runs it (float32, blocks of 128, lazy batch
updates, the same Cholesky factor of H^-1), so the ratio measures the
implementation, not the algorithm. Both get the same H = X^T X; its time is
reported on its own. Every function is warmed up, then run in interleaved
rounds; medians and ratios from the same run. The results are compared
(keep-mask agreement, relative weight difference). Peak memory: XLA's
memory analysis of the compiled program (arguments + outputs + temporaries)
and tracemalloc's peak for the NumPy run.

  python benchmarks/oneshot.py
  python benchmarks/oneshot.py --repeats 5 --size 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import oneshot

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def numpy_sparsegpt(w: np.ndarray, h: np.ndarray, sparsity=None, nm=None, block_size=128,
                    dampening=0.01) -> tuple[np.ndarray, np.ndarray]:
  """SparseGPT in float32 NumPy with the reference code's lazy block updates."""
  w = w.T.astype(np.float32).copy()
  h = h.astype(np.float32).copy()
  d = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h[np.diag_indices(d)] += dampening * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
  keep = np.ones(w.shape, bool)
  for start in range(0, d, block_size):
    stop = min(start + block_size, d)
    block, u_block = w[:, start:stop].copy(), u[start:stop, start:stop]
    errors = np.zeros_like(block)
    block_keep = np.ones(block.shape, bool)
    if nm is None:
      saliency = block ** 2 / np.diag(u_block)[None, :] ** 2
      cut = np.sort(saliency.ravel())[int(saliency.size * sparsity)]
      block_keep = saliency >= cut
    for j in range(stop - start):
      if nm is not None and j % nm[1] == 0:
        group = block[:, j:j + nm[1]] ** 2 / np.diag(u_block)[None, j:j + nm[1]] ** 2
        drop = np.argsort(group, axis=1, kind="stable")[:, :nm[1] - nm[0]]
        np.put_along_axis(block_keep[:, j:j + nm[1]], drop, False, axis=1)
      error = np.where(block_keep[:, j], 0.0, block[:, j]) / u_block[j, j]
      block[:, j:] -= np.outer(error, u_block[j, j:])
      errors[:, j] = error
    w[:, start:stop] = np.where(block_keep, block, 0.0)
    w[:, stop:] -= errors @ u[start:stop, stop:]
    keep[:, start:stop] = block_keep
  return w.T, keep.T


def _median_times(fns: dict, repeats: int) -> dict[str, float]:
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=1024, help="layer is size x size")
  parser.add_argument("--tokens", type=int, default=128 * 256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(args.tokens, args.size)).astype(np.float32)
       @ (np.eye(args.size, dtype=np.float32) + rng.normal(size=(args.size,) * 2).astype(np.float32) / 32))
  w = rng.normal(size=(args.size, args.size)).astype(np.float32) / np.sqrt(args.size)
  start = time.perf_counter()
  h = jax.block_until_ready(jnp.asarray(x).T @ jnp.asarray(x))
  print(f"H = X^T X ({args.tokens} x {args.size} tokens): {time.perf_counter() - start:.2f} s")
  h_np = np.asarray(h)
  w_jax = jnp.asarray(w)
  print(f"{jax.devices()[0].platform}: layer {args.size}x{args.size}, {args.repeats} rounds, median s")
  for label, target in (("50%", dict(sparsity=0.5)), ("2:4", dict(nm=(2, 4)))):
    compiled = oneshot.sparsegpt.lower(w_jax, h, **target).compile()
    jax.block_until_ready(oneshot.sparsegpt(w_jax, h, **target))
    fns = {
        "sparsejax": lambda: jax.block_until_ready(oneshot.sparsegpt(w_jax, h, **target)),
        "numpy": lambda: numpy_sparsegpt(w, h_np, **target),
    }
    medians = _median_times(fns, args.repeats)
    ours, ours_keep = (np.asarray(a) for a in oneshot.sparsegpt(w_jax, h, **target))
    tracemalloc.start()
    theirs, theirs_keep = numpy_sparsegpt(w, h_np, **target)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    memory = compiled.memory_analysis()
    xla_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes) if memory is not None else float("nan")
    agree = float(np.mean(ours_keep == theirs_keep))
    diff = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    print(f"  {label}: sparsejax {medians['sparsejax']:.3f} s, numpy {medians['numpy']:.3f} s, "
          f"numpy/sparsejax {medians['numpy'] / medians['sparsejax']:.1f}x | masks agree on "
          f"{agree:.4%}, relative weight difference {diff:.1e} | peak memory: sparsejax "
          f"{xla_peak / 2**20:.1f} MiB (XLA), numpy {numpy_peak / 2**20:.1f} MiB (tracemalloc)")
  small = rng.normal(size=(64, 32)), rng.normal(size=(256, 64))
  expected, _ = reference.sparsegpt(small[0], small[1], sparsity=0.5)
  got, _ = oneshot.sparsegpt(jnp.asarray(small[0], jnp.float32),
                             jnp.asarray(small[1].T @ small[1], jnp.float32), sparsity=0.5)
  print(f"check against tests/reference.py (64x32): max |difference| "
        f"{np.abs(np.asarray(got) - expected).max():.1e}")


if __name__ == "__main__":
  main()
