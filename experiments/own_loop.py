r"""Your own training loop in several JAX processes: a template that the tests run.

Plain JAX, optax and sparsejax (no trainer): an MLP trained data-parallel on
the devices of every process, with gradual magnitude pruning. Start it with
the launcher (2 processes of 2 CPU devices, gloo between them):

  python -m experiments.launch --processes 2 --devices_per_process 2 -- \
      python -m experiments.own_loop --steps=60

or alone (`--cpu_devices=4`), or by hand / under SLURM with the same flags.

What a multi-process loop needs beyond a one-process one:

* every process runs the same jitted computations in the same order;
* each process gives only its own slice of the batch
  (`jax.make_array_from_process_local_data`);
* **a bound on the steps in flight.** JAX dispatches asynchronously: without a
  wait, the loop enqueues every step at once. On CPU with gloo, more than
  about 30 steps in flight per device hang the run silently (the processes
  wait in a collective; gloo's timeout reports it 30 minutes later). Wait on
  an output of step i - k before dispatching step i (`--in_flight=k`, here 1:
  the host prepares the next batch while a step computes). Accelerators
  bound their queues too; the same wait costs nothing there.
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sparsejax
from experiments import distributed


def _parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: your script's own options, and importable beside the binaries.
  parser = argparse.ArgumentParser(prog="python -m experiments.own_loop", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--coordinator_address", help="host:port of process 0 (the launcher "
                      "adds it, with the next two).")
  parser.add_argument("--num_processes", type=int, help="processes in the run.")
  parser.add_argument("--process_id", type=int, help="this process's rank.")
  parser.add_argument("--cpu_devices", type=int, help="CPU devices of this process.")
  parser.add_argument("--steps", type=int, default=60, help="training steps (60).")
  parser.add_argument("--in_flight", type=int, default=1,
                      help="steps dispatched ahead of the newest finished one (1); 0: no bound, "
                           "which hangs on CPU/gloo past ~30 steps.")
  parser.add_argument("--batch_per_device", type=int, default=16,
                      help="examples per device and step (16).")
  return parser


_IN, _HIDDEN, _CLASSES = 32, 64, 10


def _batch(step: int, size: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples [offset, offset + size) of step `step`'s global batch: a fixed
  random linear teacher, the same whatever the number of processes."""
  teacher = np.random.default_rng(0).normal(size=(_IN, _CLASSES))
  x = np.random.default_rng(step + 1).normal(size=(offset + size, _IN))[offset:]
  return x.astype(np.float32), np.argmax(x @ teacher, axis=1).astype(np.int32)


def _loss(params, x, y):
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         args.cpu_devices)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(1)
  params = {"hidden": {"kernel": rng.normal(0, 0.2, (_IN, _HIDDEN)), "bias": np.zeros(_HIDDEN)},
            "out": {"kernel": rng.normal(0, 0.2, (_HIDDEN, _CLASSES)), "bias": np.zeros(_CLASSES)}}
  params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), params), replicated)
  schedule = sparsejax.PolynomialSchedule(0.0, 0.75, begin_step=0, end_step=args.steps // 2,
                                          update_frequency=5)
  tx = sparsejax.GradualMagnitudePruning(schedule).wrap(optax.adam(1e-2))
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  local = args.batch_per_device * len(jax.local_devices())
  offset = local * jax.process_index()  # this process's slice of every global batch
  pending = collections.deque()  # losses of the steps in flight
  start = time.perf_counter()
  for step in range(args.steps):
    x, y = _batch(step, local, offset)  # host work, overlapping the steps in flight
    x = jax.make_array_from_process_local_data(split, x)
    y = jax.make_array_from_process_local_data(split, y)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    pending.append(loss)
    if args.in_flight and len(pending) > args.in_flight:
      pending.popleft().block_until_ready()  # the bound: wait for step - in_flight
  loss = float(loss)  # replicated: every process reads its own copy
  seconds = time.perf_counter() - start
  kept = {leaf.path: int(np.asarray(leaf.mask).sum()) for leaf in sparsejax.leaves_with_masks(
      params, sparsejax.state_masks(opt_state, params)) if leaf.mask is not None}
  print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices: "
        f"{args.steps} steps in {seconds:.2f} s, final loss {loss:.6f}, kept weights {kept}",
        flush=True)


if __name__ == "__main__":
  main()
