"""Independent numpy references the tests compare sparsejax against.

They use full sorts (np.lexsort) and plain loops on purpose: slow, obvious,
and sharing no code with the library.
"""

import numpy as np


def topk_mask(scores, sparsity):
  """Keeps round((1-s)*n) largest scores; ties to the lower flat index.

  Integer scores are ranked as Python ints (exact at any width).
  """
  values = np.asarray(scores)
  k = int(round((1.0 - sparsity) * values.size))
  if np.issubdtype(values.dtype, np.integer):
    order = sorted(range(values.size), key=lambda i: (-int(values.ravel()[i]), i))
  else:
    flat = values.astype(np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
  order = np.asarray(order, dtype=np.int64)
  flat = values.ravel()
  mask = np.zeros(flat.size, bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(scores))


def global_topk_masks(scores_list, sparsity):
  """Top-k over the concatenation of several arrays, split back per array."""
  flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores_list])
  mask = topk_mask(flat, sparsity)
  out, offset = [], 0
  for s in scores_list:
    size = np.size(s)
    out.append(mask[offset:offset + size].reshape(np.shape(s)))
    offset += size
  return out


def nm_mask(scores, n, m, axis):
  """Loops over every group of m along `axis`, keeping its n largest."""
  x = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
  mask = np.zeros(x.shape, bool)
  for index in np.ndindex(x.shape[:-1]):
    row = x[index]
    for start in range(0, row.size, m):
      group = row[start:start + m]
      order = np.lexsort((np.arange(m), -group))
      mask[index + (start + order[:n],)] = True
  return np.moveaxis(mask, -1, axis)


def erk_densities(sparsity, shapes):
  """ERK densities by bisection on the scale eps (not the library's fixpoint).

  Solves sum_l n_l * min(1, eps * raw_l) = (1 - s) * sum_l n_l for eps.
  """
  sizes = np.array([np.prod(s) for s in shapes], np.float64)
  raw = np.array([np.sum(s) / np.prod(s) for s in shapes], np.float64)
  target = (1.0 - sparsity) * sizes.sum()
  lo, hi = 0.0, 1.0 / raw.min()
  for _ in range(200):
    eps = (lo + hi) / 2
    if (sizes * np.minimum(1.0, eps * raw)).sum() < target:
      lo = eps
    else:
      hi = eps
  return np.minimum(1.0, hi * raw)


def polynomial_sparsity(t, s_i, s_f, t0, t1, freq, power=3.0):
  """Zhu & Gupta: s_f + (s_i - s_f)(1 - (t' - t0)/(t1 - t0))^p at the last update t'."""
  if t < t0:
    return s_i
  if t >= t1:
    return s_f
  t_last = t0 + ((t - t0) // freq) * freq
  return s_f + (s_i - s_f) * (1.0 - (t_last - t0) / (t1 - t0)) ** power


def mix32(array):
  """The position-hashed byte sum of sparsejax's checkpoint integrity, in NumPy:
  sum_i murmur3_fmix32((i * 0x9E3779B1 + byte_i) mod 2^32) mod 2^32."""
  data = np.ascontiguousarray(array).view(np.uint8).reshape(-1).astype(np.uint64)
  h = (np.arange(data.size, dtype=np.uint64) * 0x9E3779B1 + data) % 2**32
  h ^= h >> 16
  h = (h * 0x85EBCA6B) % 2**32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) % 2**32
  h ^= h >> 16
  return f"mix32:{int(h.sum() % 2**32):08x}"


def top_count(scores, count, candidates=None):
  """The `count` largest scores among `candidates` (all if None), ties to the
  lower flat index, by a full sort."""
  flat = np.asarray(scores, np.float64).ravel()
  allowed = np.ones(flat.size, bool) if candidates is None else np.asarray(candidates).ravel()
  order = [i for i in np.lexsort((np.arange(flat.size), -flat)) if allowed[i]]
  mask = np.zeros(flat.size, bool)
  mask[order[:count]] = True
  return mask.reshape(np.shape(scores))


def drop_and_grow(weights, mask, grow_scores, fraction):
  """RigL's update of one layer (Evci et al. 2020, rigl/sparse_optimizers_base.py):
  drop floor(fraction * active) smallest-|w| active weights, grow as many of
  the largest grow scores among the weights inactive after the drop.
  Returns (new mask, grown = newly active)."""
  mask = np.asarray(mask, bool)
  active = int(mask.sum())
  drop = int(np.float32(active) * np.float32(fraction))
  kept = top_count(np.abs(weights), active - drop, mask)
  grow = top_count(grow_scores, drop, ~kept)
  return kept | grow, grow & ~mask


def wanda_mask(weights, inputs, sparsity):
  """Wanda: per output unit (column of a (d_in, d_out) W), keep the largest |W_ij| * ||X_i||."""
  x = np.asarray(inputs, np.float64).reshape(-1, np.shape(weights)[0])
  scores = np.abs(np.asarray(weights, np.float64)) * np.sqrt((x ** 2).sum(axis=0))[:, None]
  return np.stack([topk_mask(scores[:, j], sparsity) for j in range(scores.shape[1])], axis=1)


def sparsegpt(weights, inputs, sparsity=None, nm=None, block_size=128, dampening=0.01):
  """SparseGPT on a (d_in, d_out) W from inputs X (n, d_in): (W', keep-mask).

  Written from the paper's algorithm, in float64, with every update applied
  to all later inputs at once (no lazy batching) and an explicit inverse.
  """
  x = np.asarray(inputs, np.float64).reshape(-1, np.shape(weights)[0])
  w = np.array(weights, np.float64).T           # rows: output units; columns: inputs
  d = w.shape[1]
  h = x.T @ x
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h += dampening * np.mean(np.diag(h)) * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(h)).T    # upper: u.T @ u = inverse of h
  keep = np.ones(w.shape, bool)
  for start in range(0, d, block_size):
    stop = min(start + block_size, d)
    if nm is None:
      saliency = w[:, start:stop] ** 2 / np.diag(u)[start:stop] ** 2
      keep[:, start:stop] = topk_mask(saliency, sparsity)
    for j in range(start, stop):
      if nm is not None and (j - start) % nm[1] == 0:
        group = w[:, j:j + nm[1]] ** 2 / np.diag(u)[j:j + nm[1]] ** 2
        keep[:, j:j + nm[1]] = nm_mask(group, nm[0], nm[1], axis=1)
      error = np.where(keep[:, j], 0.0, w[:, j]) / u[j, j]
      w[:, j:] -= np.outer(error, u[j, j:])
  return np.where(keep, w, 0.0).T, keep.T


def lamp_masks(weights_list, amount):
  """LAMP as the authors' code does it (jaeho-lee/layer-adaptive-sparsity,
  tools/pruners.py: `_normalize_scores`, `_compute_lamp_amounts`), in NumPy.

  Scores w^2 are sorted ascending per layer and divided by the sum of the
  scores at and after each position; the survivors are the global top
  round(n * (1 - amount)) of those scores; each layer then keeps its
  survivors' count of its largest |w| (torch's `l1_unstructured`).
  """
  normalized = []
  for w in weights_list:
    squared = np.asarray(w, np.float64).ravel() ** 2
    order = np.argsort(squared, kind="stable")
    ascending = squared[order]
    before = np.concatenate([[0.0], np.cumsum(ascending)[:-1]])
    score = np.zeros_like(squared)
    score[order] = ascending / (squared.sum() - before)
    normalized.append(score)
  total = sum(s.size for s in normalized)
  survivors = int(np.round(total * (1.0 - amount)))
  threshold = np.sort(np.concatenate(normalized))[::-1][survivors - 1]
  out = []
  for w, score in zip(weights_list, normalized):
    keep = int((score >= threshold).sum())
    out.append(topk_mask(np.abs(w), 1.0 - keep / np.size(w)))
  return out


def flap_al_am(attn_weights, attn_var, attn_mean, mlp_weights, mlp_var, mlp_mean, head_dim,
               head_cost, channel_cost, pruning_ratio):
  """A NumPy port of FLAP's `prune_flap` (structure 'AL-AM', metric 'WIFV') and `compress`.

  CASIA-IVA-Lab/FLAP lib/prune.py, with torch's (out, in) weight layout:
  per layer l, the o_proj weights `attn_weights[l]` (d, heads * head_dim) and
  down_proj weights `mlp_weights[l]` (d, m); `*_var` and `*_mean` their
  inputs' variance (fluc_inp) and mean (baseline_inp). The metric is
  fluc_inp * sum(W^2, dim=0), squared for attention, standardised per
  layer (torch.std: ddof 1), attention averaged per head; all scores sorted
  descending, the threshold where cumsum(compression weight) comes closest to
  (1 - ratio) of its total, units strictly above it kept. The compression
  weight of a head is head_cost / channel_cost (the authors write 512 / 3
  into an int64 tensor, i.e. 170, for LLaMA's 4 * 4096 * 128 / (3 * 4096)).
  Returns (attention head scores (L, heads), MLP scores (L, m), head masks,
  channel masks, attention biases (L, d), MLP biases (L, d)).
  """
  std = lambda x: (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, ddof=1, keepdims=True)
  attn = np.stack([(v * (w**2).sum(0))**2 for w, v in zip(attn_weights, attn_var)])
  layers = attn.shape[0]
  attn = std(attn).reshape(layers, -1, head_dim).mean(axis=2)
  mlp = std(np.stack([v * (w**2).sum(0) for w, v in zip(mlp_weights, mlp_var)]))
  metric = np.concatenate([attn.ravel(), mlp.ravel()])
  indices = np.argsort(-metric, kind="stable")
  weight = np.ones(metric.size)
  weight[indices < attn.size] = head_cost / channel_cost
  threshold = metric[indices][np.argmin(np.abs(np.cumsum(weight) - weight.sum() * (1 - pruning_ratio)))]
  attn_mask, mlp_mask = attn > threshold, mlp > threshold
  attn_bias = np.stack([(mean * ~np.repeat(mask, head_dim)) @ w.T
                        for w, mean, mask in zip(attn_weights, attn_mean, attn_mask)])
  mlp_bias = np.stack([(mean * ~mask) @ w.T for w, mean, mask in zip(mlp_weights, mlp_mean, mlp_mask)])
  return attn, mlp, attn_mask, mlp_mask, attn_bias, mlp_bias


def wanda_sp_scores(weights, sq_norms, head_dim=1):
  """FLAP's `prune_wanda_sp` metric: (|W| * sqrt(scaler_row)).mean(axis=0), summed per head.

  `weights` (out, in) as torch stores them, `sq_norms` (in,) the squared
  input norms.
  """
  metric = (np.abs(weights) * np.sqrt(sq_norms)[None, :]).mean(axis=0)
  return metric.reshape(-1, head_dim).sum(axis=1)
