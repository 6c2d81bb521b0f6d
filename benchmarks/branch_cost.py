"""Benchmark: what a branch that does not run costs a step on XLA:CPU.

XLA:CPU allocates and frees, on every execution of a compiled program, a
small buffer for each value of each reduction's combiner in the program,
including the reductions of a `lax.cond` branch that is not taken. A GMP
step that decides the mask recompute inside the program (the default,
`tx.update(grads, state, params)`) holds the whole top-k selection in such
a branch, so it pays for the selection's reductions on every step.

Two measurements, each against a baseline measured in the same run:

  untaken branch : a small program (x + 1 on 1000 floats, 0.8M-float
      output) with a `lax.cond` whose untaken branch holds N `jnp.sum`
      reductions, N = 0, 250, 1000; median time per call, and the added
      microseconds per reduction
  selection      : the MLP of benchmarks/step.py (or --hidden ...); the
      reductions (HLO instructions with a combiner, `to_apply=`) in the GMP
      step deciding the recompute inside and in the host-dispatched step
      (`recompute=False`), and the median time per call of each, steps
      between mask updates, interleaved; their difference is what the
      in-step decision costs every step

  python benchmarks/branch_cost.py
  python benchmarks/branch_cost.py --hidden $(printf '256 %.0s' $(seq 30))
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sparsejax
from step import make_step
from step import model_and_batch
from step import model_parser


def _untaken_branch(reductions: int):
  """A jitted f(x, w, c): x + 1 and w scaled by a `lax.cond` that is never taken
  (c >= 0), whose other branch holds `reductions` separate sums."""
  def branch(w, c):
    total = jnp.float32(0)
    for i in range(reductions):
      # optimization_barrier keeps XLA from merging the sums into one.
      total = total + jax.lax.optimization_barrier(jnp.sum(jnp.sin(w[i % 64] * c + i)))
    return total

  def f(x, w, c):
    scale = jax.lax.cond(c < 0, lambda: branch(w, c), lambda: jnp.float32(2))
    return x + 1, w * scale

  return jax.jit(f)


def _per_call_ms(fns: dict, args: dict, rounds: int, calls: int) -> dict:
  """Median ms per call of each function, timed in interleaved blocks of `calls`."""
  times = {name: [] for name in fns}
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fn(*args[name])
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / calls * 1e3)
  return {name: statistics.median(ts) for name, ts in times.items()}


def reductions_in(jitted, *args) -> int:
  """HLO instructions with a combiner (reductions) in the compiled program."""
  return jitted.lower(*args).compile().as_text().count("to_apply=")


def main():
  parser = model_parser(__doc__)
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args()

  print("untaken branch (a program whose own work is ~0.2 ms):")
  x = jnp.ones(1000)
  w = jax.random.normal(jax.random.key(0), (64, 12_500))
  counts = (0, 250, 1000)
  fns = {n: _untaken_branch(n) for n in counts}
  call_args = {n: (x, w, jnp.int32(1)) for n in counts}
  ms = _per_call_ms(fns, call_args, args.rounds, 20)
  for n in counts:
    extra = "" if n == 0 else f"  (+{(ms[n] - ms[0]) * 1e3 / n:.2f} us per reduction)"
    print(f"  {n:5d} reductions in the branch: {ms[n] * 1e3:8.1f} us per call{extra}")

  model, x, y, params, _ = model_and_batch(args)
  tx = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.9, step=0)).wrap(
      optax.adam(1e-3))
  state = tx.init(params)
  # The one-shot masks, so that both programs run steps between mask updates.
  state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params, recompute=True)[1]
  steps = {"in the step": make_step(model, tx), "host-dispatched": make_step(model, tx, recompute=False)}
  print("\nGMP steps between mask updates (the selection is not run):")
  copies = {}
  for name, step in steps.items():
    copies[name] = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)]
    print(f"  {name:<16} reductions in the program: {reductions_in(step, *copies[name], x, y)}")

  # The steps donate params and state: each call feeds on the last one's output.
  def advance(name):
    def call(*_):
      p, s, loss = steps[name](*copies[name], x, y)
      copies[name][:] = [p, s]
      return loss
    return call

  ms = _per_call_ms({n: advance(n) for n in steps}, {n: () for n in steps}, args.rounds, 10)
  host = ms["host-dispatched"]
  for name in steps:
    print(f"  {name:<16} {ms[name]:8.3f} ms per step ({ms[name] / host:.3f} of host-dispatched)")


if __name__ == "__main__":
  main()
