"""Benchmark: the learned-mask methods' training steps vs the dense step.

The MLP, batch and loss of benchmarks/step.py (~2M parameters); each
variant one jitted step (value_and_grad + update + apply_updates, params and
opt_state donated), the model seeing `method.forward(params, opt_state)`:

  dense    : optax.adam(1e-3)
  maskllm  : MaskLLM(2, 4, prior='magnitude').wrap(None, adam(1e-3)): weights
             frozen, Gumbel-softmax soft masks over the 6 candidates of every
             group of 4, logits learned through them
  jackpots : LotteryJackpots(0.9).wrap(None, sgd(0.1, momentum 0.9)): weights
             frozen, top-k of the scores per kernel and short-restriction
             swaps on every step
  bip      : BiP(0.9, lr2=1e-4).wrap(adam(1e-3), adam(1e-3)): lower-level
             weight steps and upper-level score steps (top-k per kernel)
             alternating, so the time per step is their average

Blocks of --block steps (even: BiP's two levels equally) interleaved per
round, the order rotated; reported: median and min ms/step and the median
of the per-round ratios to dense (the cost of one step of each method in
dense steps).

  python benchmarks/learned.py
  python benchmarks/learned.py --rounds 20 --block 10
"""

from __future__ import annotations

import statistics

import optax

import sparsejax
from step import Runner
from step import model_and_batch
from step import model_parser

NUM_STEPS = 10**6  # the methods' schedules: far beyond the benchmark's steps


def runners(model, params) -> list[Runner]:
  """The dense step and one step per learned-mask method."""
  maskllm = sparsejax.MaskLLM(2, 4, num_steps=NUM_STEPS)
  jackpots = sparsejax.LotteryJackpots(0.9, num_steps=NUM_STEPS)
  bip = sparsejax.BiP(0.9, lr2=1e-4, num_steps=NUM_STEPS)
  return [
      Runner("dense", model, optax.adam(1e-3), params),
      Runner("maskllm", model, maskllm.wrap(None, optax.adam(1e-3)), params,
             masked_forward=True, forward=maskllm.forward),
      Runner("jackpots", model, jackpots.wrap(None, optax.sgd(0.1, momentum=0.9)), params,
             masked_forward=True, forward=jackpots.forward),
      Runner("bip", model, bip.wrap(optax.adam(1e-3), optax.adam(1e-3)), params,
             masked_forward=True, forward=bip.forward),
  ]


def main():
  parser = model_parser(__doc__)
  parser.add_argument("--block", type=int, default=10, help="steps per timed block, even")
  parser.add_argument("--rounds", type=int, default=20, help="interleaved blocks per variant")
  parser.add_argument("--warmup", type=int, default=10, help="untimed steps after compiling")
  args = parser.parse_args()
  if args.block % 2 or args.warmup % 2:
    parser.error("--block and --warmup must be even (BiP alternates two kinds of step)")
  model, x, y, params, _ = model_and_batch(args)
  variants = runners(model, params)
  for r in variants:  # compile + warm up
    r.run(args.warmup, x, y)
  times = {r.name: [] for r in variants}
  ratios = {r.name: [] for r in variants}
  for i in range(args.rounds):
    k = i % len(variants)
    round_t = {r.name: r.run(args.block, x, y) / args.block
               for r in variants[k:] + variants[:k]}
    for name, t in round_t.items():
      times[name].append(t)
      ratios[name].append(t / round_t["dense"])
  print(f"\nms/step over {args.rounds} interleaved blocks of {args.block} steps; "
        f"'/ dense' = median of per-round ratios")
  print(f"{'variant':<10} {'median':>9} {'min':>9} {'/ dense':>8} {'steps/s':>9}")
  print("-" * 50)
  for r in variants:
    med = statistics.median(times[r.name])
    print(f"{r.name:<10} {med * 1e3:9.3f} {min(times[r.name]) * 1e3:9.3f} "
          f"{statistics.median(ratios[r.name]):8.3f} {1 / med:9.1f}")


if __name__ == "__main__":
  main()
