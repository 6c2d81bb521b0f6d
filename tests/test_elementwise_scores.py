"""`elementwise_scores`: top-k of scores fn(*arrays) computed inside each pass, never stored.

Masks must be bitwise those of the stored array fn(*arrays) and of a NumPy
stable sort (ties to the lower flat index, or the lower position in the
concatenation for one global sparsity), eager, jitted, under vmap, pmap
and FSDP sharding. Arrays of 300 x 700 (more than `kth._SAMPLE` keys) take
the counting and extraction passes, with a strided sample that evaluates fn
on a part of the arrays; small ones are ranked on their whole sample; the
`passes` fixture (from tests/test_selection_passes.py) shrinks the sample so
that small arrays take the passes and the fallback loop too. The
temporaries test pins why the API exists: inside a jitted program the stored
form keeps |w| (a temporary the size of w), the lazy form keeps none.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax
import tests
from sparsejax import kth
from sparsejax import selection
from sparsejax import elementwise_scores
from sparsejax import topk_mask
from sparsejax import topk_masks
from sparsejax import topk_masks_by_count
from tests.test_fsdp import _collectives
from tests.test_fsdp import _mesh
from tests.test_selection_passes import passes  # noqa: F401  (a fixture)

BIG = (300, 700)     # 210,000 keys: more than kth._SAMPLE, so the passes run
MEDIUM = (150, 140)  # 21,000 keys: the passes too, in less time
SMALL = (7, 13)      # ranked on its whole sample


# Module-level functions: the selection's compiled program is keyed on the fn object.
def _abs_product(g, w):
  return jnp.abs(g * w)


def _abs_over(w, c):
  return jnp.abs(w) / c


def _abs_times(w, c):
  return jnp.abs(w) * c


def _product(a, b):
  return a * b


def _reference(scores, keep, candidates=None):
  """Top-`keep` masks by a stable argsort on -scores (NumPy, sharing nothing with sparsejax).

  `keep` is a list (one count per array) or one count over the
  concatenation of the arrays, ties going to the lower position in it. NaN
  ranks below every number (NumPy sorts it last); entries whose candidate is
  False rank below every candidate, all tied.
  """
  flats = [np.asarray(s).ravel() for s in scores]
  integer = all(np.issubdtype(f.dtype, np.integer) for f in flats)
  if not integer:
    flats = [f.astype(np.float64) for f in flats]
  if candidates is None:
    candidates = [None] * len(scores)
  lives = [np.ones(f.size, bool) if c is None else np.asarray(c).ravel()
           for f, c in zip(flats, candidates)]

  def top(flat, live, k):
    # Integers by their rank among the distinct values: -x overflows at
    # int64's minimum, and uint64 does not fit int64.
    down = -np.unique(flat, return_inverse=True)[1].reshape(-1).astype(np.int64) if integer else -flat
    if live.all():
      order = np.argsort(down, kind="stable")
    else:   # candidates first, by score; the rest tied
      order = np.lexsort((np.where(live, down, 0), ~live))
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask

  if isinstance(keep, (list, tuple)):
    masks = [top(f, live, k) for f, live, k in zip(flats, lives, keep)]
  else:
    whole = top(np.concatenate(flats), np.concatenate(lives), keep)
    masks = np.split(whole, np.cumsum([f.size for f in flats])[:-1])
  return [m.reshape(np.shape(s)) for m, s in zip(masks, scores)]


def _keep(size, sparsity):
  return int(round((1 - sparsity) * size))


def _assert_masks_equal(got, want, what):
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"{what}, array {i}")


def _case(name):
  """(fn, arrays) of a parametrized case."""
  rng = np.random.default_rng(sum(map(ord, name)))
  normal = lambda shape: rng.normal(size=shape).astype(np.float32)
  if name == "abs":
    return jnp.abs, (normal(BIG),)
  if name == "abs_of_product":
    return _abs_product, (normal(BIG), normal(BIG))
  if name == "0d_factor":
    return _abs_times, (normal(BIG), np.array(3.0, np.float32))
  if name == "0d_divisor":
    return _abs_over, (normal(BIG), np.array(3.0, np.float32))
  if name == "ties":            # integer-valued: +-v tie under abs, at every threshold
    return jnp.abs, (rng.integers(-5, 6, size=BIG).astype(np.float32),)
  if name == "ties_small":
    return jnp.abs, (rng.integers(-2, 3, size=SMALL).astype(np.float32),)
  raise ValueError(name)


SPARSITIES = (0.0, 0.25, 0.9, 0.999, 1.0)


# Jitted here for two cases: products, 0-d factors and ties are jitted in the
# tests below (per-array and global, by count, NaN, pmap, sharding).
@pytest.mark.parametrize("name, jit", [("abs", True), ("ties", False), ("abs_of_product", False),
                                       ("0d_factor", False), ("ties_small", True)])
def test_masks_of_elementwise_scores_equal_the_stored_scores_and_numpy(name, jit):
  fn, arrays = _case(name)
  stored = np.asarray(fn(*arrays))
  jitted = jax.jit(lambda s, *a: topk_mask(elementwise_scores(fn, *a), s))
  for sparsity in SPARSITIES:
    want = _reference([stored], [_keep(stored.size, sparsity)])[0]
    eager = topk_mask(elementwise_scores(fn, *arrays), sparsity)
    np.testing.assert_array_equal(np.asarray(eager), want, err_msg=f"eager, sparsity {sparsity}")
    np.testing.assert_array_equal(np.asarray(topk_mask(stored, sparsity)), want,
                                  err_msg=f"stored, sparsity {sparsity}")
    if jit:   # traced, the sparsity is a float32: the same counts for these sparsities
      assert _keep(stored.size, float(np.float32(sparsity))) == want.sum()
      np.testing.assert_array_equal(np.asarray(jitted(sparsity, *arrays)), want,
                                    err_msg=f"jit, sparsity {sparsity}")


def test_dividing_by_a_0d_array_keeps_the_exact_count_and_the_stored_masks():
  fn, arrays = _case("0d_divisor")
  stored = np.asarray(fn(*arrays))
  k = _keep(stored.size, 0.9)
  got = np.asarray(topk_mask(elementwise_scores(fn, *arrays), 0.9))
  assert got.sum() == k
  np.testing.assert_array_equal(got, np.asarray(topk_mask(stored, 0.9)))


def test_per_array_sparsities_and_one_global_sparsity_over_arrays_of_different_shapes():
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=MEDIUM).astype(np.float32)
  g2, w2 = rng.normal(size=(2, 40, 25)).astype(np.float32)
  w3 = rng.integers(-3, 4, size=(5, 3, 2)).astype(np.float32)    # ties
  s4 = np.abs(rng.normal(size=(1000,))).astype(np.float32)        # given as an array
  c = np.array(2.5, np.float32)
  stored = [np.abs(w1), np.abs(g2 * w2), np.abs(w3) * c, s4]

  def lazy(c):
    return [elementwise_scores(jnp.abs, w1), elementwise_scores(_abs_product, g2, w2),
            elementwise_scores(_abs_times, w3, c), s4]

  per_array = [0.9, 0.5, 0.3, 0.75]
  want_per_array = _reference(stored, [_keep(s.size, sp) for s, sp in zip(stored, per_array)])
  want_global = _reference(stored, _keep(sum(s.size for s in stored), 0.8))
  _assert_masks_equal(topk_masks(lazy(c), per_array), want_per_array, "per-array, eager")
  _assert_masks_equal(jax.jit(lambda c: topk_masks(lazy(c), 0.8))(c), want_global, "global, jit")


def test_topk_masks_by_count_with_traced_counts_equals_the_stored_scores_and_numpy():
  rng = np.random.default_rng(1)
  w1 = rng.integers(-20, 21, size=MEDIUM).astype(np.float32)   # ties
  g2, w2 = rng.normal(size=(2, 40, 25)).astype(np.float32)
  stored = [np.abs(w1), np.abs(g2 * w2)]

  @jax.jit
  def select(counts, w1, g2, w2):
    lazy = [elementwise_scores(jnp.abs, w1), elementwise_scores(_abs_product, g2, w2)]
    given = [jnp.abs(w1), jnp.abs(g2 * w2)]
    return (topk_masks_by_count(lazy, [counts[0], counts[1]]), topk_masks_by_count(lazy, counts[2]),
            topk_masks_by_count(given, [counts[0], counts[1]]), topk_masks_by_count(given, counts[2]))

  sizes = [w1.size, w2.size, w1.size + w2.size]
  for counts in ([0, 0, 0], [1, 1000, 1], [2100, 77, 5000], [21000, 500, 22000],
                 [-4, 10**6, 10**6]):   # clipped to [0, size]
    clipped = [min(max(c, 0), n) for c, n in zip(counts, sizes)]
    want_per_array = _reference(stored, clipped[:2])
    want_global = _reference(stored, clipped[2])
    lazy_each, lazy_global, given_each, given_global = select(jnp.asarray(counts, jnp.int32),
                                                              w1, g2, w2)
    for got, want, what in ((lazy_each, want_per_array, "lazy per-array"),
                            (given_each, want_per_array, "stored per-array"),
                            (lazy_global, want_global, "lazy global"),
                            (given_global, want_global, "stored global")):
      _assert_masks_equal(got, want, f"{what}, counts {counts}")


def test_candidates_rank_below_every_candidate_with_elementwise_scores():
  rng = np.random.default_rng(2)
  w1 = rng.normal(size=MEDIUM).astype(np.float32)
  c1 = rng.random(MEDIUM) < 0.3
  w2 = rng.normal(size=(40, 25)).astype(np.float32)
  stored = [np.abs(w1), np.abs(w2)]
  lazy = [elementwise_scores(jnp.abs, w1), elementwise_scores(jnp.abs, w2)]
  candidates = [c1, None]
  for sparsity in (0.5, 0.9):   # 0.5 keeps non-candidates of w1 too (30% are candidates)
    want = _reference(stored, [_keep(s.size, sparsity) for s in stored], candidates)
    _assert_masks_equal(topk_masks(lazy, [sparsity] * 2, candidates=candidates), want,
                        f"per-array, {sparsity}")
    want = _reference(stored, _keep(w1.size + w2.size, sparsity), candidates)
    _assert_masks_equal(topk_masks(lazy, sparsity, candidates=candidates), want,
                        f"global, {sparsity}")


def _int32_case():
  rng = np.random.default_rng(3)
  a, b = rng.integers(-1000, 1001, size=(2,) + MEDIUM).astype(np.int32)
  return _product, (a, b)


def _bfloat16_case():   # 8 bits of mantissa: ties at the threshold
  return jnp.abs, (jnp.asarray(np.random.default_rng(4).normal(size=MEDIUM), jnp.bfloat16),)


@pytest.mark.parametrize("case", [_int32_case, _bfloat16_case], ids=["int32", "bfloat16"])
def test_int32_and_bfloat16_elementwise_scores_rank_like_numpy(case):
  fn, arrays = case()
  stored = fn(*arrays)
  assert stored.dtype == arrays[0].dtype
  for sparsity in (0.5, 0.9, 0.99):
    want = _reference([np.asarray(stored)], [_keep(stored.size, sparsity)])[0]
    np.testing.assert_array_equal(np.asarray(topk_mask(elementwise_scores(fn, *arrays), sparsity)),
                                  want, err_msg=f"sparsity {sparsity}")


def test_nan_scores_rank_last_under_jit():
  rng = np.random.default_rng(5)
  w = rng.normal(size=MEDIUM).astype(np.float32)
  g = rng.normal(size=MEDIUM).astype(np.float32)
  w.ravel()[[3, 500, 9000, 15000, 7]] = [np.nan, -np.nan, np.inf, 0.0, 1.0]
  g.ravel()[[9000, 15000, 7]] = [0.0, np.inf, -np.inf]   # 0 * inf: NaN made by fn itself
  with np.errstate(invalid="ignore"):
    stored = w * g
  assert np.isnan(stored).sum() == 4 and np.isneginf(stored).sum() == 1
  lazy = jax.jit(lambda s, w, g: topk_mask(elementwise_scores(_product, w, g), s))
  for sparsity in (0.5, 0.9999, 0.0):   # 0.9999 keeps 2; 0.0 keeps the NaN too
    want = _reference([stored], [_keep(stored.size, float(np.float32(sparsity)))])[0]
    np.testing.assert_array_equal(np.asarray(lazy(sparsity, w, g)), want)
  want = _reference([stored], [stored.size - 2])[0]   # all but two: two of the NaN go
  assert not want.ravel()[[15000, 9000]].any() and want.ravel()[[3, 500]].all()
  np.testing.assert_array_equal(np.asarray(lazy(2 / stored.size, w, g)), want)


@pytest.mark.slow   # 3 compiles (~8 s); the fast tier's 300 x 700 cases take the straight-line passes
def test_the_passes_and_the_fallback_loop_on_small_arrays_equal_numpy(passes, monkeypatch):
  del passes   # samples of 16 keys: small arrays take the passes
  rng = np.random.default_rng(6)
  a = rng.integers(-30, 31, size=(30, 40)).astype(np.float32)   # ties in every block
  b = rng.normal(size=(24, 16)).astype(np.float32)
  c = np.array(0.5, np.float32)
  stored = [np.abs(a), np.abs(b) / c]

  def lazy():
    return [elementwise_scores(jnp.abs, a), elementwise_scores(_abs_over, b, c)]

  for sparsity in ([0.3, 0.5], [0.9, 0.99], 0.6, 0.05):
    keep = ([_keep(s.size, sp) for s, sp in zip(stored, sparsity)] if isinstance(sparsity, list)
            else _keep(a.size + b.size, sparsity))
    _assert_masks_equal(topk_masks(lazy(), sparsity), _reference(stored, keep), f"{sparsity}")
  # These scores need the loop after the straight-line passes: without it
  # (no loop pass allowed) the selection keeps the wrong entries. The
  # compiled selection is dropped before and after, so that the program
  # built without the loop is used here only.
  with monkeypatch.context() as patch:
    patch.setattr(kth, "_MAX_PASSES", 0)
    selection._masks.clear_cache()
    try:
      without_loop = topk_masks(lazy(), [0.3, 0.5])
    finally:
      selection._masks.clear_cache()
  assert not all(np.array_equal(np.asarray(m), w)
                 for m, w in zip(without_loop, _reference(stored, [840, 192])))


def test_elementwise_scores_under_vmap_equal_numpy_per_row():
  w = np.random.default_rng(7).normal(size=(3, 150, 140)).astype(np.float32)  # 21,000 per row
  got = jax.vmap(lambda w: topk_mask(elementwise_scores(jnp.abs, w), 0.9))(w)
  for row in range(w.shape[0]):
    want = _reference([np.abs(w[row])], [_keep(w[row].size, 0.9)])[0]
    np.testing.assert_array_equal(np.asarray(got[row]), want, err_msg=f"row {row}")


def test_elementwise_scores_under_pmap_equal_numpy_per_device():
  devices = 4
  assert jax.device_count() >= devices
  rng = np.random.default_rng(8)
  g, w = rng.normal(size=(2, devices, 150, 140)).astype(np.float32)
  got = jax.pmap(lambda g, w: topk_mask(elementwise_scores(_abs_product, g, w), 0.75),
                 devices=jax.devices()[:devices])(g, w)
  for d in range(devices):
    want = _reference([np.abs(g[d] * w[d])], [_keep(w[d].size, 0.75)])[0]
    np.testing.assert_array_equal(np.asarray(got[d]), want, err_msg=f"device {d}")


def test_elementwise_scores_on_fsdp_shards_gather_no_kernel_and_equal_numpy():
  mesh = _mesh()
  rng = np.random.default_rng(9)
  kernels = {"dense_0": rng.normal(size=(64, 300)).astype(np.float32),
             "dense_1": rng.normal(size=(300, 100)).astype(np.float32)}
  grads = {name: rng.normal(size=k.shape).astype(np.float32) for name, k in kernels.items()}
  shardings = sparsejax.fsdp_shardings(kernels, mesh)
  assert shardings["dense_1"].spec == P("fsdp", None)
  names = list(kernels)
  per_array = [0.9, 0.5]

  def update(k, g):
    lazy = [elementwise_scores(_abs_product, g[n], k[n]) for n in names]
    return (dict(zip(names, topk_masks(lazy, per_array))), dict(zip(names, topk_masks(lazy, 0.8))))

  step = jax.jit(update, in_shardings=(shardings, shardings), out_shardings=(shardings, shardings))
  args = jax.device_put((kernels, grads), (shardings, shardings))
  compiled = step.lower(*args).compile()
  assert "all-gather" not in _collectives(compiled.as_text()), _collectives(compiled.as_text())
  each, joint = compiled(*args)
  stored = [np.abs(grads[n] * kernels[n]) for n in names]
  want_each = _reference(stored, [_keep(s.size, sp) for s, sp in zip(stored, per_array)])
  want_joint = _reference(stored, _keep(sum(s.size for s in stored), 0.8))
  for name, w_each, w_joint in zip(names, want_each, want_joint):
    np.testing.assert_array_equal(np.asarray(each[name]), w_each, err_msg=name)
    np.testing.assert_array_equal(np.asarray(joint[name]), w_joint, err_msg=name)
    assert isinstance(each[name].sharding, NamedSharding)
    assert each[name].sharding == shardings[name]


def test_elementwise_scores_in_a_jitted_program_store_no_scores_sized_temporary():
  # Why the API exists: the selection's fallback loop is an XLA conditional,
  # which takes stored operands, so |w| computed in the program is stored.
  w = jax.random.normal(jax.random.key(0), (1024, 1024), jnp.float32)

  def temporaries(fn):
    return jax.jit(fn).lower(w).compile().memory_analysis().temp_size_in_bytes

  lazy = temporaries(lambda w: topk_mask(elementwise_scores(jnp.abs, w), 0.9))
  stored = temporaries(lambda w: topk_mask(jnp.abs(w), 0.9))
  assert lazy < 0.25 * w.nbytes, (lazy, w.nbytes)
  assert stored >= 0.9 * w.nbytes, (stored, w.nbytes)


def test_bad_elementwise_scores_are_one_line_errors():
  w = jnp.ones((3, 4))
  with pytest.raises(ValueError, match="needs at least one array"):
    elementwise_scores(jnp.abs)
  with pytest.raises(ValueError, match=r"arrays of one shape, got \[\(3,\), \(3, 4\)\]"):
    elementwise_scores(_product, w, jnp.ones(3))
  with pytest.raises(ValueError, match=r"maps arrays of shape \(3, 4\) to shape \(\); it must "
                                       "work entry by entry"):
    elementwise_scores(jnp.sum, w)
  with pytest.raises(ValueError, match=r"maps arrays of shape \(3, 4\) to shape \(2, 3, 4\)"):
    elementwise_scores(lambda w: jnp.stack([w, w]), w)


def test_nan_in_eager_elementwise_scores_is_an_error_naming_the_leaf_like_an_array():
  w = np.ones((3, 4), np.float32)
  nan_w = w.copy()
  nan_w[1, 2] = np.nan
  for scores in ([nan_w], [elementwise_scores(jnp.abs, nan_w)]):
    with pytest.raises(ValueError, match=r"NaN in the scores of 'scores\[0\]': cannot rank them"):
      topk_masks(scores, 0.5)
  inf = w.copy()
  inf[0, 0] = np.inf
  zero = w.copy()
  zero[0, 0] = 0.0
  with np.errstate(invalid="ignore"):
    nan_product = zero * inf
  for scores in ([w, nan_product], [elementwise_scores(jnp.abs, w),
                                    elementwise_scores(_product, zero, inf)]):
    with pytest.raises(ValueError, match=r"NaN in the scores of 'scores\[1\]'"):   # 0 * inf
      topk_masks(scores, [0.5, 0.5])


def test_complex_elementwise_scores_are_an_error_eager_and_under_jit():
  w = jnp.ones((3, 4))
  to_complex = lambda w: w * 1j
  with pytest.raises(ValueError, match=r"the scores of 'scores\[0\]' are complex64: complex "
                                       "numbers have no order"):
    topk_mask(elementwise_scores(to_complex, w), 0.5)
  with pytest.raises(ValueError, match="complex numbers have no order"):
    jax.jit(lambda w: topk_mask(elementwise_scores(to_complex, w), 0.5))(w)


@pytest.mark.slow   # 4 small compiles (~4 s)
def test_0d_python_number_and_empty_arguments_select_like_arrays():
  w = np.array([[-3.0, 1.0], [2.0, -0.5]], np.float32)
  assert topk_mask(elementwise_scores(jnp.abs, np.float32(-2.0)), 0.0).tolist() is True
  assert topk_mask(elementwise_scores(jnp.abs, np.float32(-2.0)), 1.0).tolist() is False
  np.testing.assert_array_equal(   # a Python number is a 0-d array
      np.asarray(topk_mask(elementwise_scores(_abs_times, w, 3.0), 0.5)), [[1, 0], [1, 0]])
  empty = np.zeros((0, 3), np.float32)
  got = topk_masks([elementwise_scores(jnp.abs, empty), elementwise_scores(jnp.abs, w)], 0.5)
  assert got[0].shape == (0, 3) and got[0].dtype == bool
  np.testing.assert_array_equal(np.asarray(got[1]), [[1, 0], [1, 0]])


def test_candidates_of_another_shape_are_a_one_line_error():
  w = jnp.ones((2, 2))
  with pytest.raises(ValueError, match=r"candidates\[0\]"):
    topk_masks([elementwise_scores(jnp.abs, w)], 0.5, candidates=[jnp.ones(3, bool)])


def test_eager_calls_with_the_same_fn_reuse_the_compiled_selection():
  rng = np.random.default_rng(10)
  g, w = rng.normal(size=(2,) + SMALL).astype(np.float32)
  topk_mask(elementwise_scores(_abs_product, g, w), 0.5)
  compiled = selection._masks._cache_size()
  for seed, sparsity in ((11, 0.5), (12, 0.2)):   # new values, another sparsity: same program
    g, w = np.random.default_rng(seed).normal(size=(2,) + SMALL).astype(np.float32)
    got = topk_mask(elementwise_scores(_abs_product, g, w), sparsity)
    want = _reference([np.abs(g * w)], [_keep(w.size, sparsity)])[0]
    np.testing.assert_array_equal(np.asarray(got), want)
  assert selection._masks._cache_size() == compiled
  # A new function object is a new static argument: the selection compiles again.
  topk_mask(elementwise_scores(lambda g, w: jnp.abs(g * w), g, w), 0.5)
  assert selection._masks._cache_size() == compiled + 1


@pytest.mark.slow   # 3 compiles at 2**20 weights; the temporaries test above is the fast check
def test_performance_guide_elementwise_scores_example_runs_as_written(capsys):
  namespace = {}
  exec(tests.doc_code_block("sparsejax.elementwise_scores("), namespace)  # pylint: disable=exec-used
  w, g, mask, pruned = (np.asarray(namespace[n]) for n in ("w", "g", "mask", "pruned"))
  want = _reference([np.abs(w * g)], [_keep(w.size, 0.9)])[0]
  np.testing.assert_array_equal(mask, want)
  np.testing.assert_array_equal(pruned, np.where(want, w, 0))
  lazy, stored = namespace["lazy_temporaries"], namespace["stored_temporaries"]
  assert lazy < 0.25 and stored >= 0.9, (lazy, stored)
  assert capsys.readouterr().out.splitlines()[0] == f"kept {want.sum()} of {w.size}"
