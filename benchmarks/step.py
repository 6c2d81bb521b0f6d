"""Benchmark: a gradual-magnitude-pruning training step vs the dense step.

A ~2M-parameter Flax Linen MLP, batch of random data, softmax cross entropy,
optax.adam(1e-3). Each variant is one jitted step (value_and_grad + update +
apply_updates) with params and opt_state donated:

  dense    : optax.adam
  gmp      : GradualMagnitudePruning(PolynomialSchedule(0 -> 0.9, every 10 steps))
             .wrap(adam); blocks of --block steps (a multiple of 10) so the
             average includes the mask recomputes
  between  : GradualMagnitudePruning(OneShotSchedule(0.9, step=0)).wrap(adam),
             timed after its one mask update: steps between mask updates
  masked forward : as `between`, with the forward pass on
             `sparsejax.masked_params(params, opt_state)`, the README's step
             (safe against transforms chained after the wrapper)
  between (host), masked forward (host) : the same two, compiled with
             `recompute=False` on the host (the mask update on step 0 with
             `recompute=True`): the steps a training loop that knows the
             step runs between mask updates; against their in-step twins
             they measure what deciding the recompute in the step costs on
             every step (XLA:CPU allocates, per execution, a buffer for each
             value of every reduction in the program, including those of
             the selection's branch that does not run: see
             docs/guides/performance.md)
  ... packed : gmp and masked forward with `packed_masks=True` (masks at 1
             bit per weight in the optimizer state), reported against their
             bool-mask twins (target <= 1.10), with the state's mask bytes

  gmp (host) : gmp compiled as two programs chosen on the host,
             `update(..., recompute=bool(schedule.is_update_step(t)))`: the
             steps between recomputes carry no branch

Blocks of the variants are interleaved per round (order rotated); reported:
median and min ms/step, and the median of the per-round ratios to dense.
With --diagnose it also times, in the same run, the mask recompute alone
(jit(masks_at)) and the gmp step with masks recomputed on every step.

Memory (first, from the compiled programs, no timing): each variant's step
compiled with params and opt_state donated, from XLA's memory analysis:
temporaries (`temp_size_in_bytes`) and the peak (arguments + temporaries +
outputs not aliased to a donated argument), as ratios to the dense step's
compiled in the same run; also N:M SR-STE 2:4 and `jit(masks_at)` alone
(the selection's own temporaries). `--memory-only` stops there.

  python benchmarks/step.py
  python benchmarks/step.py --rounds 60 --block 10 --diagnose
  python benchmarks/step.py --memory-only
  python benchmarks/step.py --hidden $(printf '256 %.0s' $(seq 30))   # 31 kernels
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sparsejax


class MLP(nn.Module):
  hidden: tuple[int, ...] = (1536, 512)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.classes)(x)


def make_step(model, tx, masked_forward=False, forward=sparsejax.masked_params,
              **update_kwargs):
  """The jitted step; with `masked_forward` the model sees forward(params, opt_state);
  `update_kwargs` go to tx.update."""
  def loss_fn(params, opt_state, x, y):
    if masked_forward:
      params = forward(params, opt_state)
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **update_kwargs)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """One variant: its own params / opt_state, advanced by blocks of steps."""

  def __init__(self, name, model, tx, params, masked_forward=False,
               forward=sparsejax.masked_params):
    self.name = name
    self.step = make_step(model, tx, masked_forward, forward)
    self.params = jax.tree.map(jnp.copy, params)
    self.opt_state = tx.init(self.params)
    self.steps_done = 0

  def run(self, n, x, y) -> float:
    t0 = time.perf_counter()
    params, opt_state = self.params, self.opt_state
    for _ in range(n):
      params, opt_state, loss = self.step(params, opt_state, x, y)
    jax.block_until_ready((params, opt_state, loss))
    dt = time.perf_counter() - t0
    self.params, self.opt_state = params, opt_state
    self.steps_done += n
    return dt


class HostDispatch(Runner):
  """A Runner with two programs: `update(..., **{flag: True})` on the steps
  `is_update_step` marks, `{flag: False}` on the others, chosen on the host."""

  def __init__(self, name, model, tx, params, is_update_step, flag, masked_forward=False,
               forward=sparsejax.masked_params):
    super().__init__(name, model, tx, params, masked_forward, forward)
    self.programs = {value: make_step(model, tx, masked_forward, forward, **{flag: value})
                     for value in (False, True)}
    self.is_update_step = is_update_step

  def run(self, n, x, y) -> float:
    # The block's flags in one call, outside the timing: evaluated step by
    # step, the schedule's jnp arithmetic costs ~0.5 ms of host time a step.
    flags = [bool(f) for f in self.is_update_step(
        jnp.arange(self.steps_done, self.steps_done + n))]
    t0 = time.perf_counter()
    params, opt_state = self.params, self.opt_state
    for flag in flags:
      params, opt_state, loss = self.programs[flag](params, opt_state, x, y)
    jax.block_until_ready((params, opt_state, loss))
    dt = time.perf_counter() - t0
    self.params, self.opt_state = params, opt_state
    self.steps_done += n
    return dt


def compiled_memory(jitted, *args) -> dict[str, int]:
  """Bytes of a jitted function compiled for `args`, from XLA's memory analysis.

  temp: temporaries (`temp_size_in_bytes`); peak: arguments + temporaries +
  outputs that do not reuse a donated argument's buffer.
  """
  m = jitted.lower(*args).compile().memory_analysis()
  return {"temp": m.temp_size_in_bytes,
          "peak": (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)}


def step_memory(model, tx, params, x, y, masked_forward=False, forward=sparsejax.masked_params,
                **update_kwargs) -> dict[str, int]:
  """`compiled_memory` of the step `make_step` builds (params, opt_state donated)."""
  step = make_step(model, tx, masked_forward, forward, **update_kwargs)
  return compiled_memory(step, params, jax.eval_shape(tx.init, params), x, y)


def print_memory(rows: dict[str, dict[str, int]], dense: str = "dense") -> None:
  """A table of temporaries and peaks in MB and as ratios to `rows[dense]`."""
  base = rows[dense]
  print(f"{'compiled step (XLA memory analysis)':<44} {'temp MB':>8} {'/ dense':>8} "
        f"{'peak MB':>8} {'/ dense':>8}")
  print("-" * 80)
  for name, m in rows.items():
    print(f"{name:<44} {m['temp'] / 1e6:8.2f} {m['temp'] / base['temp']:8.2f} "
          f"{m['peak'] / 1e6:8.2f} {m['peak'] / base['peak']:8.2f}")


def memory_table(model, x, y, params, schedule) -> dict[str, dict[str, int]]:
  """Memory of the dense step and of the masked steps (see the module docstring)."""
  adam = optax.adam(1e-3)
  rows = {"dense": step_memory(model, adam, params, x, y)}
  for packed in (False, True):
    tag = " packed" if packed else ""
    tx = sparsejax.GradualMagnitudePruning(schedule, packed_masks=packed).wrap(adam)
    rows[f"gmp{tag} (recompute decided in the step)"] = step_memory(model, tx, params, x, y)
    rows[f"gmp{tag}, between recomputes (host)"] = step_memory(model, tx, params, x, y,
                                                                recompute=False)
    rows[f"gmp{tag}, recompute step (host)"] = step_memory(model, tx, params, x, y,
                                                            recompute=True)
    rows[f"masked forward{tag}, in the step"] = step_memory(model, tx, params, x, y, True)
    rows[f"masked forward{tag}, between (host)"] = step_memory(model, tx, params, x, y, True,
                                                                recompute=False)
  nm = sparsejax.NMSparsity.from_method("srste", sparsejax.NMSchedule(2, 4, 10**6))
  rows["N:M SR-STE 2:4 (masks every step)"] = step_memory(model, nm.wrap(adam), params, x, y,
                                                          True, nm.forward)
  gmp = sparsejax.GradualMagnitudePruning(schedule)
  alone = compiled_memory(jax.jit(lambda p, s, m: gmp.masks_at(p, s, m)), params,
                          jnp.int32(500_000), gmp.masks_at(params, 0))
  rows["jit(masks_at) alone (selection)"] = alone
  return rows


def model_parser(doc: str) -> argparse.ArgumentParser:
  """A parser with the MLP's options (--hidden, --batch, --seed)."""
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 512])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  return parser


def model_and_batch(args):
  """The MLP, one random batch (x, y) and its initial params, printed."""
  key_init, key_x, key_y = jax.random.split(jax.random.key(args.seed), 3)
  model = MLP(tuple(args.hidden))
  x = jax.random.normal(key_x, (args.batch, 784), jnp.float32)
  y = jax.random.randint(key_y, (args.batch,), 0, 10)
  params = model.init(key_init, x)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  n_prunable = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; MLP 784 -> "
        f"{' -> '.join(map(str, args.hidden))} -> 10: {n_params:,} params "
        f"({n_prunable:,} prunable); batch {args.batch}; adam(1e-3)")
  return model, x, y, params, n_params


def main():
  parser = model_parser(__doc__)
  parser.add_argument("--block", type=int, default=10,
                      help="steps per timed block, a multiple of 10 (default 10)")
  parser.add_argument("--rounds", type=int, default=40,
                      help="interleaved timed blocks per variant (default 40)")
  parser.add_argument("--warmup", type=int, default=20,
                      help="untimed steps per variant after compiling (default 20)")
  parser.add_argument("--diagnose", action="store_true",
                      help="also time masks_at alone and a recompute-every-step gmp")
  parser.add_argument("--memory-only", action="store_true",
                      help="print the compiled steps' memory and stop (no timing)")
  args = parser.parse_args()
  if args.block % 10:
    parser.error("--block must be a multiple of 10 (the gmp update frequency)")
  if args.warmup % 10:
    parser.error("--warmup must be a multiple of 10 (keeps gmp blocks aligned)")

  model, x, y, params, n_params = model_and_batch(args)

  schedule = sparsejax.PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=10**6,
                                          update_frequency=10)
  print()
  print_memory(memory_table(model, x, y, params, schedule))
  if args.memory_only:
    return
  gmp = sparsejax.GradualMagnitudePruning(schedule)
  oneshot = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.9, step=0))
  gmp_packed = sparsejax.GradualMagnitudePruning(schedule, packed_masks=True)
  oneshot_packed = sparsejax.GradualMagnitudePruning(sparsejax.OneShotSchedule(0.9, step=0),
                                                     packed_masks=True)
  runners = [
      Runner("dense", model, optax.adam(1e-3), params),
      Runner("gmp (update every 10)", model, gmp.wrap(optax.adam(1e-3)), params),
      HostDispatch("gmp (host)", model, gmp.wrap(optax.adam(1e-3)), params,
                   schedule.is_update_step, "recompute"),
      Runner("between updates", model, oneshot.wrap(optax.adam(1e-3)), params),
      Runner("masked forward", model, oneshot.wrap(optax.adam(1e-3)), params,
             masked_forward=True),
      HostDispatch("between (host)", model, oneshot.wrap(optax.adam(1e-3)), params,
                   oneshot.schedule.is_update_step, "recompute"),
      HostDispatch("masked forward (host)", model, oneshot.wrap(optax.adam(1e-3)), params,
                   oneshot.schedule.is_update_step, "recompute", masked_forward=True),
      Runner("gmp packed", model, gmp_packed.wrap(optax.adam(1e-3)), params),
      Runner("masked forward packed", model, oneshot_packed.wrap(optax.adam(1e-3)), params,
             masked_forward=True),
  ]
  twins = {"gmp packed": "gmp (update every 10)", "masked forward packed": "masked forward"}
  if args.diagnose:
    every = sparsejax.GradualMagnitudePruning(sparsejax.PolynomialSchedule(
        0.0, 0.9, begin_step=0, end_step=10**6, update_frequency=1))
    runners.append(Runner("gmp (update every step)", model, every.wrap(optax.adam(1e-3)), params))

  # Compile + warm up; the first one-shot step computes its masks (step 0).
  for r in runners:
    r.run(args.warmup, x, y)

  # Interleaved rounds, order rotated each round. The noise on this kind of
  # machine comes in phases of seconds (steps ~2x slower for a while), so
  # besides per-variant medians we report the median of per-round ratios
  # (paired: both blocks of a round ran in the same phase, most of the time).
  times = {r.name: [] for r in runners}
  ratios = {r.name: [] for r in runners}
  for i in range(args.rounds):
    k = i % len(runners)
    round_t = {}
    for r in runners[k:] + runners[:k]:
      round_t[r.name] = r.run(args.block, x, y) / args.block
    for name, t in round_t.items():
      times[name].append(t)
      ratios[name].append(t / round_t["dense"])
  med = {name: statistics.median(ts) for name, ts in times.items()}
  best = {name: min(ts) for name, ts in times.items()}
  ratio = {name: statistics.median(rs) for name, rs in ratios.items()}

  # Sanity: the pruned runs really are sparse (only prunable kernels count).
  def kernel_sparsity(p):
    ks = [l for l in jax.tree.leaves(p) if l.ndim >= 2]
    return float(sum(jnp.sum(k == 0) for k in ks)) / sum(k.size for k in ks)

  mask_s = None
  if args.diagnose:
    masks_at = jax.jit(lambda p, s: gmp.masks_at(p, s))
    p0 = runners[0].params
    step_arg = jnp.int32(500_000)  # mid-schedule: sparsity ~0.79
    jax.block_until_ready(masks_at(p0, step_arg))
    jax.block_until_ready(masks_at(p0, step_arg))
    ts = []
    for _ in range(max(5, args.rounds)):
      t0 = time.perf_counter()
      jax.block_until_ready(masks_at(p0, step_arg))
      ts.append(time.perf_counter() - t0)
    mask_s = statistics.median(ts)

  dense = med["dense"]
  print(f"\nms/step over {args.rounds} interleaved blocks of {args.block} steps; "
        f"'/ dense' = median of per-round ratios")
  print(f"{'variant':<26} {'median':>9} {'min':>9} {'/ dense':>8} {'min/min':>8} "
        f"{'kernel sparsity':>16}")
  print("-" * 81)
  for r in runners:
    print(f"{r.name:<26} {med[r.name] * 1e3:9.3f} {best[r.name] * 1e3:9.3f} "
          f"{ratio[r.name]:8.3f} {best[r.name] / best['dense']:8.3f} "
          f"{kernel_sparsity(r.params):16.3f}")
  if mask_s is not None:
    recompute = (ratio["gmp (update every step)"] - ratio["between updates"]) * dense
    print(f"\njit(masks_at) alone (all kernels, mid-schedule): {mask_s * 1e3:.3f} ms "
          f"= {mask_s / dense:.2f} dense steps")
    print(f"recompute cost inside the step (every-step - between): {recompute * 1e3:.3f} ms; "
          f"/10 = {recompute / 10 * 1e3:.3f} ms/step = {recompute / 10 / dense:.3f} dense steps")
    print(f"per-step masking overhead (between - dense): "
          f"{(ratio['between updates'] - 1) * dense * 1e3:.3f} ms = {ratio['between updates'] - 1:.3f} dense steps")
  print()
  print(f"between-updates step / dense step = {ratio['between updates']:.2f} (target <= 1.05)")
  print(f"gmp step / dense step = {ratio['gmp (update every 10)']:.2f} (target <= 1.05)")
  print(f"gmp step, host-dispatched / dense step = {ratio['gmp (host)']:.2f} (target <= 1.05)")
  print(f"masked-forward step / dense step = {ratio['masked forward']:.2f} (target <= 1.05)")
  print(f"host-dispatched, between updates / dense step = {ratio['between (host)']:.2f}, "
        f"masked forward / dense step = {ratio['masked forward (host)']:.2f}")
  print(f"deciding the recompute in the step, per step: "
        f"{ratio['between updates'] - ratio['between (host)']:+.3f} dense steps (between), "
        f"{ratio['masked forward'] - ratio['masked forward (host)']:+.3f} (masked forward)")
  mask_bytes = lambda r: sum(
      m.nbytes for m in jax.tree.leaves(sparsejax.find_pruning_state(r.opt_state).masks))
  by_name = {r.name: r for r in runners}
  bf16_bytes = n_params * 2
  for packed, bool_twin in twins.items():
    paired = statistics.median(a / b for a, b in zip(times[packed], times[bool_twin]))
    print(f"{packed} step / {bool_twin} step = {paired:.2f} (target <= 1.10)")
  print(f"masks in the optimizer state: bool {mask_bytes(by_name['masked forward']):,} bytes "
        f"({mask_bytes(by_name['masked forward']) / bf16_bytes:.1%} of the params in bf16), "
        f"packed {mask_bytes(by_name['masked forward packed']):,} bytes "
        f"({mask_bytes(by_name['masked forward packed']) / bf16_bytes:.1%})")


if __name__ == "__main__":
  main()
