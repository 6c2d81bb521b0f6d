"""OWL (outlier-weighed layerwise sparsity) and per-group targets in prune_sequentially."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import oneshot
from sparsejax import owl
import tests


# --- NumPy port of the authors' code (luuyin/OWL lib/prune_all.py), written independently. -------

def authors_outlier_ratio(weights_torch, scaler_rows, hyper_m):
  """check_outlier_mean over the block's W_metric = |W| * sqrt(scaler_row), concatenated."""
  metrics = [np.abs(w) * np.sqrt(r.reshape(1, -1)) for w, r in zip(weights_torch, scaler_rows)]
  flat = np.concatenate([m.astype(np.float32).ravel() for m in metrics])
  threshold = np.mean(flat) * hyper_m
  return float((flat > threshold).sum()) / flat.size * 100


def authors_layer_sparsities(all_layer_ratio, sparsity_ratio, lamda):
  all_layer_ratio = np.array(all_layer_ratio)
  all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                     * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2))
  all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
  return 1 - all_layer_ratio   # layer_sparsity_ratio of each block


# --- A transformer-like params dict: 4 blocks of 2 kernels, hand-made calibration inputs. --------

SHAPES = {"query": (16, 16), "up": (16, 32)}   # few shapes: each (shape, sparsity) compiles once


def make_model(seed=0, blocks=4):
  rng = np.random.default_rng(seed)
  params, inputs = {}, {}
  for b in range(blocks):
    params[f"block_{b}"] = {}
    for name, (d_in, d_out) in SHAPES.items():
      # Heavier tails in later blocks, and a few loud input channels: different outlier ratios.
      w = rng.standard_t(df=2 + 3 * b, size=(d_in, d_out)).astype(np.float32)
      x = rng.normal(size=(64, d_in)) * np.where(rng.random(d_in) < 0.1, 8.0, 1.0)
      params[f"block_{b}"][name] = {"kernel": jnp.asarray(w), "bias": jnp.zeros(d_out)}
      inputs[f"block_{b}/{name}/kernel"] = x.astype(np.float32)
  return params, inputs


def grams(inputs, diagonal=False):
  return {p: jnp.asarray((x * x).sum(0) if diagonal else x.T @ x, jnp.float32)
          for p, x in inputs.items()}


def kernel(params, path):
  block, name, _ = path.split("/")
  return np.asarray(params[block][name]["kernel"])


def test_outlier_ratios_equal_the_authors_check_outlier_mean():
  params, inputs = make_model()
  got = owl.outlier_ratios(params, grams(inputs, diagonal=True))
  assert list(got) == [f"block_{b}" for b in range(4)]
  for block in got:
    paths = [p for p in inputs if p.startswith(block + "/")]
    weights = [kernel(params, p).T for p in paths]                 # torch layout (out, in)
    rows = [(inputs[p].astype(np.float64) ** 2).sum(0) / 64 for p in paths]   # scaler_row
    assert got[block] == pytest.approx(authors_outlier_ratio(weights, rows, 5), abs=1e-9)
  assert len(set(got.values())) == 4 and all(0 < v < 100 for v in got.values())
  # The full Gram matrix gives the same ratios (Wanda reads its diagonal).
  assert owl.outlier_ratios(params, grams(inputs)) == pytest.approx(got, abs=1e-9)


def test_outlier_ratio_counts_strictly_above_m_times_the_mean_in_percent():
  # One block, scores 1, 1, 1, 5 (mean 2): m=2 -> 1 of 4 above 4 (25%); m=2.5 -> 5 > 5 is false.
  params = {"block_0": {"a": {"kernel": jnp.array([[1.0, 1.0], [1.0, 5.0]])}}}
  hessians = {"block_0/a/kernel": jnp.array([1.0, 1.0])}
  assert owl.outlier_ratios(params, hessians, m=2.0) == {"block_0": 25.0}
  assert owl.outlier_ratios(params, hessians, m=2.5) == {"block_0": 0.0}


@pytest.mark.parametrize("sparsity,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2)])
def test_owl_sparsities_equal_the_authors_formula_and_keep_the_mean_density(sparsity, lam):
  ratios = {"block_0": 3.1, "block_1": 7.9, "block_2": 5.0, "block_3": 4.2, "block_4": 6.6}
  got = owl.owl_sparsities(ratios, sparsity, lam=lam)
  expected = authors_layer_sparsities(list(ratios.values()), sparsity, lam)
  np.testing.assert_allclose(list(got.values()), expected, rtol=0, atol=1e-12)
  assert list(got) == list(ratios)
  assert np.mean([1 - s for s in got.values()]) == pytest.approx(1 - sparsity, abs=1e-12)
  assert max(got.values()) - min(got.values()) == pytest.approx(2 * lam, abs=1e-12)
  assert got["block_1"] == min(got.values())   # the most outliers: the densest block


def test_owl_sparsities_of_equal_ratios_are_uniform():
  assert owl.owl_sparsities({"a": 2.0, "b": 2.0}, 0.7) == {"a": pytest.approx(0.7),
                                                           "b": pytest.approx(0.7)}
  assert owl.owl_sparsities({"a": 2.0}, 0.5) == {"a": 0.5}


@pytest.mark.parametrize("method,blocks", [("wanda", 4), ("sparsegpt", 2)])
def test_owl_end_to_end_prunes_each_block_at_its_own_exact_count_and_the_overall_target(
    method, blocks):
  params, inputs = make_model(seed=1, blocks=blocks)
  sparsity = 0.6
  targets = owl.owl_sparsities(owl.outlier_ratios(params, grams(inputs, diagonal=True)), sparsity)
  hessians = grams(inputs, diagonal=method == "wanda")
  lines = []
  _, masks = oneshot.prune_sequentially(params, lambda p: hessians, method, sparsity=targets,
                                        log=lines.append)
  kept = total = units = 0   # units: the output units (Wanda) or kernels (SparseGPT) counted alone
  for path in inputs:
    block, name, _ = path.split("/")
    mask = np.asarray(masks[block][name]["kernel"])
    d_in = mask.shape[0]
    if method == "wanda":   # per output unit
      assert (mask.sum(0) == round((1 - targets[block]) * d_in)).all(), path
    else:                   # per block of 128 (here the whole kernel)
      assert mask.sum() == round((1 - targets[block]) * mask.size), path
    kept, total = kept + mask.sum(), total + mask.size
    units += mask.shape[1] if method == "wanda" else 1
  # Equal-size blocks: the overall sparsity is S, up to the rounding of each unit's count.
  assert abs(1 - kept / total - sparsity) <= 0.5 * units / total + 1e-12
  assert f"at sparsity {targets['block_1']:.4g}" in lines[1]


def test_per_group_sparsity_dict_and_callable_give_each_group_its_own_count():
  params, _ = make_model(seed=2, blocks=2)
  chosen = {"block_0": 0.25, "block_1": 0.75}
  only_kernels = lambda path, leaf: path.endswith("kernel")
  from_dict = oneshot.prune_sequentially(params, None, "magnitude", sparsity=chosen,
                                         leaf_filter=only_kernels)
  from_callable = oneshot.prune_sequentially(params, None, "magnitude", sparsity=chosen.get,
                                             leaf_filter=only_kernels)
  jax.tree.map(np.testing.assert_array_equal, from_dict, from_callable)
  masks = from_dict[1]
  for block, s in chosen.items():
    for name, (d_in, d_out) in SHAPES.items():
      mask = np.asarray(masks[block][name]["kernel"])
      assert mask.sum() == round((1 - s) * d_in * d_out), (block, name)
      # The same mask as that kernel pruned alone at its group's sparsity.
      _, alone = oneshot.prune_layer(params[block][name]["kernel"], None, "magnitude", sparsity=s)
      np.testing.assert_array_equal(mask, alone)
    assert masks[block]["up"]["bias"] is None


def test_per_group_sparsity_errors_name_the_group():
  params, inputs = make_model(blocks=2)
  hessians = grams(inputs, diagonal=True)
  prune = lambda **kw: oneshot.prune_sequentially(params, lambda p: hessians, "wanda", **kw)
  with pytest.raises(ValueError, match="no entry for group 'block_1'"):
    prune(sparsity={"block_0": 0.5})
  with pytest.raises(ValueError, match="names group 'block_9', which holds no chosen kernel"):
    prune(sparsity={"block_0": 0.5, "block_1": 0.5, "block_9": 0.5})
  with pytest.raises(ValueError, match=re.escape("group 'block_1': one-shot sparsity must be in "
                                                 "[0, 1), got 1.0")):
    prune(sparsity=lambda g: 1.0 if g == "block_1" else 0.5)
  with pytest.raises(ValueError, match="give either sparsity= or nm="):
    prune(sparsity={"block_0": 0.5, "block_1": 0.5}, nm=(2, 4))
  with pytest.raises(ValueError, match="no entry for group 'block_0'"):
    oneshot.check_layers(params, "wanda", sparsity={})


def test_owl_bad_input_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"lam=0.5 must be in \[0, 0.5\)"):
    owl.owl_sparsities({"a": 1.0, "b": 2.0}, 0.5, lam=0.5)
  with pytest.raises(ValueError, match=r"lam=-0.1 must be in"):
    owl.owl_sparsities({"a": 1.0, "b": 2.0}, 0.5, lam=-0.1)
  with pytest.raises(ValueError, match=r"group 'b': OWL sparsity -0.05 is outside \[0, 1\)"):
    owl.owl_sparsities({"a": 1.0, "b": 2.0}, 0.05, lam=0.1)
  with pytest.raises(ValueError, match="group 'b': outlier ratio nan is not finite"):
    owl.owl_sparsities({"a": 1.0, "b": float("nan")}, 0.5)
  with pytest.raises(ValueError, match="at least one group"):
    owl.owl_sparsities({}, 0.5)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    owl.owl_sparsities({"a": 1.0}, 1.0)
  params, inputs = make_model(blocks=1)
  hessians = grams(inputs, diagonal=True)
  with pytest.raises(ValueError, match="m=0 .* must be a finite number > 0"):
    owl.outlier_ratios(params, hessians, m=0)
  del hessians["block_0/up/kernel"]
  with pytest.raises(ValueError, match=r"no calibration inputs were captured for \['block_0/up/kernel'\]"):
    owl.outlier_ratios(params, hessians, leaf_filter=lambda path, leaf: path.endswith("kernel"))
  with pytest.raises(ValueError, match=r"block_0/query/kernel: expected X\^T X of shape \(16, 16\)"):
    owl.outlier_ratios(params, {"block_0/query/kernel": jnp.ones(3)},
                       leaf_filter=lambda path, leaf: path == "block_0/query/kernel")


def test_readme_owl_example_runs_and_prunes_each_block_at_its_sparsity():
  model_block = tests.doc_code_block('oneshot.prune_sequentially(params, hessians, "sparsegpt", nm=(2, 4))')
  owl_block = tests.doc_code_block("owl.owl_sparsities")
  model_block = model_block.split("pruned, masks =")[0]   # the model, not its SparseGPT run
  namespace = {}
  exec(model_block, namespace)  # pylint: disable=exec-used
  exec(owl_block, namespace)  # pylint: disable=exec-used
  targets, masks = namespace["targets"], namespace["masks"]
  assert list(targets) == ["block_0", "block_1"]
  assert np.mean([1 - s for s in targets.values()]) == pytest.approx(0.3, abs=1e-12)
  for block, s in targets.items():
    mlp = np.asarray(masks[block]["mlp"]["kernel"])    # (64, 64), per output unit
    assert (mlp.sum(0) == round((1 - s) * 64)).all()


# --- OWL's N:M variant: a per-block N of every M. ------------------------------------------------

def authors_prune_n(all_layer_ratio, prune_n, lamda):
  """prune_wanda_outlier_structure's per-block prune_n (weights PRUNED of every M), in NumPy."""
  all_layer_ratio = np.array(all_layer_ratio)
  all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                     * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda))
  all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio)
  all_layer_ratio = np.round(all_layer_ratio)
  return prune_n - all_layer_ratio


def largest_remainder(quotas, ratios):
  """Hamilton's apportionment of round(sum(quotas)) seats: floors, then +1 by largest remainder
  (remainders to 9 decimals; ties to the larger ratio, then the earlier)."""
  seats = [int(np.floor(round(q, 9))) for q in quotas]
  left = round(sum(quotas)) - sum(seats)
  order = sorted(range(len(quotas)),
                 key=lambda i: (-round(quotas[i] - seats[i], 9), -ratios[i], i))
  for i in order[:left]:
    seats[i] += 1
  return seats


def _ratio_sets(count=200):
  rng = np.random.default_rng(0)
  for _ in range(count):
    yield {f"block_{b}": float(v) for b, v in enumerate(rng.gamma(2.0, 1.0, rng.integers(2, 33)))}


@pytest.mark.parametrize("nm,lam", [((2, 4), 2.0), ((4, 8), 2.0), ((3, 8), 3.0), ((8, 16), 5.0)])
def test_owl_nm_nearest_equals_the_authors_prune_n(nm, lam):
  n, m = nm
  checked = 0
  for ratios in _ratio_sets():
    got = owl.owl_nm(ratios, nm, lam=lam, rounding="nearest")
    pruned = authors_prune_n(list(ratios.values()), m - n, lam)   # the authors count pruned ones
    assert list(got) == list(ratios)
    assert [k for k, _ in got.values()] == [m - int(p) for p in pruned]
    assert {mm for _, mm in got.values()} == {m}
    checked += 1
  assert checked == 200


@pytest.mark.parametrize("nm,lam", [((2, 4), 2.0), ((4, 8), 2.0), ((3, 8), 3.0), ((8, 16), 5.0)])
def test_owl_nm_exact_keeps_the_sum_and_rounds_each_block_by_largest_remainder(nm, lam):
  n, m = nm
  missed = 0
  for ratios in _ratio_sets():
    got = [k for k, _ in owl.owl_nm(ratios, nm, lam=lam).values()]
    values = np.array(list(ratios.values()))
    offsets = (values - values.min()) / (values.max() - values.min()) * lam
    quotas = n + offsets - offsets.mean()
    assert sum(got) == len(got) * n                     # mean density exactly N / M
    assert all(np.floor(q - 1e-9) <= k <= np.ceil(q + 1e-9) for q, k in zip(quotas, got))
    assert got == largest_remainder(list(quotas), list(values))
    nearest = [k for k, _ in owl.owl_nm(ratios, nm, lam=lam, rounding="nearest").values()]
    halves = any(round(q - np.floor(q), 9) == 0.5 for q in quotas)
    if sum(nearest) == len(nearest) * n and not halves:
      assert got == nearest                            # the same as the authors' when theirs sums
    missed += sum(nearest) != len(nearest) * n
  assert missed > 0   # the authors' rounding does miss the target on some of these


def test_owl_nm_hand_worked_and_edge_cases():
  # D = 1, 4, 2, lam 2: scaled 0, 2, 2/3; centred -8/9, 10/9, -2/9; N + c = 1.11, 3.11, 1.78.
  # Floors 1, 3, 1 (sum 5 of 6): the largest remainder (block_2, 0.78) gets the sixth.
  ratios = {"block_0": 1.0, "block_1": 4.0, "block_2": 2.0}
  assert owl.owl_nm(ratios, (2, 4), lam=2.0) == {"block_0": (1, 4), "block_1": (3, 4),
                                                 "block_2": (2, 4)}
  # D = 0, 1, 1, 1, lam 2 (4:8): c = -1.5, 0.5, 0.5, 0.5. np.round: 2, 4, 4, 4 (sum 14 of 16:
  # halves to even); largest remainder: all tie at .5, so the two largest ratios (b, c) get one more.
  ratios = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0}
  assert [k for k, _ in owl.owl_nm(ratios, (4, 8), lam=2.0, rounding="nearest").values()] == [
      2, 4, 4, 4]
  assert [k for k, _ in owl.owl_nm(ratios, (4, 8), lam=2.0).values()] == [2, 5, 5, 4]
  assert owl.owl_nm({"a": 2.0, "b": 2.0}, (2, 4)) == {"a": (2, 4), "b": (2, 4)}   # equal: N
  assert owl.owl_nm({"a": 2.0}, (2, 4)) == {"a": (2, 4)}
  assert owl.owl_nm({"a": 1.0, "b": 3.0}, (2, 4), lam=0.0) == {"a": (2, 4), "b": (2, 4)}
  assert owl.owl_nm({"a": 1.0, "b": 3.0}, (3, 4), lam=2.0) == {"a": (2, 4), "b": (4, 4)}  # dense


def test_owl_nm_bad_input_is_a_one_line_error():
  ratios = {"a": 1.0, "b": 2.0}
  cases = [
      (dict(nm=(5, 4)), r"nm must be \(N, M\) with ints 0 < N <= M, got \(5, 4\)"),
      (dict(nm=(2, 4), lam=-1.0), r"lam=-1.0 must be a finite number >= 0"),
      (dict(nm=(2, 4), lam=float("inf")), r"lam=inf must be a finite number >= 0"),
      (dict(nm=(2, 4), rounding="floor"), r"rounding='floor': use one of \('exact', 'nearest'\)"),
      (dict(nm=(1, 4), lam=2.0), r"group 'a': OWL keeps 0 of every 4, outside \[1, 4\] at N:M "
                                 r"1:4 and lam=2.0; lower lam"),
      (dict(nm=(4, 4), lam=2.0), r"group 'b': OWL keeps 5 of every 4"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message) as raised:
      owl.owl_nm(ratios, **kwargs)
    assert "\n" not in str(raised.value)
  with pytest.raises(ValueError, match="group 'b': outlier ratio nan is not finite"):
    owl.owl_nm({"a": 1.0, "b": float("nan")}, (2, 4))
  with pytest.raises(ValueError, match="at least one group"):
    owl.owl_nm({}, (2, 4))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_nm_end_to_end_prunes_each_block_at_its_own_n(method):
  params, inputs = make_model(seed=1, blocks=4 if method == "wanda" else 2)
  ratios = owl.outlier_ratios(params, grams(inputs, diagonal=True))
  patterns = owl.owl_nm(ratios, (2, 4), lam=2.0)
  assert len({n for n, _ in patterns.values()}) > 1          # the blocks do differ
  hessians = grams(inputs, diagonal=method == "wanda")
  lines = []
  _, masks = oneshot.prune_sequentially(params, lambda p: hessians, method, nm=patterns,
                                        log=lines.append)
  kept = total = 0
  for path in inputs:
    block, name, _ = path.split("/")
    mask = np.asarray(masks[block][name]["kernel"])
    n, m = patterns[block]
    per_group = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(1)   # along d_in
    assert (per_group == n).all(), path
    if method == "wanda":   # the calibration inputs do not move: each kernel as if pruned alone
      _, alone = oneshot.prune_layer(params[block][name]["kernel"], hessians[path], "wanda",
                                     nm=(n, m))
      np.testing.assert_array_equal(mask, alone)
    kept, total = kept + mask.sum(), total + mask.size
  assert kept / total == 0.5   # equal-size blocks, sum of N_l = blocks * N: exactly N / M
  assert lines[0].endswith(f"at N:M {patterns['block_0'][0]}:4")


def test_per_group_nm_errors_name_the_group_or_kernel():
  params, inputs = make_model(blocks=2)
  hessians = grams(inputs)
  prune = lambda **kw: oneshot.prune_sequentially(params, lambda p: hessians, "sparsegpt", **kw)
  with pytest.raises(ValueError, match=r"nm has no entry for group 'block_1'"):
    prune(nm={"block_0": (2, 4)})
  with pytest.raises(ValueError, match=r"nm names group 'block_7', which holds no chosen kernel"):
    prune(nm={"block_0": (2, 4), "block_1": (2, 4), "block_7": (2, 4)})
  with pytest.raises(ValueError, match=r"group 'block_1': nm must be \(N, M\) with ints 0 < N <= "
                                       r"M, got \(0, 4\)"):
    prune(nm=lambda g: (0, 4) if g == "block_1" else (2, 4))
  with pytest.raises(ValueError, match=r"group 'block_0': nm must be .* got 3"):
    prune(nm={"block_0": 3, "block_1": (2, 4)})
  with pytest.raises(ValueError, match=r"block_0/query/kernel: kernel of shape \(16, 16\) has 16 "
                                       r"inputs .* not divisible by M=32"):
    prune(nm={"block_0": (2, 32), "block_1": (2, 4)}, block_size=32)
  with pytest.raises(ValueError, match=r"sparsegpt N:M 2:8 needs block_size \(4\) divisible by M=8"):
    prune(nm={"block_0": (2, 4), "block_1": (2, 8)}, block_size=4)
  with pytest.raises(ValueError, match="give either sparsity= or nm="):
    prune(sparsity=0.5, nm={"block_0": (2, 4), "block_1": (2, 4)})


def test_guide_owl_nm_example_runs_and_prunes_each_block_at_its_n():
  model_block = tests.doc_code_block('oneshot.prune_sequentially(params, hessians, "sparsegpt", nm=(2, 4))')
  owl_block = tests.doc_code_block("owl.owl_sparsities")
  nm_block = tests.doc_code_block("owl.owl_nm(")
  namespace = {}
  exec(model_block.split("pruned, masks =")[0], namespace)  # pylint: disable=exec-used
  exec(owl_block.split("targets =")[0], namespace)  # pylint: disable=exec-used
  exec(nm_block, namespace)  # pylint: disable=exec-used
  patterns, masks = namespace["patterns"], namespace["masks"]
  assert list(patterns) == ["block_0", "block_1"]
  ratios = namespace["ratios"]
  assert ratios["block_0"] > ratios["block_1"] > 0
  assert patterns == {"block_0": (3, 4), "block_1": (1, 4)}   # two blocks: N +- lam / 2
  for block, (n, m) in patterns.items():
    mlp = np.asarray(masks[block]["mlp"]["kernel"])    # (64, 64): n of every 4 inputs
    assert (mlp.reshape(16, 4, 64).sum(1) == n).all()
