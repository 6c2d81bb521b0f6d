"""Allocation of a total sparsity across leaves: ERK, uniform, global, custom maps."""

import math
import re

import jax
import numpy as np
import pytest

import sparsejax
from sparsejax import allocation
from tests import reference

SHAPE_SETS = {
    "mlp": [(784, 300), (300, 100), (100, 10)],
    "conv": [(3, 3, 3, 16), (3, 3, 16, 32), (512, 10)],
    # The tiny leaf would get density > 1: it is made dense, the rest re-solved.
    "tiny_next_to_huge": [(10, 10), (1000, 1000)],
    # At 0.8 two leaves go dense in the first round, a third only after the
    # scale is solved again for the rest.
    "dense_cascade": [(4, 4), (4, 128), (128, 256), (1024, 1024)],
}
SPARSITIES = [0.5, 0.8, 0.95, 0.99]
PATHS = ["params/Dense_0/kernel", "params/Dense_1/kernel", "params/Embed_0/embedding"]
SHAPES = [(20, 10), (10, 5), (30, 4)]


def _sizes(shapes):
  return np.array([math.prod(s) for s in shapes], np.float64)


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_erk_densities_match_bisection_reference(shapes, sparsity):
  got = np.asarray(sparsejax.erk_densities(sparsity, shapes), np.float64)
  np.testing.assert_allclose(got, reference.erk_densities(sparsity, shapes), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_erk_total_density_equals_one_minus_sparsity(shapes, sparsity):
  sizes = _sizes(shapes)
  densities = np.asarray(sparsejax.erk_densities(sparsity, shapes), np.float64)
  assert np.all((densities >= 0) & (densities <= 1))
  np.testing.assert_allclose((densities * sizes).sum() / sizes.sum(), 1 - sparsity, rtol=0, atol=1e-6)


def test_erk_densities_hand_worked_example():
  # raw = sum/prod: 30/200 = 0.15 and 15/50 = 0.3; budget 0.5 * 250 = 125;
  # scale = 125 / (200 * 0.15 + 50 * 0.3) = 25/9 -> densities 5/12 and 5/6.
  got = sparsejax.erk_densities(0.5, [(20, 10), (10, 5)])
  np.testing.assert_allclose(np.asarray(got, np.float64), [5 / 12, 5 / 6], rtol=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_erk_makes_tiny_leaf_dense_and_gives_the_rest_to_the_large_one(sparsity):
  got = np.asarray(sparsejax.erk_densities(sparsity, [(10, 10), (1000, 1000)]), np.float64)
  assert got[0] == 1.0
  # All of the budget left after the 100 dense weights goes to the large leaf.
  np.testing.assert_allclose(got[1], ((1 - sparsity) * 1_000_100 - 100) / 1_000_000, rtol=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_erk_densities_under_jit_with_traced_sparsity_match_python_float(sparsity):
  shapes = SHAPE_SETS["dense_cascade"]
  traced = np.asarray(jax.jit(lambda s: sparsejax.erk_densities(s, shapes))(sparsity), np.float64)
  python = np.asarray(sparsejax.erk_densities(sparsity, shapes), np.float64)
  np.testing.assert_allclose(traced, reference.erk_densities(sparsity, shapes), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(traced, python, rtol=1e-6, atol=0)


def test_allocate_erk_under_jit_gives_one_minus_reference_density():
  shapes = SHAPE_SETS["tiny_next_to_huge"]
  got = jax.jit(lambda s: allocation.allocate("erk", s, ["a", "b"], shapes))(0.8)
  np.testing.assert_allclose(np.asarray(got, np.float64), 1 - reference.erk_densities(0.8, shapes),
                             rtol=1e-5, atol=1e-7)


def test_allocate_erk_with_python_float_returns_python_floats():
  got = allocation.allocate("erk", 0.8, PATHS, SHAPES)
  assert all(type(s) is float for s in got)
  np.testing.assert_allclose(got, 1 - reference.erk_densities(0.8, SHAPES), rtol=1e-5, atol=1e-7)


def test_allocate_uniform_gives_every_leaf_the_total_sparsity():
  assert allocation.allocate("uniform", 0.7, PATHS, SHAPES) == [0.7, 0.7, 0.7]


def test_allocate_global_returns_none_for_one_shared_threshold():
  assert allocation.allocate("global", 0.7, PATHS, SHAPES) is None


def test_allocate_custom_map_first_matching_regex_wins_and_unmatched_leaves_get_total():
  # 'Dense_1/' comes first, so Dense_1's kernel gets 0.9 although 'kernel'
  # matches it too; the embedding matches nothing and gets the total 0.5.
  mapping = {"Dense_1/": 0.9, "kernel": 0.2}
  assert allocation.allocate(mapping, 0.5, PATHS, SHAPES) == [0.2, 0.9, 0.5]


def test_allocate_custom_map_uses_search_not_full_match():
  assert allocation.allocate({"Embed": 0.3}, 0.5, PATHS, SHAPES) == [0.5, 0.5, 0.3]


def test_allocate_rejects_unknown_allocation_name():
  with pytest.raises(ValueError, match="unknown allocation 'erdos'"):
    allocation.allocate("erdos", 0.5, PATHS, SHAPES)


def test_allocate_rejects_regex_that_does_not_compile():
  with pytest.raises(ValueError, match=re.escape("regex 'Dense_[0' does not compile")):
    allocation.allocate({"Dense_[0": 0.5}, 0.5, PATHS, SHAPES)


def test_allocate_rejects_regex_shadowed_by_earlier_one_as_matching_no_leaf():
  # 'kernel' takes both kernels first, so 'Dense_1' is never used.
  with pytest.raises(ValueError, match=re.escape("['Dense_1'] match no prunable leaf")):
    allocation.allocate({"kernel": 0.2, "Dense_1": 0.9}, 0.5, PATHS, SHAPES)


def test_allocate_error_for_regex_matching_no_leaf_lists_the_prunable_leaves():
  with pytest.raises(ValueError, match="match no prunable leaf") as info:
    allocation.allocate({"Conv_": 0.5}, 0.5, PATHS, SHAPES)
  message = str(info.value)
  assert "'Conv_'" in message
  for path in PATHS:
    assert path in message


@pytest.mark.parametrize("value", [-0.1, 1.2, float("nan")])
def test_allocate_rejects_custom_sparsity_outside_unit_interval(value):
  with pytest.raises(ValueError, match=re.escape("sparsity for 'Dense_0' must be in [0, 1]")):
    allocation.allocate({"Dense_0": value}, 0.5, PATHS, SHAPES)


@pytest.mark.parametrize("name", ["uniform", "erk", "global"])
def test_allocate_rejects_total_sparsity_outside_unit_interval(name):
  with pytest.raises(ValueError, match="sparsity must be in"):
    allocation.allocate(name, 1.5, PATHS, SHAPES)


def test_erk_at_zero_sparsity_keeps_every_weight_of_large_leaves():
  shapes = [(512, 5000), (5000, 11008), (11008, 100)]
  sparsities = allocation.allocate("erk", 0.0, ["a", "b", "c"], shapes)
  assert sparsities == [0.0, 0.0, 0.0]


def test_erk_ignores_zero_size_leaves():
  densities = allocation.erk_densities(0.5, [(0, 10), (4, 4), (100, 100)])
  np.testing.assert_allclose(densities[1:], reference.erk_densities(0.5, [(4, 4), (100, 100)]),
                             rtol=1e-9)
