"""Benchmark: sparsejax SparseGPT and Wanda on one layer vs the authors' algorithms.

A (size, size) float32 layer (default 4096 x 4096, as a LLaMA-7B projection)
and `tokens` calibration tokens (default 8192: 4 sequences of 2048). The
baseline is the authors' code, ported line for line to run on its own:
SparseGPT's `fasterprune` (IST-DASLab/sparsegpt: dead inputs, dampening,
Cholesky / `cholesky_inverse` / Cholesky, blocks of 128, `<=` threshold,
N:M by `torch.topk`) and Wanda's `prune_wanda` (locuslab/wanda: |W| *
sqrt(scaler_row), stable sort per output row, prune the first int(d_in s)),
in PyTorch on the CPU when torch is importable, else the same code in NumPy
(the line says which). Both sides get the same statistics: H = X^T X for
SparseGPT, the inputs' squared norms for Wanda (timed apart, not in the
ratios). sparsejax's first call includes compilation; then a second call.
The ratios printed are sparsejax / authors (below 1: faster). The results
are compared (keep-mask agreement: the count rules differ by about one
weight per block, see the README; relative weight difference).

  python benchmarks/oneshot.py                      # 4096 x 4096, 8192 tokens
  python benchmarks/oneshot.py --size 1024 --tokens 4096 --targets 50% 2:4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import oneshot

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:  # the NumPy port of the same code
  torch = None


def torch_sparsegpt(w, h, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
  """`SparseGPT.fasterprune` (IST-DASLab/sparsegpt) on W (d_out, d_in), without quantisation."""
  W = w.clone().float()
  H = h.clone()
  columns = W.shape[1]
  dead = torch.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  damp = percdamp * torch.mean(torch.diag(H))
  diag = torch.arange(columns)
  H[diag, diag] += damp
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  Hinv = torch.linalg.cholesky(H, upper=True)
  prunen, prunem = (nm[1] - nm[0], nm[1]) if nm is not None else (0, 0)   # prune M - N of M
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    if prunen == 0:
      tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
      thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
      mask1 = tmp <= thresh
    else:
      mask1 = torch.zeros_like(W1) == 1
    for i in range(count):
      w1 = W1[:, i]
      d = Hinv1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
        mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
      q = w1.clone()
      q[mask1[:, i]] = 0
      Q1[:, i] = q
      err1 = (w1 - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
  return W


def torch_wanda(w, scaler_row, sparsity):
  """`prune_wanda`'s unstructured branch (locuslab/wanda) on W (d_out, d_in)."""
  W = w.clone()
  W_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
  W_mask = torch.zeros_like(W_metric) == 1
  sort_res = torch.sort(W_metric, dim=-1, stable=True)
  indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity)]
  W_mask.scatter_(1, indices, True)
  W[W_mask] = 0
  return W


def numpy_sparsegpt(w, h, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
  """The same `fasterprune` in float32 NumPy (when torch is missing)."""
  W = w.astype(np.float32).copy()
  H = h.astype(np.float32).copy()
  columns = W.shape[1]
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.diag_indices(columns)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
    Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
    mask1 = np.zeros(W1.shape, bool)
    if nm is None:
      tmp = W1 ** 2 / np.diag(Hinv1)[None, :] ** 2
      mask1 = tmp <= np.sort(tmp.ravel())[int(tmp.size * sparsity)]
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        tmp = W1[:, i:i + nm[1]] ** 2 / np.diag(Hinv1)[None, i:i + nm[1]] ** 2
        np.put_along_axis(mask1[:, i:i + nm[1]], np.argsort(tmp, axis=1)[:, :nm[1] - nm[0]], True, axis=1)
      q = np.where(mask1[:, i], 0.0, W1[:, i])
      err1 = (W1[:, i] - q) / Hinv1[i, i]
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Q1[:, i], Err1[:, i] = q, err1
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return W


def numpy_wanda(w, scaler_row, sparsity):
  metric = np.abs(w) * np.sqrt(scaler_row)[None, :]
  order = np.argsort(metric, axis=1, kind="stable")[:, :int(w.shape[1] * sparsity)]
  out = w.copy()
  np.put_along_axis(out, order, 0.0, axis=1)
  return out


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=4096, help="layer is size x size")
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--targets", nargs="+", default=["50%", "2:4"],
                      help="SparseGPT targets: 50%% (unstructured) and/or N:M; Wanda runs at 50%%")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(args.tokens, args.size)).astype(np.float32)
       @ (np.eye(args.size, dtype=np.float32)
          + rng.normal(size=(args.size,) * 2).astype(np.float32) / 32))
  w = rng.normal(size=(args.size, args.size)).astype(np.float32) / np.sqrt(args.size)  # (d_in, d_out)
  h, seconds = _timed(lambda: jax.block_until_ready(jnp.asarray(x).T @ jnp.asarray(x)))
  norms = np.square(x).sum(axis=0)
  h_np = np.asarray(h)
  baseline = "PyTorch " + torch.__version__ if torch is not None else "NumPy port"
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s); layer {args.size}x{args.size}, "
        f"{args.tokens} tokens (H = X^T X {seconds:.2f} s, not in the ratios); authors' code in "
        f"{baseline}, threads: {torch.get_num_threads() if torch is not None else '-'}")
  w_jax = jnp.asarray(w)
  runs = [("sparsegpt", t) for t in args.targets] + [("wanda", "50%")]
  for method, label in runs:
    target = (dict(sparsity=float(label.rstrip("%")) / 100) if label.endswith("%")
              else dict(nm=tuple(int(v) for v in label.split(":"))))
    stats = h if method == "sparsegpt" else jnp.asarray(norms)
    call = lambda: jax.block_until_ready(oneshot.prune_layer(w_jax, stats, method, **target))
    (ours, ours_keep), first = _timed(call)
    _, second = _timed(call)
    if method == "sparsegpt":
      if torch is not None:
        fn = lambda: torch_sparsegpt(torch.from_numpy(w.T.copy()), torch.from_numpy(h_np.copy()),
                                     **target).numpy()
      else:
        fn = lambda: numpy_sparsegpt(w.T, h_np, **target)
    else:
      scaler = norms / args.tokens   # WrappedGPT's scaler_row: squared norm / nsamples
      if torch is not None:
        fn = lambda: torch_wanda(torch.from_numpy(w.T.copy()), torch.from_numpy(scaler),
                                 target["sparsity"]).numpy()
      else:
        fn = lambda: numpy_wanda(w.T, scaler, target["sparsity"])
    theirs, authors = _timed(fn)
    theirs = theirs.T
    ours, ours_keep = np.asarray(ours), np.asarray(ours_keep)
    agree = float(np.mean(ours_keep == (theirs != 0)))
    diff = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    print(f"  {method} {label}: sparsejax first call (compile included) {first:.2f} s, second "
          f"{second:.2f} s; authors {authors:.2f} s | ratio sparsejax/authors: first "
          f"{first / authors:.2f}x (target <= 0.5x), second {second / authors:.2f}x | masks agree "
          f"on {agree:.4%}, relative weight difference {diff:.1e}", flush=True)


if __name__ == "__main__":
  main()
