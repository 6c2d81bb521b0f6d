"""One-shot pruning of a trained model from calibration inputs: magnitude, Wanda, SparseGPT.

Each kernel is pruned as a linear layer W (d_in x d_out, its contraction axes
merged into d_in, see `layouts`) from the Gram matrix of its inputs,
H = X^T X over the calibration tokens X (n x d_in)::

  magnitude  keep the largest |W_ij| of the layer (or of each output unit);
  wanda      keep the largest |W_ij| * ||X_i||_2 of each output unit
             (Sun et al. 2023; ||X_i||^2 = H_ii);
  sparsegpt  prune columns of W^T left to right in blocks, choosing each
             block's mask by W^2 / [H^-1]_jj^2 and spreading each pruned
             weight's error over the weights not yet visited with the
             optimal brain surgeon update, through the upper Cholesky factor
             of (H + lambda I)^-1 (Frantar & Alistarh 2023).

Sparsity is unstructured (a fraction) or N:M along d_in. `prune_layer` prunes
one kernel; `prune_sequentially` prunes a model group by group (transformer
block by block), each group calibrated on the outputs of the groups already
pruned, as both papers do. `linen_hessians` captures the Gram matrices of
every Dense / DenseGeneral kernel of a Flax Linen model (Flax's attention
included), `nnx_hessians` those of every nnx.Linear / LinearGeneral / Einsum
of a Flax NNX model. Masks are selected by the library's exact top-k / N:M selection,
so exactly round((1-s) n) weights survive; the authors' SparseGPT and
magnitude baseline prune the int(n s) + 1 (or more, on ties) scores `<=`
the int(n s)-th smallest, and Wanda prunes exactly int(d_in s) per output
(README, "One-shot pruning of a trained model").
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import counts
from sparsejax import layouts
from sparsejax import pruning
from sparsejax import selection
from sparsejax import trees

PyTree = Any
METHODS = ("magnitude", "wanda", "sparsegpt")
HessiansFn = Callable[[PyTree], Mapping[str, jax.Array]]
# One sparsity for every kernel, or one per group: {group name: sparsity} or group -> sparsity.
GroupSparsity = float | Mapping[str, float] | Callable[[str], float]
# One N:M pattern for every kernel, or one per group (OWL's N:M variant gives each block its N).
GroupNM = tuple[int, int] | Mapping[str, tuple[int, int]] | Callable[[str], tuple[int, int]]


def check_target(sparsity=None, nm: tuple[int, int] | None = None) -> None:
  """Exactly one of a sparsity in [0, 1) or an N:M pattern with 0 < N <= M."""
  if (sparsity is None) == (nm is None):
    raise ValueError(f"give either sparsity= or nm=(n, m), got sparsity={sparsity!r}, nm={nm!r}.")
  if sparsity is not None:
    counts.check_sparsity(sparsity)
    if not 0.0 <= float(sparsity) < 1.0:
      raise ValueError(f"one-shot sparsity must be in [0, 1), got {sparsity}.")
  else:
    n, m = nm
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n <= m:
      raise ValueError(f"nm must be (N, M) with ints 0 < N <= M, got {nm!r}.")


def check_solver(block_size, dampening) -> None:
  """SparseGPT's settings: an int block_size >= 1 and a finite dampening > 0."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be an integer >= 1.")
  if (isinstance(dampening, bool) or not isinstance(dampening, (int, float))
      or not math.isfinite(dampening) or dampening <= 0):
    raise ValueError(f"dampening={dampening!r} must be a finite number > 0.")


def _group_values(value, names: list[str], key: str) -> dict:
  """{group: its value} from one value, a dict naming every group and no other, or a callable."""
  if isinstance(value, Mapping):
    missing = [n for n in names if n not in value]
    unknown = [k for k in value if k not in names]
    listed = f"groups: {names[:8]}{'...' if len(names) > 8 else ''}"
    if missing:
      raise ValueError(f"{key} has no entry for group {missing[0]!r} ({len(missing)} missing; "
                       f"{listed}).")
    if unknown:
      raise ValueError(f"{key} names group {unknown[0]!r}, which holds no chosen kernel "
                       f"({listed}).")
    return {n: value[n] for n in names}
  if callable(value):
    return {n: value(n) for n in names}
  return {n: value for n in names}


def group_sparsities(sparsity: GroupSparsity, names: Iterable[str]) -> dict[str, float]:
  """{group: its sparsity} for the groups `names`, from one sparsity, a dict or a callable.

  A dict must name every group and no other (a ValueError names the first
  missing or unknown one); a callable is asked once per group. Every value
  must be in [0, 1) (the error names the group).

  >>> group_sparsities({'block_0': 0.4, 'block_1': 0.6}, ['block_0', 'block_1'])
  {'block_0': 0.4, 'block_1': 0.6}
  """
  values = _group_values(sparsity, list(dict.fromkeys(names)), "sparsity")
  for name, value in values.items():
    try:
      check_target(value)
    except ValueError as e:
      raise ValueError(f"group {name!r}: {e}") from None
  return {n: float(v) for n, v in values.items()}


def group_patterns(nm: GroupNM, names: Iterable[str]) -> dict[str, tuple[int, int]]:
  """{group: its (N, M)} for the groups `names`, from one pattern, a dict or a callable.

  As `group_sparsities`: a dict names every group and no other, a callable
  is asked once per group, and each value must be (N, M) with ints
  0 < N <= M (the error names the group). Groups may differ in M as well as N.

  >>> group_patterns({'block_0': (3, 4), 'block_1': (1, 4)}, ['block_0', 'block_1'])
  {'block_0': (3, 4), 'block_1': (1, 4)}
  """
  values = _group_values(nm, list(dict.fromkeys(names)), "nm")
  for name, value in values.items():
    try:
      if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"nm must be (N, M) with ints 0 < N <= M, got {value!r}.")
      check_target(nm=tuple(value))
    except ValueError as e:
      raise ValueError(f"group {name!r}: {e}") from None
  return {n: (int(v[0]), int(v[1])) for n, v in values.items()}


def _per_group(target) -> bool:
  return isinstance(target, Mapping) or callable(target)


def _check_targets(sparsity, nm) -> None:
  """Exactly one of sparsity / nm, each one value (checked here) or per group (checked later)."""
  if not _per_group(sparsity) and not _per_group(nm):
    check_target(sparsity, nm)
  elif (sparsity is None) == (nm is None):
    raise ValueError("give either sparsity= or nm=(n, m) (each may be per group), got both.")


def check_layers(params: PyTree, method: str, *, sparsity: GroupSparsity | None = None,
                 nm: GroupNM | None = None, leaf_filter: trees.LeafFilter | None = None,
                 axes: layouts.AxesSpec = None, block_size: int = 128,
                 group: Callable[[str], str] | None = None) -> None:
  """Raises, naming the first leaf (or group), if the target cannot apply to a chosen kernel.

  `sparsity` or `nm` may be one value or, per group (`group`, default
  `block_group()`), a dict or callable (`group_sparsities`,
  `group_patterns`): each group's own target is checked, and each kernel
  against its group's M. Reads only shapes (`params` may hold
  `jax.ShapeDtypeStruct` values), so a run can check every layer before it prunes
  (or writes) anything.
  """
  _check_targets(sparsity, nm)
  leaves = trees.named_leaves(params)
  chosen = pruning.prunable_leaves(params, leaf_filter)
  group = group or block_group()
  if _per_group(sparsity):
    group_sparsities(sparsity, [group(leaves[i].path) for i in chosen])
    return
  if nm is None:
    return
  patterns = (group_patterns(nm, [group(leaves[i].path) for i in chosen]) if _per_group(nm)
              else None)
  rule = layouts.as_rule(axes)
  for i in chosen:
    path, shape = leaves[i].path, tuple(leaves[i].value.shape)
    n, m = nm if patterns is None else patterns[group(path)]
    if method == "sparsegpt" and block_size % m:
      raise ValueError(f"sparsegpt N:M {n}:{m} needs block_size ({block_size}) divisible "
                       f"by M={m}.")
    contraction = tuple(rule(path, shape))
    d_in = math.prod(shape[a] for a in contraction)
    if d_in % m:
      raise ValueError(f"{path}: kernel of shape {shape} has {d_in} inputs (axes {contraction}), "
                       f"not divisible by M={m} of N:M {n}:{m}; exclude it.")


def check_method(method: str) -> None:
  """A ValueError naming the one-shot methods unless `method` is one of them."""
  if method not in METHODS:
    raise ValueError(f"unknown one-shot method {method!r}; use one of {METHODS}.")


def as_matrix(kernel: jax.Array, axes: Sequence[int]) -> tuple[jax.Array, Callable]:
  """`kernel` as a (d_in, d_out) matrix with its contraction `axes` as rows, and the inverse map."""
  view = layouts.GroupedView(kernel.shape, tuple(axes))
  moved = jnp.moveaxis(view.to_view(kernel), view.axis, 0)
  matrix = moved.reshape(view.length, -1)

  def back(x):
    return view.from_view(jnp.moveaxis(x.reshape(moved.shape), 0, view.axis))

  return matrix, back


def _per_output(scores: jax.Array, sparsity) -> jax.Array:
  """Top-k mask of each column (output unit) of a (d_in, d_out) score matrix, all at once."""
  return selection.topk_mask_along(scores, sparsity, axis=0)


def _select(scores: jax.Array, sparsity, nm, per_output: bool) -> jax.Array:
  """Keep-mask of a (d_in, d_out) score matrix: N:M along d_in, per column, or per layer."""
  if nm is not None:
    return selection.nm_mask(scores, nm[0], nm[1], axis=0)
  return _per_output(scores, sparsity) if per_output else selection.topk_mask(scores, sparsity)


def wanda_scores(weights: jax.Array, hessian: jax.Array) -> jax.Array:
  """|W_ij| * ||X_i||_2 for a (d_in, d_out) W, from H = X^T X or its diagonal (d_in,).

  >>> wanda_scores(jnp.array([[1., -2.], [3., 1.]]), jnp.array([4., 1.])).tolist()
  [[2.0, 4.0], [3.0, 1.0]]
  """
  squares = jnp.diagonal(hessian) if hessian.ndim == 2 else hessian
  norms = jnp.sqrt(jnp.maximum(squares.astype(jnp.float32), 0.0))
  return jnp.abs(weights.astype(jnp.float32)) * norms[:, None]


def inverse_cholesky(hessian: jax.Array, dampening: float = 0.01) -> jax.Array:
  """Upper Cholesky factor U of (H + lambda I)^-1, U^T U = (H + lambda I)^-1.

  lambda is `dampening` times the mean diagonal of H; inputs never seen
  (H_ii = 0) get H_ii = 1 so that H stays invertible. U comes from one
  Cholesky factorisation and one triangular inverse, no explicit H^-1: with
  P the reversal permutation, P H P = L L^T gives H = V V^T with V = P L P
  upper triangular, so U = V^-1 (the same U as the authors' three steps,
  Cholesky, `cholesky_inverse`, Cholesky, by uniqueness of the factor).
  """
  h = hessian.astype(jnp.float32)
  n = h.shape[0]
  diag = jnp.diagonal(h)
  h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
  h = h + dampening * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=h.dtype)
  upper = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]          # H = V V^T, V upper
  return jnp.triu(jax.scipy.linalg.solve_triangular(upper, jnp.eye(n, dtype=h.dtype),
                                                    lower=False))


PANEL_BLOCKS = 4   # blocks per panel (at most): exact lazy updates between panels


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "block_size", "dampening"))
def sparsegpt(weights: jax.Array, hessian: jax.Array, *, sparsity: float | None = None,
              nm: tuple[int, int] | None = None, block_size: int = 128,
              dampening: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT on one layer: (pruned and updated W, keep-mask), W of shape (d_in, d_out).

  Columns of W^T (inputs) are visited in blocks of `block_size`; a block's
  mask keeps the largest W^2 / [H^-1]_jj^2 (over the whole block: adaptive,
  or of every m inputs for N:M), the error of each pruned input is spread
  over the later inputs of the block at once and over the later blocks in
  lazy matrix products. Blocks are grouped in panels of up to
  `PANEL_BLOCKS` blocks, all of one width: within a panel a block updates
  the rest of the panel through a masked product of fixed shape; after a
  panel, each later panel gets its errors in one product. Panels and the
  blocks within them run in `lax.fori_loop` loops, so the program holds one copy
  of the block code whatever the layer's size (it compiles in about the
  same time for any d_in). When d_in is not a multiple of the panel width
  the inputs are padded with unused ones (W = 0, decoupled from the rest
  through an identity block of the factor); the last, partial block still
  keeps round((1-s) n) of its own n weights. Inputs never seen (H_ii = 0)
  are zeroed and pruned.
  """
  check_target(sparsity, nm)
  d_in = weights.shape[0]
  if nm is not None and (d_in % nm[1] or block_size % nm[1]):
    raise ValueError(f"N:M {nm[0]}:{nm[1]} needs d_in ({d_in}) and block_size ({block_size}) "
                     f"divisible by M={nm[1]}.")
  dtype = weights.dtype
  w = weights.astype(jnp.float32).T                       # (d_out, d_in): rows are output units
  rows = w.shape[0]
  dead = jnp.diagonal(hessian) == 0
  w = jnp.where(dead[None, :], 0.0, w)
  u = inverse_cholesky(hessian, dampening)
  blocks = -(-d_in // block_size)
  panels = -(-blocks // PANEL_BLOCKS)
  per_panel = -(-blocks // panels)                        # as even as can be: little padding
  width = per_panel * block_size
  padded = panels * width
  if padded > d_in:                                       # unused inputs: W = 0, U = I there
    w = jnp.pad(w, ((0, 0), (0, padded - d_in)))
    u = jnp.pad(u, ((0, padded - d_in),) * 2) + jnp.diag(
        (jnp.arange(padded) >= d_in).astype(jnp.float32))
  tail = d_in - (blocks - 1) * block_size                 # inputs of the last block
  keeps = None
  if nm is None:   # weights kept by a whole block, by the last block, its inputs and index
    keeps = (counts.keep_count(rows * block_size, sparsity), counts.keep_count(rows * tail, sparsity),
             tail, blocks - 1)

  def one_panel(p, carry):
    w, keep = carry
    start = p * width
    panel, panel_keep, errors = _prune_panel(
        jax.lax.dynamic_slice(w, (0, start), (rows, width)),
        jax.lax.dynamic_slice(u, (start, start), (width, width)), nm, block_size,
        jnp.minimum(per_panel, blocks - p * per_panel), p * per_panel, keeps)
    w = jax.lax.dynamic_update_slice(w, panel, (0, start))
    keep = jax.lax.dynamic_update_slice(keep, panel_keep, (0, start))

    def later_panel(c, w):                                # the lazy update of one later panel
      chunk = jax.lax.dynamic_slice(w, (0, c * width), (rows, width))
      chunk = chunk - errors @ jax.lax.dynamic_slice(u, (start, c * width), (width, width))
      return jax.lax.dynamic_update_slice(w, chunk, (0, c * width))

    return jax.lax.fori_loop(p + 1, panels, later_panel, w), keep

  w, keep = jax.lax.fori_loop(0, panels, one_panel, (w, jnp.ones(w.shape, bool)))
  w, keep = w[:, :d_in], keep[:, :d_in]
  # Inputs never seen were zeroed above (as the authors do): the mask says so.
  return w.T.astype(dtype), (keep & ~dead[None, :]).T


def _prune_panel(panel: jax.Array, u_panel: jax.Array, nm, block_size: int, count: jax.Array,
                 first_block: jax.Array, keeps) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first `count` blocks of one panel pruned in order: (pruned panel, keep-mask, errors).

  `keeps` (unstructured only): (weights a whole block keeps, weights the
  last block keeps, the last block's inputs, its index); `first_block` is
  the panel's first block's index in the layer. A partial last block keeps
  its count among its own inputs only (the padding ranks below them).
  """
  rows, width = panel.shape
  columns = jnp.arange(width)
  full, partial, tail, last = keeps if keeps is not None else (None,) * 4

  def one_block(b, carry):
    panel, keep, errors = carry
    first = b * block_size
    block = jax.lax.dynamic_slice(panel, (0, first), (rows, block_size))
    u_block = jax.lax.dynamic_slice(u_panel, (first, first), (block_size, block_size))
    block_keep = None
    if nm is None:
      # Adaptive mask selection: one top-k over the whole block, before its updates.
      saliency = block ** 2 / jnp.diagonal(u_block)[None, :] ** 2
      if tail == block_size:
        block_keep = selection.topk_masks_by_count([saliency], [full])[0]
      else:                                               # the last block is partial
        is_last = first_block + b == last
        real = jnp.arange(block_size) < jnp.where(is_last, tail, block_size)
        block_keep = selection.topk_masks_by_count(
            [saliency], [jnp.where(is_last, partial, full)],
            [jnp.broadcast_to(real[None, :], saliency.shape)])[0]
    block, block_errors, block_keep = _prune_block(block, u_block, block_keep, nm)
    later = jax.lax.dynamic_slice(u_panel, (first, 0), (block_size, width))
    later = jnp.where(columns[None, :] >= first + block_size, later, 0.0)
    panel = jax.lax.dynamic_update_slice(panel - block_errors @ later,
                                         jnp.where(block_keep, block, 0.0), (0, first))
    return (panel, jax.lax.dynamic_update_slice(keep, block_keep, (0, first)),
            jax.lax.dynamic_update_slice(errors, block_errors, (0, first)))

  return jax.lax.fori_loop(0, count, one_block,
                           (panel, jnp.ones(panel.shape, bool), jnp.zeros_like(panel)))


def _prune_block(block: jax.Array, u_block: jax.Array, block_keep: jax.Array | None,
                 nm: tuple[int, int] | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The inputs (columns) of one block pruned in order: (updated block, errors, keep-mask).

  Pruning input j moves every later input by error_j * u[j, j:]. Those
  updates are themselves lazy: inputs are visited in sub-blocks of a few
  columns, and the rest of the block is updated once per sub-block by a
  matrix product, which reads the block once per sub-block instead of once
  per input. With `block_keep` None, each group of m inputs gets its N:M mask
  when reached, from the weights updated so far (as the reference code does).
  """
  rows, length = block.shape
  sub = next((c for c in (16, 8, 4, 2, 1) if length % c == 0 and (nm is None or c % nm[1] == 0)),
             None) or nm[1]
  d = jnp.diagonal(u_block)
  columns = jnp.arange(length)

  def sub_block(s, carry):
    block, errors, keep = carry
    first = s * sub
    local = jax.lax.dynamic_slice(block, (0, first), (rows, sub))
    local_u = jax.lax.dynamic_slice(u_block, (first, first), (sub, sub))
    local_d = jax.lax.dynamic_slice(d, (first,), (sub,))
    local_keep = (jax.lax.dynamic_slice(keep, (0, first), (rows, sub)) if nm is None
                  else jnp.ones((rows, sub), bool))
    local_errors = jnp.zeros_like(local)
    for t in range(sub):
      if nm is not None and t % nm[1] == 0:
        group = local[:, t:t + nm[1]] ** 2 / local_d[None, t:t + nm[1]] ** 2
        local_keep = local_keep.at[:, t:t + nm[1]].set(selection.nm_mask(group, nm[0], nm[1], axis=1))
      error = jnp.where(local_keep[:, t], 0.0, local[:, t]) / local_d[t]
      local = local - error[:, None] * local_u[t][None, :]   # upper triangular: inputs >= t move
      local_errors = local_errors.at[:, t].set(error)
    later = jax.lax.dynamic_slice(u_block, (first, 0), (sub, length))
    later = jnp.where(columns[None, :] >= first + sub, later, 0.0)
    block = jax.lax.dynamic_update_slice(block - local_errors @ later, local, (0, first))
    return (block, jax.lax.dynamic_update_slice(errors, local_errors, (0, first)),
            jax.lax.dynamic_update_slice(keep, local_keep, (0, first)))

  keep = jnp.ones(block.shape, bool) if block_keep is None else block_keep
  return jax.lax.fori_loop(0, length // sub, sub_block, (block, jnp.zeros_like(block), keep))


def check_per_output(method: str, per_output: bool | None) -> bool:
  """Whether `method` compares weights within each output unit; None: the method's rule.

  Magnitude compares over the whole layer unless `per_output=True` (the
  Wanda paper's magnitude baseline is per layer); Wanda always compares
  within each output unit (as its authors' code does); SparseGPT chooses its
  mask per column block and takes no `per_output`.
  """
  if per_output is not None and not isinstance(per_output, bool):
    raise ValueError(f"per_output must be True, False or None, got {per_output!r}.")
  if method == "wanda" and per_output is False:
    raise ValueError("wanda compares scores within each output unit only (as its authors' code "
                     "does); per_output=False is magnitude's option.")
  if method == "sparsegpt" and per_output is not None:
    raise ValueError(f"sparsegpt chooses its mask per column block; per_output={per_output} "
                     "applies to magnitude only.")
  return method == "wanda" or bool(per_output)


def prune_layer(kernel: jax.Array, hessian: jax.Array | None, method: str, *,
                sparsity: float | None = None, nm: tuple[int, int] | None = None,
                axes: Sequence[int] = (0,), per_output: bool | None = None,
                block_size: int = 128, dampening: float = 0.01,
                name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """One kernel pruned by `method`: (new kernel, keep-mask), both of the kernel's shape.

  `hessian` is X^T X of the layer's inputs, (d_in, d_in) with d_in the product
  of the contraction `axes`; Wanda also takes its diagonal alone (d_in,),
  the inputs' squared norms (`linen_hessians(..., diagonal=True)`); magnitude
  pruning ignores it (may be None). Jitted: one compiled program per shape,
  method and target.
  Magnitude and Wanda only zero weights; SparseGPT also updates the kept ones.
  `per_output` (unstructured magnitude only): compare within each output
  unit instead of over the layer (see `check_per_output`).

  Inputs never seen (H_ii = 0) are handled as the authors do: SparseGPT sets
  H_ii = 1 and zeroes their weights (and marks them pruned, so an all-zero H
  prunes everything); Wanda scores them 0. NaN or inf in the kernel or H
  (from the calibration inputs X, or overflow) is a ValueError naming the
  layer (`name`, e.g. its path).

  >>> k, keep = prune_layer(jnp.array([[1., -4.], [3., 2.]]), None, 'magnitude', sparsity=0.5)
  >>> keep.tolist(), k.tolist()
  ([[False, True], [True, False]], [[0.0, -4.0], [3.0, 0.0]])
  """
  check_method(method)
  check_target(sparsity, nm)
  check_solver(block_size, dampening)
  per_output = check_per_output(method, per_output)
  name = name or f"kernel of shape {tuple(kernel.shape)}"
  axes = tuple(layouts.leaf_axes(tuple(axes), name, kernel.shape))
  d_in = math.prod(kernel.shape[a] for a in axes)
  if method != "magnitude":
    shapes = [(d_in, d_in)] + ([(d_in,)] if method == "wanda" else [])
    if hessian is None or tuple(hessian.shape) not in shapes:
      raise ValueError(f"{name}: {method} needs the inputs' Gram matrix of shape {shapes[0]}"
                       f"{' (or its diagonal)' if method == 'wanda' else ''} for a kernel of "
                       f"shape {kernel.shape} (axes {axes}), got "
                       f"{None if hessian is None else hessian.shape}.")
  if nm is not None and d_in % nm[1]:
    raise ValueError(f"{name}: kernel of shape {kernel.shape}: its {d_in} inputs (axes "
                     f"{axes}) are not divisible by M={nm[1]}.")
  hessian = None if method == "magnitude" else hessian   # magnitude reads no statistics
  new, keep, finite = _prune(kernel, hessian, method, None if sparsity is None else float(sparsity),
                             None if nm is None else tuple(nm), axes, per_output, block_size,
                             float(dampening))
  weights_finite, hessian_finite, result_finite = np.asarray(finite).tolist()   # no jax op: no compile
  if not weights_finite:
    raise ValueError(f"{name}: the weights hold NaN or inf.")
  if not hessian_finite:
    raise ValueError(f"{name}: the inputs' Gram matrix X^T X (so the calibration inputs X) hold "
                     "NaN or inf.")
  if not result_finite:
    raise ValueError(f"{name}: X^T X + lambda I is not positive definite (its Cholesky factor "
                     f"is not finite); raise dampening (now {dampening}).")
  return new, keep


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _prune(kernel, hessian, method, sparsity, nm, axes, per_output, block_size, dampening):
  """prune_layer's work, one compiled program per (shape, method, target, setting)."""
  matrix, back = as_matrix(kernel, axes)
  finite = [_all_finite(kernel), jnp.array(True) if hessian is None else _all_finite(hessian)]
  if method == "sparsegpt":
    new, keep = sparsegpt(matrix, hessian, sparsity=sparsity, nm=nm, block_size=block_size,
                          dampening=dampening)
    finite.append(_all_finite(new))
    return back(new), back(keep), jnp.stack(finite)
  scores = jnp.abs(matrix) if method == "magnitude" else wanda_scores(matrix, hessian)
  keep = _select(scores, sparsity, nm, per_output)
  finite.append(jnp.array(True))
  return (back(jnp.where(keep, matrix, 0).astype(kernel.dtype)), back(keep), jnp.stack(finite))


def _all_finite(x: jax.Array) -> jax.Array:
  """Whether `x` holds no NaN or inf: one fused sum of x - x (NaN iff some entry is not finite)."""
  x = x.astype(jnp.float32)
  return jnp.isfinite(jnp.sum(x - x))


def block_group(pattern: str = r"^.*?(?:_\d+|(?:^|/)\d+)(?=/)") -> Callable[[str], str]:
  """Path -> group: the first match of `pattern` (default: up to the first numbered module).

  A numbered module is a Linen `name_<i>` or an entry `name/<i>` of an NNX
  list of layers (`nnx.List`, a Python list), e.g. a Llama's
  `layers/3/...`.

  >>> g = block_group()
  >>> g('block_1/attention/query/kernel'), g('head/kernel')
  ('block_1', 'head/kernel')
  >>> g('model/layers/3/self_attn/q_proj/kernel'), g('0/fc/kernel')
  ('model/layers/3', '0')
  """
  compiled = re.compile(pattern)

  def group(path: str) -> str:
    found = compiled.search(path)
    return found.group(0) if found else path

  return group


def prune_sequentially(params: PyTree, hessians_fn: HessiansFn | None, method: str, *,
                       sparsity: GroupSparsity | None = None, nm: GroupNM | None = None,
                       leaf_filter: trees.LeafFilter | None = None,
                       axes: layouts.AxesSpec = None, group: Callable[[str], str] | None = None,
                       per_output: bool | None = None, block_size: int = 128,
                       dampening: float = 0.01,
                       log: Callable[[str], None] | None = None) -> tuple[PyTree, PyTree]:
  """Prunes every chosen kernel of `params`, group after group: (params, masks).

  Groups (by default transformer blocks, see `block_group`) are pruned in the
  order `hessians_fn` returns their kernels (the model's call order); before
  each group, `hessians_fn(params)` runs the model with the groups before it
  already pruned, so each group is calibrated on what it will see.
  Magnitude needs no calibration (`hessians_fn` may be None).

  Each group may have its own sparsity (a dict or callable, see
  `group_sparsities`), e.g. OWL's (Yin et al. 2024, `sparsejax.owl`): from
  the dense model's input norms, blocks with more outlier Wanda scores keep
  more weights, the mean density staying 1 - S::

    norms = linen_hessians(model, batches, diagonal=True)(params)
    targets = owl.owl_sparsities(owl.outlier_ratios(params, norms), 0.7)
    pruned, masks = prune_sequentially(params, linen_hessians(model, batches, diagonal=True),
                                       'wanda', sparsity=targets)

  (SparseGPT the same way, with `linen_hessians(model, batches)` in the last
  line.) `nm` may be per group too: OWL's N:M variant gives each block its
  own N of every M (`owl.owl_nm`). Each distinct target compiles its own
  program per kernel shape.

  Args:
    params: any params pytree (Linen dict, NNX state).
    hessians_fn: params -> {kernel path: X^T X of its inputs}, e.g. from
      `linen_hessians` (Linen) or `nnx_hessians` (NNX).
    method: 'magnitude', 'wanda' or 'sparsegpt'.
    sparsity: the fraction to prune from every chosen kernel, in [0, 1), or
      per group: {group name: sparsity} naming every group and no other, or
      a callable group name -> sparsity.
    nm: (N, M): keep N of every M inputs instead; or per group, a dict
      {group name: (N, M)} naming every group and no other, or a callable.
    leaf_filter: (path, leaf) -> bool; default: arrays of ndim >= 2.
    axes: contraction axes of each kernel (`layouts`); default rule.
    group: path -> group name; default `block_group()`.
    per_output: magnitude compares over the whole layer (None, False) or
      within each output unit (True); Wanda always compares within each
      output unit (False is an error); SparseGPT takes None only.
    log: called with one line per group.

  Returns:
    The pruned params (SparseGPT also updates kept weights) and bool masks
    (None on leaves not pruned).

  Raises:
    ValueError: for an unknown method, a bad target or setting, a group
      missing from (or unknown to) a per-group sparsity dict, and, naming
      the kernel: an N:M pattern a chosen kernel cannot take (every kernel is
      checked before any is pruned), a kernel whose inputs `hessians_fn` did
      not capture, NaN or inf in a kernel or its X^T X.
  """
  check_method(method)
  _check_targets(sparsity, nm)
  check_solver(block_size, dampening)
  check_per_output(method, per_output)
  if method != "magnitude" and hessians_fn is None:
    raise ValueError(f"{method} needs calibration: pass hessians_fn (e.g. linen_hessians(...) "
                     "or nnx_hessians(...)).")
  group = group or block_group()
  check_layers(params, method, sparsity=sparsity, nm=nm, leaf_filter=leaf_filter, axes=axes,
               block_size=block_size, group=group)
  rule = layouts.as_rule(axes)
  leaves = trees.named_leaves(params)
  chosen = pruning.prunable_leaves(params, leaf_filter)
  index = {leaves[i].path: i for i in chosen}
  names = [group(path) for path in index]
  targets = None if sparsity is None else group_sparsities(sparsity, names)
  patterns = None if nm is None else group_patterns(nm, names)
  if method == "magnitude":
    order = list(index)
  else:
    hessians = hessians_fn(params)
    missing = [p for p in index if p not in hessians]
    if missing:
      raise ValueError(f"no calibration inputs were captured for {missing}: their modules were not "
                       "called, or hessians_fn names them differently (captured: "
                       f"{list(hessians)[:8]}...). Exclude them with leaf_filter.")
    order = [p for p in hessians if p in index]
  groups: dict[str, list[str]] = {}
  for path in order:
    groups.setdefault(group(path), []).append(path)
  values = [leaf.value for leaf in leaves]
  masks: dict[int, jax.Array] = {}
  first = True
  for number, (name, paths) in enumerate(groups.items()):
    if method != "magnitude" and not first:
      hessians = hessians_fn(jax.tree.unflatten(jax.tree.structure(params), values))
    first = False
    for path in paths:
      i = index[path]
      kernel = values[i]
      values[i], masks[i] = prune_layer(
          kernel, None if method == "magnitude" else hessians[path], method,
          sparsity=None if targets is None else targets[name],
          nm=None if patterns is None else patterns[name], axes=rule(path, kernel.shape),
          per_output=per_output, block_size=block_size, dampening=dampening, name=path)
    if log:
      target = (f" at sparsity {targets[name]:.4g}" if _per_group(sparsity)
                else f" at N:M {patterns[name][0]}:{patterns[name][1]}" if _per_group(nm) else "")
      log(f"[{method}] group {number + 1}/{len(groups)} {name}: {len(paths)} kernel(s) pruned"
          f"{target}")
  pruned = jax.tree.unflatten(jax.tree.structure(params), values)
  return pruned, pruning.assemble_masks(params, chosen, [masks[i] for i in chosen])


def _kernel_path(module: nn.Module) -> str:
  return "/".join(module.scope.path) + "/kernel"


def linen_hessians(model: nn.Module, batches: Iterable[Any], *,
                   variables: Mapping[str, Any] | None = None,
                   apply_kwargs: Mapping[str, Any] | None = None,
                   diagonal: bool = False) -> HessiansFn:
  """params -> {kernel path: X^T X} over `batches`, for every Dense / DenseGeneral of a Linen model.

  The inputs of each call are captured with `nn.intercept_methods` (so
  Flax's attention projections are seen), flattened to (tokens, d_in) and
  accumulated in float32 over every batch, in one jitted forward per batch.
  Kernels appear in call order. `variables` holds collections other than
  'params' (e.g. batch_stats); `apply_kwargs` goes to `model.apply`.
  Paths are relative to the 'params' collection. With `diagonal`, only the
  diagonal of X^T X (each input's squared norm, shape (d_in,)) is
  accumulated: all that Wanda needs, d_in times less work and memory.
  """
  batches = list(batches)
  if not batches:
    raise ValueError("linen_hessians needs at least one calibration batch.")
  extra = dict(variables or {})
  kwargs = dict(apply_kwargs or {})

  order: list[str] = []   # kernels in call order, recorded while tracing

  @jax.jit
  def one_batch(params, batch):
    captured: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kw, context):
      module = context.module
      if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)) and args:
        path = _kernel_path(module)
        x = jnp.asarray(args[0])
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        if kernel is not None:
          d_in = math.prod(kernel.shape) // _out_size(module, kernel)
          x = x.reshape(-1, d_in).astype(jnp.float32)
          gram = jnp.sum(x * x, axis=0) if diagonal else x.T @ x
          captured[path] = captured.get(path, 0.0) + gram
          if path not in order:
            order.append(path)
      return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
      model.apply({"params": params, **extra}, batch, **kwargs)
    return captured

  def hessians(params):
    total: dict[str, jax.Array] = {}
    for batch in batches:
      for path, h in one_batch(params, batch).items():
        total[path] = total[path] + h if path in total else h
    return {path: total[path] for path in order if path in total}

  return hessians


def _out_size(module: nn.Module, kernel: jax.Array) -> int:
  """Output entries of a Dense / DenseGeneral kernel (its trailing `features` axes)."""
  features = module.features
  features = (features,) if isinstance(features, int) else tuple(features)
  return int(np.prod(features))


NNX_LINEAR = ("Linear", "LinearGeneral", "Einsum")   # the nnx layers `nnx_hessians` captures


def _nnx_linear_types() -> tuple[type, ...]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return tuple(getattr(nnx, name) for name in NNX_LINEAR)


def _einsum_inputs(spec: str, x: jax.Array, kernel_shape: tuple[int, ...], name: str
                   ) -> jax.Array:
  """The input x of `lhs,rhs->out` as (tokens, d_in), d_in the kernel's contracted axes in order."""
  try:
    operands, out = spec.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
  except ValueError:
    raise ValueError(f"{name}: einsum '{spec}' is not of the form 'lhs,rhs->out'.") from None
  if "..." in rhs:
    raise ValueError(f"{name}: einsum '{spec}' has '...' in the kernel's indices.")
  if "..." in lhs:   # the ellipsis as letters of its own, absent from the kernel
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec]
    extra = "".join(free[:x.ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", extra), out.replace("...", extra)
  batched = [c for c in rhs if c in lhs and c in out]
  if batched:
    raise ValueError(f"{name}: einsum '{spec}' maps kernel index {batched[0]!r} to the output "
                     "as well as the input (a batched kernel has no single X^T X); exclude it "
                     "with leaf_filter.")
  contracted = [c for c in rhs if c in lhs]
  order = [lhs.index(c) for c in lhs if c not in contracted] + [lhs.index(c) for c in contracted]
  d_in = math.prod(kernel_shape[rhs.index(c)] for c in contracted)
  return jnp.transpose(x, order).reshape(-1, d_in)


def _nnx_inputs(module, args: tuple, kwargs: Mapping[str, Any], name: str) -> jax.Array:
  """The first input of an nnx.Linear / LinearGeneral / Einsum call as (tokens, d_in) float32.

  d_in runs over the kernel's contraction axes in the kernel's order,
  flattened row-major, as `layouts` and `as_matrix` read the kernel.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(args[0])
  kernel_shape = tuple(module.kernel.shape)
  if isinstance(module, nnx.Einsum):
    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    x = _einsum_inputs(spec, x, kernel_shape, name)
  elif isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise ValueError(f"{name}: LinearGeneral with batch_axis={dict(module.batch_axis)} has a "
                       "kernel per batch entry (no single X^T X); exclude it with leaf_filter.")
    axes = [a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis)]
    x = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
    x = x.reshape(-1, math.prod(x.shape[x.ndim - len(axes):]))
  else:
    x = x.reshape(-1, kernel_shape[0])
  return x.astype(jnp.float32)


def nnx_hessians(model, batches: Iterable[Any], *,
                 call: Callable[[Any, Any], Any] | None = None,
                 prefix: str = "", diagonal: bool = False) -> HessiansFn:
  """params -> {kernel path: X^T X} over `batches`, for every nnx.Linear / LinearGeneral / Einsum.

  The NNX counterpart of `linen_hessians`, so that `prune_sequentially`
  prunes an NNX model with no hand-written capture::

    hessians = oneshot.nnx_hessians(model, calibration)
    params = nnx.state(model, nnx.Param)
    pruned, masks = oneshot.prune_sequentially(params, hessians, 'sparsegpt', nm=(2, 4))
    nnx.update(model, pruned)

  `model` gives the structure (and any non-parameter state, e.g. batch
  statistics); the returned function runs it with the weights it is given:
  an `nnx.State` of the model's `nnx.Param`s or the same as a pure dict
  (`nnx.to_pure_dict`), or, with `prefix='model'`, a dict holding that
  under 'model' (the Linen params of `nnx.bridge.to_linen(..., name='model')`,
  paths then start with 'model/'). So each call of `prune_sequentially`
  captures the inputs that the already pruned blocks produce.

  During tracing the `__call__` of each captured class is wrapped; the first
  argument of every call is flattened to (tokens, d_in), d_in running over
  the kernel's contraction axes in the kernel's order (`layouts`), and X^T X
  (or, with `diagonal`, only its diagonal, all Wanda needs) is accumulated
  in float32 over every batch, in one jitted forward per batch. Kernels
  appear in call order; a module called twice sums both inputs. `call`
  (model, batch) -> anything runs the model (default `model(batch)`).

  Raises:
    ValueError: with no batches; naming the module, for an Einsum whose
      kernel shares an index with the input and the output, or a
      LinearGeneral with batch axes (neither has one X^T X).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  batches = list(batches)
  if not batches:
    raise ValueError("nnx_hessians needs at least one calibration batch.")
  call = call or (lambda m, batch: m(batch))
  graphdef, template, rest = nnx.split(model, nnx.Param, ...)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  kinds = _nnx_linear_types()
  head = f"{prefix}/" if prefix else ""
  order: list[str] = []   # kernels in call order, recorded while tracing

  def as_state(params):
    if prefix:
      params = params[prefix]
    if isinstance(params, nnx.State):
      return params
    state = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(state, params)
    return state

  @jax.jit
  def one_batch(state, rest, batch):
    module = nnx.merge(graphdef, state, rest)
    layers = [(path, m) for path, m in nnx.iter_modules(module)
              if isinstance(m, kinds) and isinstance(getattr(m, "kernel", None), nnx.Param)]
    names = {id(m): head + "/".join(str(p) for p in path) + "/kernel" for path, m in layers}
    # The class in each layer's MRO that defines the __call__ it runs: wrapped while tracing.
    owners = {next(c for c in type(m).__mro__ if "__call__" in c.__dict__) for _, m in layers}
    captured: dict[str, jax.Array] = {}
    active: set[int] = set()   # a subclass calling super().__call__ is captured once

    def wrap(original):
      def wrapper(self, *args, **kwargs):
        path = names.get(id(self))
        if path is None or id(self) in active or not args:
          return original(self, *args, **kwargs)
        x = _nnx_inputs(self, args, kwargs, path)
        gram = jnp.sum(x * x, axis=0) if diagonal else x.T @ x
        captured[path] = captured[path] + gram if path in captured else gram
        if path not in order:
          order.append(path)
        active.add(id(self))
        try:
          return original(self, *args, **kwargs)
        finally:
          active.discard(id(self))
      return wrapper

    originals = {cls: cls.__dict__["__call__"] for cls in owners}
    try:
      for cls, original in originals.items():
        cls.__call__ = wrap(original)
      call(module, batch)
    finally:
      for cls, original in originals.items():
        cls.__call__ = original
    return captured

  def hessians(params):
    state = as_state(params)
    total: dict[str, jax.Array] = {}
    for batch in batches:
      for path, h in one_batch(state, rest, batch).items():
        total[path] = total[path] + h if path in total else h
    return {path: total[path] for path in order if path in total}

  return hessians
