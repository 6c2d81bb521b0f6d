"""Compressed export of a sparse model: kept values and 1-bit masks in one file.

A dense checkpoint of a 90%-sparse model still spends 4 bytes on every zero.
`export_sparse` stores, for each masked leaf, only the kept values plus the
mask packed to 1 bit per weight (`sparsejax.pack_masks`), so a float32 leaf
costs about `density * 4 + 1 / 8` bytes per weight; `load_sparse` rebuilds
the dense arrays bit for bit.

N:M masks (`sparsejax.nm_mask`: n kept in every m consecutive entries along
one axis) need no bit mask: with `export_sparse(..., nm=(n, m))` each kept
value is stored with its position inside its group, ceil(log2 m) bits, so a
float32 leaf costs `n / m * (4 + ceil(log2 m) / 8)` bytes per weight:
2.125 for 2:4 (the same as with a bit mask) and 0.547 for 1:8 (0.625 with a
bit mask). The layout also states the N:M structure that sparse kernels
(e.g. 2:4 sparse tensor cores) consume.

The file is an uncompressed `.npz` (`np.savez`), readable with NumPy alone:

  header        uint8 bytes of a UTF-8 JSON object:
                {"format": "sparsejax.sparse_export", "version": 2,
                 "leaves": [{"path": "Dense_0/kernel", "shape": [784, 300],
                             "dtype": "float32", "kept": 23520}, ...]}
                in jax.tree order; "kept" is present only for masked leaves,
                "nm": {"n": 2, "m": 4, "axis": 0} only for N:M leaves (axis
                is non-negative), or {"n": 2, "m": 4, "axes": [0, 1]} for
                a leaf that contracts several axes (an attention output
                kernel): its arrays then describe the leaf with those axes
                merged into one, in place of the first (`sparsejax.layouts.
                GroupedView`). "version" is the oldest reader version
                that can read the file: 1 without N:M leaves, 2 with
                single-axis N:M leaves, else 3.
  {i}.values    masked leaf i: its kept values, 1-D, in row-major order of
                the mask (`w[mask]` in NumPy);
  {i}.mask      masked leaf i: the packed mask, uint8[ceil(size / 8)],
                `np.packbits` bit order;
  {i}.nm_values N:M leaf i: the n kept values of each group, in ascending
                in-group position, grouped along the N:M axis: the leaf's
                shape with that axis' length L replaced by L // m * n, group
                g holding entries g * n ... g * n + n - 1 of the axis;
  {i}.nm_index  N:M leaf i: the in-group position (0 ... m - 1) of every
                value of `{i}.nm_values`, in its row-major order, as
                b = ceil(log2 m) bit planes: plane k (k = 0 is the least
                significant bit) holds bit k of every position; the planes
                are concatenated, plane 0 first, and packed with
                `np.packbits` to uint8[ceil(b * kept / 8)] (empty for m = 1);
  {i}.dense     unmasked leaf i: the whole array.

Arrays are stored in their own dtype when NumPy has it; other dtypes
(bfloat16, float8, int4: the `ml_dtypes` types) are stored as their raw bits
(an unsigned int of the same width) and viewed back on load, so that every
value, NaN payloads and -0.0 included, round-trips exactly.
"""

from __future__ import annotations

import json
import numbers
import os
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import layouts
from sparsejax import masks as masks_lib
from sparsejax import trees

PyTree = Any
FORMAT = "sparsejax.sparse_export"
VERSION = 3  # the newest version this module reads and writes
_NM_VERSION = 2  # the first version with N:M leaves
_NM_AXES_VERSION = 3  # the first version with N:M leaves over several axes
_MAX_M = 256  # in-group positions are stored as uint8 before packing
_HEADER = "header"
# What a truncated or corrupted zip member raises while being read.
_READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError)


class ExportStats(NamedTuple):
  """Sizes of one export, as returned by `export_sparse`."""

  file_bytes: int  # size of the written file on disk
  dense_bytes: int  # sum of the leaves' nbytes: a raw dense dump
  ratio: float  # file_bytes / dense_bytes
  kept: int  # True mask entries over all masked leaves


def _storage_dtype(dtype: np.dtype) -> np.dtype:
  """The dtype an array is written as: its own, or raw bits for ml_dtypes."""
  if dtype.kind in "biufc":
    return dtype
  return np.dtype(f"u{dtype.itemsize}")


def _check_nm(nm: Any) -> tuple[int, int, layouts.AxesSpec]:
  """`(n, m, axes)` from the `nm` argument of `export_sparse`; axes None if absent."""
  ok = isinstance(nm, (tuple, list)) and len(nm) in (2, 3) and all(
      isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in nm[:2])
  if not ok:
    raise ValueError(f"nm must be (n, m) or (n, m, axes) with int n and m, got {nm!r}.")
  n, m, axes = (int(nm[0]), int(nm[1]), *nm[2:], None)[:3]
  if not 1 <= m <= _MAX_M or not 0 <= n <= m:
    raise ValueError(f"nm needs 0 <= n <= m and 1 <= m <= {_MAX_M}, got n={n}, m={m}.")
  return n, m, axes


def _index_bits(m: int) -> int:
  """Bits per in-group position: ceil(log2 m), 0 for m = 1."""
  return (m - 1).bit_length()


def _grouped(shape: tuple[int, ...], axis: int, m: int) -> tuple[int, ...]:
  """`shape` with `axis` split into (groups, m)."""
  return shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:]


def _pack_index(index: np.ndarray, m: int) -> np.ndarray:
  """Packs uint8 in-group positions as bit planes, least significant first."""
  planes = index.reshape(1, -1) >> np.arange(_index_bits(m), dtype=np.uint8).reshape(-1, 1)
  return np.packbits((planes & 1).reshape(-1))


def _unpack_index(packed: np.ndarray, count: int, m: int) -> np.ndarray:
  """Inverse of `_pack_index`: `count` uint8 positions, 1-D."""
  bits = _index_bits(m)
  planes = np.unpackbits(packed, count=bits * count).reshape(bits, count)
  weights = (1 << np.arange(bits, dtype=np.uint16)).reshape(-1, 1)
  return (planes * weights).sum(axis=0, dtype=np.uint16).astype(np.uint8)


def _nm_split(path: str, stored: np.ndarray, mask: np.ndarray,
              n: int, m: int, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
  """The N:M layout of one leaf: `(nm_values, nm_index, axis >= 0)`.

  Raises:
    ValueError: naming the leaf, if the axis is out of range or its length
      is not divisible by m, or naming the first group that does not keep
      exactly n entries.
  """
  shape = mask.shape
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"nm axis {axis} is out of range for mask '{path}' of shape {shape}.")
  axis %= len(shape)
  if shape[axis] % m:
    raise ValueError(f"mask '{path}' of shape {shape}: axis {axis} has length {shape[axis]}, "
                     f"not divisible by m={m}.")
  member = axis + 1  # the in-group axis of the grouped arrays
  grouped = mask.reshape(_grouped(shape, axis, m))
  counts = grouped.sum(axis=member)
  bad = np.argwhere(counts != n)
  if bad.size:
    group = tuple(int(k) for k in bad[0])
    start = group[axis] * m
    raise ValueError(
        f"mask '{path}' is not {n}:{m} along axis {axis}: group {group} (entries "
        f"{start}..{start + m - 1} of axis {axis}) keeps {counts[group]}, not {n}.")
  last = np.moveaxis(grouped, member, -1)
  # Row-major nonzero: the kept positions of each group, in ascending order.
  index = np.nonzero(last)[-1].astype(np.uint8).reshape(last.shape[:-1] + (n,))
  values = np.take_along_axis(
      np.moveaxis(stored.reshape(grouped.shape), member, -1), index, axis=-1)
  out_shape = shape[:axis] + (shape[axis] // m * n,) + shape[axis + 1:]

  def regroup(a: np.ndarray) -> np.ndarray:  # (..., n) back along `axis`
    return np.moveaxis(a, -1, member).reshape(out_shape)

  return regroup(values), regroup(index), axis


def export_sparse(params: PyTree, masks: PyTree, path: str | os.PathLike,
                  nm: tuple[int, ...] | None = None) -> ExportStats:
  """Writes the kept weights of a pruned model, and its masks, to one file.

  Pruned entries are dropped, not checked: a masked leaf may hold nonzero
  values where its mask is False (e.g. dense weights with masks applied on
  the fly) and those values are lost, so `load_sparse` returns
  `apply_masks(params, masks)`, with +0.0 at every pruned entry.

  With `nm=(n, m)` every masked leaf must be N:M sparse (as made by
  `sparsejax.nm_mask`) and is stored as its kept values plus their in-group
  positions instead of a bit mask (see the module docstring). That is
  smaller whenever n * ceil(log2 m) < m (1:4, 1:8, 2:8; 2:4 ties), and the
  N:M structure is checked and recorded in the file.

  The file is written to a temporary name next to `path` and renamed, so an
  interrupted export never leaves a partial file at `path`. No suffix is
  added to `path`.

  >>> import os, tempfile
  >>> params = {'w': jnp.array([[1., -2.], [3., 4.]]), 'b': jnp.zeros(2)}
  >>> masks = {'w': jnp.array([[True, False], [False, True]]), 'b': None}
  >>> with tempfile.TemporaryDirectory() as d:
  ...   stats = export_sparse(params, masks, os.path.join(d, 'model.npz'))
  ...   restored, restored_masks = load_sparse(os.path.join(d, 'model.npz'))
  >>> stats.kept, stats.dense_bytes
  (2, 24)
  >>> restored['w'].tolist(), restored_masks['b']
  ([[1.0, 0.0], [0.0, 4.0]], None)

  Args:
    params: a pytree of arrays: a Flax Linen params dict, an NNX `nnx.State`
      or any nested dict / list of arrays.
    masks: bool masks with the structure of `params`, None where a leaf is
      not pruned (as made by `sparsejax.compute_masks`).
    path: the file to write (replaced if it exists).
    nm: None for kept values plus bit masks, or `(n, m)` / `(n, m, axes)`
      to store every masked leaf in the N:M layout; each must keep exactly n
      of every m consecutive entries along its contraction axes. `axes` is
      a rule of `sparsejax.layouts` (absent or None: the default rule, as
      for `sparsejax.nm_masks`).

  Returns:
    `ExportStats` of the written file.

  Raises:
    ValueError: if the masks tree does not match params, a mask is not bool,
      or two leaves share a '/'-joined path (names the leaf); if `nm` is
      malformed, or a masked leaf is not N:M along its axis (names the leaf
      and the first offending group, or the axis length not divisible by m).
  """
  nm = None if nm is None else _check_nm(nm)
  arrays = {}
  entries = []
  dense_bytes = kept = 0
  version = 1
  seen = set()
  for i, leaf in enumerate(trees.leaves_with_masks(params, masks)):
    p, m = trees.Leaf(leaf.path, leaf.param), trees.Leaf(leaf.path, leaf.mask)
    if p.path in seen:
      raise ValueError(f"two parameters have the path '{p.path}'; export needs unique paths.")
    seen.add(p.path)
    value = np.asarray(p.value)
    dense_bytes += value.nbytes
    stored = value.view(_storage_dtype(value.dtype))
    entry = {"path": p.path, "shape": list(value.shape), "dtype": value.dtype.name}
    if m.value is None:
      arrays[f"{i}.dense"] = stored
    else:
      mask = np.asarray(m.value)
      if mask.dtype != bool:
        raise ValueError(f"mask '{m.path}' has dtype {mask.dtype}; masks must be bool.")
      entry["kept"] = int(np.count_nonzero(mask))
      if nm is None:
        arrays[f"{i}.values"] = stored[mask]
        arrays[f"{i}.mask"] = np.asarray(masks_lib.pack_masks(mask))
      else:
        contraction = layouts.leaf_axes(nm[2], p.path, mask.shape)
        view = layouts.GroupedView(mask.shape, contraction)
        values, index, axis = _nm_split(p.path, view.to_view(stored), view.to_view(mask),
                                        nm[0], nm[1], view.axis)
        arrays[f"{i}.nm_values"] = values
        arrays[f"{i}.nm_index"] = _pack_index(index, nm[1])
        if len(contraction) == 1:
          entry["nm"] = {"n": nm[0], "m": nm[1], "axis": axis}
          version = max(version, _NM_VERSION)
        else:
          entry["nm"] = {"n": nm[0], "m": nm[1], "axes": list(contraction)}
          version = _NM_AXES_VERSION
      kept += entry["kept"]
    entries.append(entry)
  header = {"format": FORMAT, "version": version, "leaves": entries}
  arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)

  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:  # a file object: np.savez adds no '.npz'
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  file_bytes = os.path.getsize(path)
  ratio = file_bytes / dense_bytes if dense_bytes else float("inf")
  return ExportStats(file_bytes, dense_bytes, ratio, kept)


def _describe(path: str, shape: tuple[int, ...], dtype: Any) -> str:
  return f"'{path}' {np.dtype(dtype).name}{list(shape)}"


def _check_like(file: str, entries: list[dict], like: PyTree) -> None:
  """Raises ValueError naming the first leaf where the file and `like` differ."""
  like_leaves = trees.named_leaves(like)
  for i in range(max(len(entries), len(like_leaves))):
    if i < len(entries):
      e = entries[i]
      ours = _describe(e["path"], tuple(e["shape"]), e["dtype"])
    else:
      ours = "<none: the file's leaves end here>"
    if i < len(like_leaves):
      leaf = like_leaves[i]
      dtype = leaf.value.dtype if hasattr(leaf.value, "dtype") else np.asarray(leaf.value).dtype
      theirs = _describe(leaf.path, tuple(np.shape(leaf.value)), dtype)
    else:
      theirs = "<none: like's leaves end here>"
    if ours != theirs:
      raise ValueError(f"{file}: leaf {i} does not match `like`: the file has {ours}, "
                       f"like has {theirs}.")


def _nest(file: str, paths: list[str], values: list[Any]) -> dict:
  """Nested dicts keyed by the parts of each '/'-joined path."""
  root: dict = {}
  for path, value in zip(paths, values):
    *parents, last = path.split("/")
    node = root
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"{file}: leaf '{path}' sits under another leaf; pass `like`.")
    if last in node:
      raise ValueError(f"{file}: leaf '{path}' clashes with another leaf; pass `like`.")
    node[last] = value
  return root


class _Reader:
  """Reads the members of an open export, naming the file and leaf in errors."""

  def __init__(self, file: str, npz: Any):
    self.file = file
    self.npz = npz

  def error(self, leaf: str, message: str) -> ValueError:
    return ValueError(f"{self.file}: leaf '{leaf}': {message}")

  def array(self, leaf: str, name: str, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """Member `name`, checked to hold `dtype` (and `shape`, or any 1-D shape)."""
    if name not in self.npz.files:
      raise self.error(leaf, f"array '{name}' is missing (truncated or corrupted file?).")
    try:
      a = self.npz[name]
    except _READ_ERRORS as e:
      raise self.error(leaf, f"cannot read array '{name}' (truncated or corrupted file?): {e}") from e
    ok_shape = a.ndim == 1 if shape is None else a.shape == shape
    if a.dtype != dtype or not ok_shape:
      want = f"{dtype.name}{list(shape) if shape is not None else '[n]'}"
      raise self.error(leaf, f"array '{name}' is {a.dtype.name}{list(a.shape)}, expected {want}.")
    return a

  def leaf(self, i: int, entry: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The dense array and mask (None if unmasked) of leaf `i`."""
    path, shape = entry["path"], tuple(entry["shape"])
    try:
      dtype = np.dtype(jnp.dtype(entry["dtype"]))
    except TypeError as e:
      raise self.error(path, f"unknown dtype {entry['dtype']!r}.") from e
    storage = _storage_dtype(dtype)
    if "kept" not in entry:
      return self.array(path, f"{i}.dense", storage, shape).view(dtype), None
    if "nm" in entry:
      dense, mask = self.nm_leaf(i, entry, storage)
      return dense.view(dtype), mask
    values = self.array(path, f"{i}.values", storage, None)
    packed = self.array(path, f"{i}.mask", np.dtype(np.uint8), ((int(np.prod(shape)) + 7) // 8,))
    mask = np.asarray(masks_lib.unpack_masks(
        {path: packed}, {path: jax.ShapeDtypeStruct(shape, bool)})[path])
    n = int(np.count_nonzero(mask))
    if values.size != n or entry["kept"] != n:
      raise self.error(path, f"{values.size} kept values stored (header says {entry['kept']}) "
                       f"but the mask keeps {n} (truncated or corrupted file?).")
    dense = np.zeros(shape, storage)
    dense[mask] = values
    return dense.view(dtype), mask

  def nm_leaf(self, i: int, entry: dict, storage: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The dense array (as `storage` bits) and mask of N:M leaf `i`."""
    path, leaf_shape = entry["path"], tuple(entry["shape"])
    spec = entry["nm"]
    try:
      n, m = spec["n"], spec["m"]
      axes = spec["axes"] if "axes" in spec else [spec["axis"]]
      ok = all(isinstance(k, int) and not isinstance(k, bool) for k in (n, m, *axes))
      ok = ok and 1 <= m <= _MAX_M and 0 <= n <= m and 0 < len(axes) < len(leaf_shape)
      ok = ok and list(axes) == sorted(set(axes)) and 0 <= axes[0] and axes[-1] < len(leaf_shape)
      view = layouts.GroupedView(leaf_shape, tuple(axes)) if ok else None
      ok = ok and view.length % m == 0
    except (KeyError, TypeError) as e:
      raise self.error(path, f"unreadable N:M entry {spec!r} (corrupted file?).") from e
    if not ok:
      raise self.error(path, f"N:M entry {spec!r} does not fit shape {list(leaf_shape)} "
                       f"(corrupted file?).")
    shape, axis = view.shape, view.axis
    member = axis + 1  # the in-group axis of the grouped arrays
    values_shape = shape[:axis] + (shape[axis] // m * n,) + shape[axis + 1:]
    count = int(np.prod(values_shape))
    if entry["kept"] != count:
      raise self.error(path, f"header says {entry['kept']} kept but {n}:{m} of shape "
                       f"{list(shape)} keeps {count} (corrupted file?).")
    values = self.array(path, f"{i}.nm_values", storage, values_shape)
    packed = self.array(path, f"{i}.nm_index", np.dtype(np.uint8),
                        ((_index_bits(m) * count + 7) // 8,))
    flat = _unpack_index(packed, count, m)
    split = shape[:axis] + (shape[axis] // m, n) + shape[axis + 1:]
    if np.any(flat >= m):
      at = np.unravel_index(int(np.argmax(flat >= m)), split)
      group = tuple(int(k) for k in at[:member] + at[member + 1:])
      raise self.error(path, f"in-group index {flat.reshape(split)[at]} of group {group} "
                       f"is >= m={m} (corrupted file?).")
    index = np.moveaxis(flat.reshape(split), member, -1)
    # Positions must strictly increase within a group: no duplicates, and
    # the order the values are stored in.
    bad = np.argwhere(np.any(np.diff(index.astype(np.int16), axis=-1) <= 0, axis=-1))
    if bad.size:
      group = tuple(int(k) for k in bad[0])
      got = index[group].tolist()
      what = "repeat a position" if len(set(got)) < n else "are not ascending"
      raise self.error(path, f"the in-group indices {got} of group {group} {what} "
                       f"(corrupted file?).")
    groups = index.shape[:-1] + (m,)  # every group, its m entries last
    dense = np.zeros(groups, storage)
    mask = np.zeros(groups, bool)
    np.put_along_axis(dense, index, np.moveaxis(values.reshape(split), member, -1), axis=-1)
    np.put_along_axis(mask, index, True, axis=-1)
    return (view.from_view(np.moveaxis(dense, -1, member).reshape(shape)),
            view.from_view(np.moveaxis(mask, -1, member).reshape(shape)))


def _read_header(file: str, npz: Any) -> list[dict]:
  """The leaf entries of the header, after checking format and version."""
  if _HEADER not in npz.files:
    raise ValueError(f"{file}: no '{_HEADER}' array; not a sparsejax export.")
  try:
    header = json.loads(npz[_HEADER].tobytes().decode())
    fmt, version, entries = header["format"], header["version"], header["leaves"]
  except (*_READ_ERRORS, KeyError, TypeError) as e:
    raise ValueError(f"{file}: unreadable header (truncated or corrupted file?): {e}") from e
  if fmt != FORMAT:
    raise ValueError(f"{file}: format is {fmt!r}, not {FORMAT!r}.")
  if version > VERSION:
    raise ValueError(f"{file}: format version {version} is newer than this sparsejax "
                     f"(reads up to {VERSION}); upgrade sparsejax.")
  return entries


def load_sparse(path: str | os.PathLike, like: PyTree | None = None) -> tuple[PyTree, PyTree]:
  """Reads a file written by `export_sparse` back into dense params and masks.

  Arrays come back as NumPy arrays of their saved dtype (so float64 survives
  even without `jax_enable_x64`), bit for bit equal to the exported values,
  with +0.0 at pruned entries.

  Args:
    path: a file written by `export_sparse`.
    like: optional params pytree (arrays or `jax.ShapeDtypeStruct`s) whose
      structure the result takes, e.g. a freshly initialized model's params
      or `nnx.State`. Its '/'-joined paths, shapes and dtypes must equal the
      file's. Without it, the result is nested dicts keyed by the parts of
      each path (list indices become string keys such as '0').

  Returns:
    `(params, masks)`: masks holds bool arrays for masked leaves and None
    for the others.

  Raises:
    ValueError: if the file is truncated, corrupted or not an export (names
      the file, and the leaf when one is at fault), or does not match `like`
      (names the first differing leaf, with both shapes and dtypes).
  """
  file = os.fspath(path)
  try:
    npz = np.load(file, allow_pickle=False)
  except (zipfile.BadZipFile, EOFError, ValueError) as e:
    raise ValueError(f"{file}: not a readable sparsejax export (truncated or corrupted?): {e}") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f"{file}: a single NumPy array (.npy), not a sparsejax export (.npz "
                     "written by export_sparse).")
  with npz:
    entries = _read_header(file, npz)
    if like is not None:
      _check_like(file, entries, like)
    reader = _Reader(file, npz)
    leaves = [reader.leaf(i, e) for i, e in enumerate(entries)]
  values = [v for v, _ in leaves]
  masks = [m for _, m in leaves]
  if like is not None:
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, values), jax.tree.unflatten(treedef, masks)
  paths = [e["path"] for e in entries]
  return _nest(file, paths, values), _nest(file, paths, masks)
