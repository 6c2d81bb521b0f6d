"""Benchmark: sparsejax top-k / N:M masks vs a sort-based top-k and one elementwise pass.

All functions are jitted, compiled and warmed up first; then they are run in
interleaved rounds (one call of each per round) and the median per function is
reported. Ratios are against baselines measured in the same run: one
elementwise pass, and one read pass (`jnp.sum(w)`), the baseline of the
selection target (top-k <= 8x one sum pass at 16M and 64M weights). The
temporaries are XLA's (`compiled.memory_analysis().temp_size_in_bytes`), as
a multiple of the weights' bytes. The top-k ranks |w| given as
`elementwise_scores(jnp.abs, w)` (computed inside each pass, as sparsejax's
magnitude pruning does); `topk_mask(jnp.abs(w))` is timed too: there XLA
stores |w| before the selection reads it. The top-k / sum ratio is printed
twice: from the interleaved rounds of every function, and from rounds of
the sum and the top-k alone ("paired"). In the first, the elementwise
functions' 64 MB+ outputs are unmapped when freed, so the allocations that
follow them (the top-k's mask and temporaries) fault their pages in again,
which a training loop calling one program does not see.

  python benchmarks/topk.py                      # 2**20 and 2**24 weights
  python benchmarks/topk.py --sizes 20 24 26     # and 2**26 (the sort is skipped above 2**24)
  python benchmarks/topk.py --sizes 20 --repeats 9 --sort-repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax

SPARSITY = 0.9


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def make_fns(k: int):
  @jax.jit
  def topk(w):  # |w| computed inside each pass of the selection, never stored
    return sparsejax.topk_mask(sparsejax.elementwise_scores(jnp.abs, w), SPARSITY)

  @jax.jit
  def topk_array(w):  # |w| as an array of the program: stored before the selection reads it
    return sparsejax.topk_mask(jnp.abs(w), SPARSITY)

  @jax.jit
  def sort_based(w):
    idx = jnp.argsort(-jnp.abs(w).ravel())
    return jnp.zeros(w.size, bool).at[idx[:k]].set(True).reshape(w.shape)

  @jax.jit
  def elementwise(w):
    return w * (w > 0)

  @jax.jit
  def nm(w):
    return sparsejax.nm_mask(jnp.abs(w), 2, 4)

  @jax.jit
  def compare(w):  # info only: an elementwise pass with a 1-byte (bool) output
    return w > 0

  @jax.jit
  def read(w):  # one read pass: the baseline of the selection target
    return jnp.sum(w)

  @jax.jit
  def topk_given(scores):  # the selection alone, scores computed by the caller
    return sparsejax.topk_mask(scores, SPARSITY)

  return {"sparsejax top-k": topk, "sort-based": sort_based,
          "elementwise": elementwise, "nm 2:4": nm, "w>0 (bool)": compare,
          "sum": read, "top-k of given |w|": topk_given, "top-k of |w| array": topk_array}


def temp_bytes(fn, *args) -> int:
  """XLA's temporaries for one call of a jitted `fn` (buffers besides inputs and outputs)."""
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def bench_size(log2n: int, repeats: int, sort_repeats: int, seed: int, sort_max: int
               ) -> dict[str, float]:
  n = 2 ** log2n
  k = int(round((1.0 - SPARSITY) * n))
  w = jax.random.normal(jax.random.key(seed), (n // 1024, 1024), jnp.float32)
  scores = jnp.abs(w)
  jax.block_until_ready((w, scores))
  fns = make_fns(k)
  if log2n > sort_max:
    del fns["sort-based"]
  args = {name: (scores if name == "top-k of given |w|" else w) for name in fns}

  # Compile + warm up (once each; the sort is slow, so its warm-up is the compile run).
  for name, fn in fns.items():
    jax.block_until_ready(fn(args[name]))
    if name != "sort-based":
      jax.block_until_ready(fn(args[name]))

  # Correctness check outside timing: same kept count (and, with continuous
  # random weights and no ties, the same mask).
  m_topk = np.asarray(fns["sparsejax top-k"](w))
  if "sort-based" in fns:
    m_sort = np.asarray(fns["sort-based"](w))
  else:  # NumPy's stable argsort: ties to the lower index, as the top-k
    m_sort = np.zeros(n, bool)
    m_sort[np.argsort(-np.abs(np.asarray(w)).ravel(), kind="stable")[:k]] = True
    m_sort = m_sort.reshape(w.shape)
  c_topk, c_sort = int(m_topk.sum()), int(m_sort.sum())
  same = bool((m_topk == m_sort).all())
  print(f"  check n=2**{log2n}: kept top-k={c_topk}, sort={c_sort}, expected k={k}, "
        f"identical masks={same}")
  if c_topk != c_sort or c_topk != k:
    raise SystemExit(f"count mismatch at n=2**{log2n}: {c_topk} vs {c_sort} (k={k})")
  if not (np.asarray(fns["top-k of given |w|"](scores)) == m_topk).all():
    raise SystemExit(f"top-k of given scores differs at n=2**{log2n}")
  if not (np.asarray(fns["top-k of |w| array"](w)) == m_topk).all():
    raise SystemExit(f"top-k of the |w| array differs at n=2**{log2n}")
  m_nm = np.asarray(fns["nm 2:4"](w))
  if int(m_nm.sum()) != n // 2:
    raise SystemExit(f"nm 2:4 kept {int(m_nm.sum())}, expected {n // 2}")
  del m_topk, m_sort, m_nm

  times: dict[str, list[float]] = {name: [] for name in fns}
  for r in range(repeats):  # interleaved rounds
    for name, fn in fns.items():
      if name == "sort-based" and r >= sort_repeats:
        continue
      times[name].append(_time(fn, args[name]))
  out = {name: statistics.median(ts) for name, ts in times.items()}
  out["sort-based"] = out.get("sort-based", float("nan"))
  # The selection target, timed in rounds of the sum and the top-k alone: in
  # the rotation above, the 64 MB+ outputs of the elementwise functions are
  # unmapped when freed, so the top-k's next allocations fault their pages in.
  paired: dict[str, list[float]] = {"sum": [], "top-k": []}
  for _ in range(repeats):
    paired["sum"].append(_time(fns["sum"], w))
    paired["top-k"].append(_time(fns["sparsejax top-k"], w))
  out["paired sum"] = statistics.median(paired["sum"])
  out["paired top-k"] = statistics.median(paired["top-k"])
  out["temp top-k"] = temp_bytes(fns["sparsejax top-k"], w) / w.nbytes
  out["temp given"] = temp_bytes(fns["top-k of given |w|"], scores) / w.nbytes
  out["temp array"] = temp_bytes(fns["top-k of |w| array"], w) / w.nbytes
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[20, 24],
                      help="log2 of the number of weights (default: 20 24)")
  parser.add_argument("--repeats", type=int, default=7,
                      help="interleaved rounds for the fast functions (default 7)")
  parser.add_argument("--sort-repeats", type=int, default=2,
                      help="rounds that also time the sort-based top-k (default 2)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sort-max", type=int, default=24,
                      help="largest log2 size that also times the sort-based top-k (default 24)")
  args = parser.parse_args()
  sort_repeats = max(1, min(args.sort_repeats, args.repeats))

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, sparsity {SPARSITY}, "
        f"median of {args.repeats} rounds ({sort_repeats} for the sort)")
  results = {}
  for log2n in args.sizes:
    results[log2n] = bench_size(log2n, args.repeats, sort_repeats, args.seed, args.sort_max)

  names = ["elementwise", "w>0 (bool)", "sparsejax top-k", "nm 2:4", "sort-based"]
  print()
  header = f"{'n':>8} " + " ".join(f"{nm_:>16}" for nm_ in names)
  print(header + f" {'sort/topk':>10} {'topk/elem':>10} {'nm/elem':>8} {'topk/bool':>10}")
  print("-" * (len(header) + 42))
  for log2n, t in results.items():
    row = f"{'2**' + str(log2n):>8} " + " ".join(f"{t[nm_] * 1e3:13.2f} ms" for nm_ in names)
    row += (f" {t['sort-based'] / t['sparsejax top-k']:10.1f}"
            f" {t['sparsejax top-k'] / t['elementwise']:10.2f}"
            f" {t['nm 2:4'] / t['elementwise']:8.2f}"
            f" {t['sparsejax top-k'] / t['w>0 (bool)']:10.1f}")
    print(row)
  print("(elementwise = w * (w > 0), float32 out: the baseline of the targets; "
        "w>0 (bool) and topk/bool are for information only)")
  print()
  print(f"{'n':>8} {'sum':>12} {'top-k':>12} {'top-k/sum':>10} {'paired':>10} {'|w| array':>12}"
        f" {'array/sum':>10} {'given |w|':>12} {'given/sum':>10} {'temp top-k':>11}"
        f" {'temp array':>11} {'temp given':>11}")
  print("-" * 141)
  for log2n, t in results.items():
    print(f"{'2**' + str(log2n):>8} {t['sum'] * 1e3:9.2f} ms {t['sparsejax top-k'] * 1e3:9.2f} ms"
          f" {t['sparsejax top-k'] / t['sum']:10.1f} {t['paired top-k'] / t['paired sum']:10.1f}"
          f" {t['top-k of |w| array'] * 1e3:9.2f} ms"
          f" {t['top-k of |w| array'] / t['sum']:10.1f} {t['top-k of given |w|'] * 1e3:9.2f} ms"
          f" {t['top-k of given |w|'] / t['sum']:10.1f} {t['temp top-k']:10.2f}x"
          f" {t['temp array']:10.2f}x {t['temp given']:10.2f}x")
  print("(sum = jnp.sum(w), one read pass; top-k = topk_mask(elementwise_scores(jnp.abs, w)), "
        "|w| computed inside each pass; |w| array = topk_mask(jnp.abs(w)), |w| stored by the "
        "program first; given |w| = topk_mask of a precomputed |w|; temp = XLA's temporaries / "
        "the weights' bytes; paired = top-k/sum timed in rounds of those two alone; target: "
        "top-k <= 8x sum at 2**24 and 2**26, temporaries <= 1x)")
  print()
  big = max(results)
  t = results[big]
  for log2n, tt in results.items():
    print(f"paired at n=2**{log2n}: top-k {tt['paired top-k'] * 1e3:.2f} ms / sum "
          f"{tt['paired sum'] * 1e3:.2f} ms = {tt['paired top-k'] / tt['paired sum']:.1f}")
  print(f"at n=2**{big}: topk/sum = {t['sparsejax top-k'] / t['sum']:.1f}, paired "
        f"{t['paired top-k'] / t['paired sum']:.1f} (target <= 8), "
        f"sort/topk = {t['sort-based'] / t['sparsejax top-k']:.1f} (target >= 30), "
        f"topk/elementwise = {t['sparsejax top-k'] / t['elementwise']:.2f} (target <= 10), "
        f"nm/elementwise = {t['nm 2:4'] / t['elementwise']:.2f} (target <= 3)")


if __name__ == "__main__":
  main()
