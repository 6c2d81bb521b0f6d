"""Benchmark: RigL (drop and grow every 100 steps) vs the dense step and vs GMP.

The ~2M-parameter MLP of benchmarks/step.py, adam(1e-3), batch 256:

  dense : optax.adam
  rigl  : sparsejax.DropAndGrow(ConstantSchedule(0.9), update_every=100)
          .wrap(adam), forward on `ste_masked_params` (the dense gradient
          RigL grows by), as the trainer runs it: two compiled programs,
          `update(..., regrow=False)` between updates and `regrow=True` on
          the update step, chosen on the host
  rigl (in-jit) : the same with the update step decided inside the
          program (`lax.cond`, the default for any caller)
  set (in-jit) : SET (random growth; the optimizer step also on the
          update steps), decided inside the program
Timed in blocks of 100 steps, so each block holds one drop-and-grow update
(amortised, as the target asks).

and, alone, one drop-and-grow update (`jit(drop_and_grow)` on the MLP's
kernels, RigL's 30% drop fraction) vs one GMP mask update
(`jit(GradualMagnitudePruning.masks_at)` at mid-schedule). Blocks are
interleaved per round; ratios are medians of per-round ratios.

Memory (first, from the compiled programs): the dense step and RigL's three
programs (between updates, the update step, and the update decided in the
step), params and opt_state donated; temporaries and peak from XLA's memory
analysis, as ratios to the dense step's (`step.compiled_memory`), and
`jit(drop_and_grow)` alone. `--memory-only` stops there.

  python benchmarks/dst.py
  python benchmarks/dst.py --rounds 10
  python benchmarks/dst.py --memory-only
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sparsejax
from step import HostDispatch
from step import Runner
from step import compiled_memory
from step import model_and_batch
from step import model_parser
from step import print_memory
from step import step_memory


def _times(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def main():
  parser = model_parser(__doc__)
  parser.add_argument("--rounds", type=int, default=6, help="interleaved blocks of 100 steps")
  parser.add_argument("--update-repeats", type=int, default=21)
  parser.add_argument("--memory-only", action="store_true",
                      help="print the compiled steps' memory and stop (no timing)")
  args = parser.parse_args()
  model, x, y, params, _ = model_and_batch(args)

  rigl = sparsejax.DropAndGrow(sparsejax.ConstantSchedule(0.9), end_step=10**6,
                               update_every=100, key=jax.random.key(1))
  tx = rigl.wrap(optax.adam(1e-3))
  ste = sparsejax.ste_masked_params
  rows = {"dense": step_memory(model, optax.adam(1e-3), params, x, y),
          "rigl, between updates (regrow=False)": step_memory(model, tx, params, x, y, True, ste,
                                                               regrow=False),
          "rigl, update step (regrow=True)": step_memory(model, tx, params, x, y, True, ste,
                                                          regrow=True),
          "rigl, update decided in the step": step_memory(model, tx, params, x, y, True, ste)}
  initial = rigl.initial(params)
  rows["jit(drop_and_grow) alone"] = compiled_memory(
      jax.jit(lambda w, m, g: sparsejax.drop_and_grow(w, m, g, 0.3)), params, initial, params)
  print()
  print_memory(rows)
  if args.memory_only:
    return
  # SET (random growth, the optimizer step taken on the update steps too).
  set_ = dataclasses.replace(rigl, grow="random")
  runners = [Runner("dense", model, optax.adam(1e-3), params),
             HostDispatch("rigl", model, rigl.wrap(optax.adam(1e-3)), params,
                          rigl.is_update_step, "regrow", True, sparsejax.ste_masked_params),
             Runner("rigl (in-jit)", model, rigl.wrap(optax.adam(1e-3)), params,
                    masked_forward=True, forward=sparsejax.ste_masked_params),
             Runner("set (in-jit)", model, set_.wrap(optax.adam(1e-3)), params,
                    masked_forward=True, forward=sparsejax.ste_masked_params)]
  for r in runners:  # compile; the next block of 100 starts at a count that is a multiple of 100
    r.run(100, x, y)
  ratios = {r.name: [] for r in runners}
  times = {r.name: [] for r in runners}
  for i in range(args.rounds):
    k = i % len(runners)
    block = {r.name: r.run(100, x, y) / 100 for r in runners[k:] + runners[:k]}
    for name, t in block.items():
      times[name].append(t)
      ratios[name].append(t / block["dense"])
  masks = sparsejax.state_masks(runners[1].opt_state)
  changed = any(bool(jnp.any(a != b)) for a, b in zip(
      jax.tree.leaves(masks), jax.tree.leaves(rigl.initial(params))))
  kernels = jax.tree.leaves(masks)
  density = sum(int(m.sum()) for m in kernels) / sum(m.size for m in kernels)

  # One update alone: drop-and-grow vs a GMP mask recompute, same params.
  p = runners[0].params
  grads = jax.tree.map(lambda w: jnp.abs(jax.random.normal(jax.random.key(2), w.shape)), p)
  gmp = sparsejax.GradualMagnitudePruning(sparsejax.PolynomialSchedule(
      0.0, 0.9, begin_step=0, end_step=10**6, update_frequency=10))
  gmp_update = jax.jit(lambda w, s, m: gmp.masks_at(w, s, m))
  dg_update = jax.jit(lambda w, m, g: sparsejax.drop_and_grow(w, m, g, 0.3))
  step = jnp.int32(500_000)
  dg_t, gmp_t = [], []
  for _ in range(args.update_repeats):
    dg_t += _times(dg_update, p, masks, grads, repeats=1)
    gmp_t += _times(gmp_update, p, step, masks, repeats=1)
  update_ratio = statistics.median(a / b for a, b in zip(dg_t, gmp_t))

  print(f"\nms/step, {args.rounds} interleaved blocks of 100 steps (one drop-and-grow each):")
  for name, ts in times.items():
    print(f"  {name:<26} median {statistics.median(ts) * 1e3:8.3f}   min {min(ts) * 1e3:8.3f}")
  print(f"  rigl kernel density after the updates: {density:.4f} (masks changed: {changed})")
  print(f"one drop-and-grow update: {statistics.median(dg_t) * 1e3:.3f} ms; one GMP mask update: "
        f"{statistics.median(gmp_t) * 1e3:.3f} ms")
  print()
  print(f"rigl step / dense step (amortised, delta_T = 100) = "
        f"{statistics.median(ratios['rigl']):.2f} (target <= 1.05)")
  print(f"rigl (in-jit) step / dense step = {statistics.median(ratios['rigl (in-jit)']):.2f}, "
        f"set (in-jit) = {statistics.median(ratios['set (in-jit)']):.2f}")
  print(f"drop-and-grow update / GMP mask update = {update_ratio:.2f} (target <= 3)")


if __name__ == "__main__":
  main()
