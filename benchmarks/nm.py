"""Benchmark: sparsejax N:M masks vs one elementwise pass and a sort-based per-group reference.

A (4096, 4096) float32 kernel (16M weights), groups of M along axis 0 (a
Dense kernel's input axis). Every function is jitted, compiled and warmed up,
then run in interleaved rounds (one call of each per round); medians are
reported, and ratios against the baselines measured in the same run. The
target (DESIGN.md) is N:M mask <= 3x one elementwise pass. The pass that sets
the target is |w| > 1 (reads the weights, writes a bool mask: the same bytes
as the N:M mask); w * (w > 0) (a float output, the baseline of
benchmarks/topk.py) is printed too, and is slower on CPU because it writes
4x the bytes.

  python benchmarks/nm.py
  python benchmarks/nm.py --patterns 2:4 1:8 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax

SHAPE = (4096, 4096)
TARGET = 3.0


def _pattern(text: str) -> tuple[int, int]:
  try:
    n, m = (int(k) for k in text.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a pattern is N:M, like 2:4, got {text!r}") from None
  if not 1 <= n <= m or SHAPE[0] % m:
    raise argparse.ArgumentTypeError(f"need 1 <= N <= M and M dividing {SHAPE[0]}, got {text}")
  return n, m


def make_fns(n: int, m: int) -> dict:
  @jax.jit
  def elementwise(w):  # one pass, bool out: what the target is measured against
    return jnp.abs(w) > 1.0

  @jax.jit
  def elementwise_float(w):  # the baseline of benchmarks/topk.py
    return w * (w > 0)

  @jax.jit
  def nm(w):
    return sparsejax.nm_mask(jnp.abs(w), n, m, axis=0)

  @jax.jit
  def sort_based(w):  # sort each group, scatter True at its n largest
    groups = jnp.abs(w).reshape(w.shape[0] // m, m, w.shape[1])
    order = jnp.argsort(-groups, axis=1, stable=True)
    keep = jnp.put_along_axis(jnp.zeros(groups.shape, bool), order[:, :n], True, axis=1,
                              inplace=False)
    return keep.reshape(w.shape)

  return {"elementwise": elementwise, "elementwise_float": elementwise_float, "nm": nm,
          "sort-based": sort_based}


def _time(fn, w) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(w))
  return time.perf_counter() - start


def bench(n: int, m: int, w: jax.Array, repeats: int) -> dict[str, float]:
  fns = make_fns(n, m)
  for fn in fns.values():  # compile, then warm up
    jax.block_until_ready(fn(w))
    jax.block_until_ready(fn(w))
  mask, reference = np.asarray(fns["nm"](w)), np.asarray(fns["sort-based"](w))
  counts = mask.reshape(SHAPE[0] // m, m, SHAPE[1]).sum(axis=1)
  if not (np.all(counts == n) and np.array_equal(mask, reference)):
    raise SystemExit(f"{n}:{m}: sparsejax and the sort-based masks differ")
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_time(fn, w))
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--patterns", type=_pattern, nargs="+",
                      default=[(2, 4), (1, 8), (1, 4), (2, 8), (4, 8), (1, 16)],
                      help="N:M patterns (default: 2:4 1:8 1:4 2:8 4:8 1:16)")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  w = jax.random.normal(jax.random.key(args.seed), SHAPE, jnp.float32)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: N:M masks of a {SHAPE} float32 "
        f"kernel ({w.size / 2**20:.0f}M weights) along axis 0, median of {args.repeats} rounds; "
        f"masks checked equal to the sort-based reference")
  print(f"{'pattern':>8} {'|w|>1':>10} {'w*(w>0)':>10} {'nm_mask':>10} {'sort-based':>11} "
        f"{'nm/(|w|>1)':>11} {'nm/(w*(w>0))':>13} {'sort/nm':>8}  target nm/(|w|>1) <= {TARGET:g}")
  for n, m in args.patterns:
    t = bench(n, m, w, args.repeats)
    ratio = t["nm"] / t["elementwise"]
    print(f"{f'{n}:{m}':>8} {t['elementwise'] * 1e3:7.2f} ms {t['elementwise_float'] * 1e3:7.2f} ms "
          f"{t['nm'] * 1e3:7.2f} ms {t['sort-based'] * 1e3:8.2f} ms {ratio:11.2f} "
          f"{t['nm'] / t['elementwise_float']:13.2f} {t['sort-based'] / t['nm']:8.1f}  "
          f"{'met' if ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
  main()
