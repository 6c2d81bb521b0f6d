"""Benchmark: forward latency of a shrunk transformer LM against the dense one, on this CPU.

The stdlib-LM architecture (`experiments.models.TransformerLM`: 4 pre-LN
blocks, width 256, 8 heads, MLP 1024, 128 tokens, 256-byte vocabulary;
random weights, seed 0) has 50% of the MLP units and 50% of the heads of
every block removed (`sparsejax.prune_structured`, magnitude_sp), and is
physically shrunk (`sparsejax.shrink`: smaller kernels, config
block_heads=(4,)*4, block_mlp_dims=(512,)*4). The jitted forwards of the
dense and the shrunk model run interleaved (compile and warm-up first); the
median latency of each, their ratio (target <= 0.6x: the blocks' FLOPs go
to about 0.5x, embedding and head stay) and the ratio of parameter bytes are
printed, at batch 1 and batch 64. The shrunk model's outputs are checked
against the masked model's first.

  python benchmarks/structured.py               # batch 1 and 64, 15 rounds
  python benchmarks/structured.py --batches 1 8 64 --rounds 25
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax
from experiments.models import create_model
from experiments.models import structure as model_structure

TARGET = 0.6


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--fraction", type=float, default=0.5)
  args = parser.parse_args()

  model = create_model("lm", num_classes=256, num_layers=4, width=256, num_heads=8, mlp_dim=1024,
                       max_length=args.length)
  tokens = jax.random.randint(jax.random.key(1), (max(args.batches), args.length), 0, 256)
  params = model.init(jax.random.key(0), tokens[:1])["params"]
  groups = model_structure.groups(model, params)
  pruned = sparsejax.prune_structured(params, groups, "magnitude_sp", args.fraction)
  small, small_model = model_structure.shrink_model(model, {"params": pruned.params}, groups,
                                                    jax.device_get(pruned.keep))
  forward = jax.jit(model.apply)
  small_forward = jax.jit(small_model.apply)
  diff = float(jnp.max(jnp.abs(forward({"params": pruned.params}, tokens[:2])
                               - small_forward(small, tokens[:2]))))
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; LM 4x(256 wide, 8 heads, MLP "
        f"1024), {args.length} tokens; {args.fraction:.0%} of heads and MLP units removed: "
        f"heads {small_model.block_heads}, MLP {small_model.block_mlp_dims}; shrunk vs masked "
        f"max |diff| {diff:.1e}")
  dense_bytes, small_bytes = _bytes(params), _bytes(small["params"])
  print(f"parameter bytes: dense {dense_bytes:,}, shrunk {small_bytes:,}, ratio "
        f"{small_bytes / dense_bytes:.3f}")
  for batch in args.batches:
    x = tokens[:batch]
    for _ in range(2):   # compile and warm up
      _time(forward, {"params": params}, x)
      _time(small_forward, small, x)
    dense_t, small_t = [], []
    for _ in range(args.rounds):
      dense_t.append(_time(forward, {"params": params}, x))
      small_t.append(_time(small_forward, small, x))
    d, s = float(np.median(dense_t)), float(np.median(small_t))
    print(f"batch {batch:3d}: dense {1e3 * d:8.2f} ms, shrunk {1e3 * s:8.2f} ms, ratio "
          f"{s / d:.2f}x (target <= {TARGET}x)")


if __name__ == "__main__":
  main()
