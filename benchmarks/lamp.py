"""Benchmark: LAMP masks vs global magnitude masks vs the authors' rule in NumPy.

`compute_masks(..., allocation='lamp')` (sort per leaf, one exact global
top-k over the LAMP scores) against `allocation='global'` (the same top-k on
|w|, no sort) and against a NumPy port of the authors' `_normalize_scores`
+ global threshold (tests/reference.py `lamp_masks`, float64), on the
kernels of a ResNet-50-sized MLP stack. Masks are checked equal first.

  python benchmarks/lamp.py                 # 4 kernels, 2**22 weights in all
  python benchmarks/lamp.py --log2n 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsejax  # noqa: E402
from tests import reference  # noqa: E402

SPARSITY = 0.9


def _params(log2n: int, seed: int):
  rng = np.random.default_rng(seed)
  n = 2 ** log2n
  shapes = [(n // 1024 // 2, 1024), (1024, n // 1024 // 4), (n // 1024 // 8, 1024),
            (1024, n // 1024 // 8)]
  return {f"layer_{i}": {"kernel": (rng.normal(size=s) * (i + 1)).astype(np.float32)}
          for i, s in enumerate(shapes)}


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--log2n", type=int, default=22)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  params = _params(args.log2n, args.seed)
  names = sorted(params)
  lamp = jax.jit(lambda p: sparsejax.compute_masks(p, SPARSITY, allocation="lamp"))
  glob = jax.jit(lambda p: sparsejax.compute_masks(p, SPARSITY, allocation="global"))
  got = lamp(params)
  want = reference.lamp_masks([params[n]["kernel"] for n in names], SPARSITY)
  for name, expected in zip(names, want):
    np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), expected, err_msg=name)
  jax.block_until_ready(glob(params))
  t_lamp = _median(lambda: lamp(params), args.repeats)
  t_glob = _median(lambda: glob(params), args.repeats)
  t_ref = _median(lambda: reference.lamp_masks([params[n]["kernel"] for n in names], SPARSITY),
                  max(1, args.repeats // 2))
  total = sum(params[n]["kernel"].size for n in names)
  print(f"{total} weights in {len(names)} kernels, sparsity {SPARSITY}; masks equal the "
        f"authors' rule; devices: {jax.devices()[0].platform}")
  print(f"lamp           {1e3 * t_lamp:9.1f} ms")
  print(f"global |w|     {1e3 * t_glob:9.1f} ms   lamp / global = {t_lamp / t_glob:.2f}x")
  print(f"authors' rule  {1e3 * t_ref:9.1f} ms   lamp / authors' rule (NumPy) = "
        f"{t_lamp / t_ref:.2f}x")


if __name__ == "__main__":
  main()
