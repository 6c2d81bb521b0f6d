"""Sparsity schedules against the Zhu & Gupta reference, eager and jitted."""

import dataclasses

import jax
import numpy as np
import pytest

import sparsejax
from tests import reference

# (initial, final, begin, end, frequency, power)
POLY_CASES = {
    # (end - begin) = 37 is not a multiple of 5: the last update is at end.
    "cubic_ragged_end": (0.0, 0.9, 10, 47, 5, 3.0),
    "power_1.5_from_nonzero_start": (0.2, 0.75, 4, 36, 4, 1.5),
}


def _schedule(case):
  s_i, s_f, t0, t1, freq, power = case
  return sparsejax.PolynomialSchedule(s_i, s_f, begin_step=t0, end_step=t1,
                                      update_frequency=freq, power=power)


def _f32(x):
  return float(np.float32(x))


@pytest.mark.parametrize("case", POLY_CASES.values(), ids=POLY_CASES.keys())
def test_polynomial_schedule_matches_reference_at_every_step(case):
  s_i, s_f, t0, t1, freq, power = case
  schedule = _schedule(case)
  steps = np.arange(0, t1 + 10)
  got = np.asarray(schedule(steps), np.float64)
  want = [reference.polynomial_sparsity(int(t), s_i, s_f, t0, t1, freq, power) for t in steps]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", POLY_CASES.values(), ids=POLY_CASES.keys())
def test_polynomial_schedule_key_points(case):
  s_i, s_f, t0, t1, freq, power = case
  schedule = _schedule(case)
  at = lambda t: float(schedule(t))  # noqa: E731
  assert at(0) == pytest.approx(s_i, abs=1e-6)        # before begin: initial
  assert at(t0 - 1) == pytest.approx(s_i, abs=1e-6)
  assert at(t0) == pytest.approx(s_i, abs=1e-6)       # at begin: nothing pruned yet
  # Halfway through, on an update step: the formula by hand.
  mid = t0 + 2 * freq
  expected = s_f + (s_i - s_f) * (1 - 2 * freq / (t1 - t0)) ** power
  assert at(mid) == pytest.approx(expected, abs=1e-6)
  # Between updates the value of the last update is held, bit for bit.
  for t in range(mid + 1, mid + freq):
    assert at(t) == at(mid)
  assert at(mid + freq) < at(mid) if s_f < s_i else at(mid + freq) > at(mid)
  # At and after end: exactly the final sparsity (as float32).
  for t in (t1, t1 + 1, t1 + 1000):
    assert at(t) == _f32(s_f)


def test_polynomial_schedule_holds_last_grid_value_until_ragged_end():
  schedule = _schedule(POLY_CASES["cubic_ragged_end"])
  # Last grid update at 45 (progress 35/37); 46 holds it; 47 is end: final.
  held = 0.9 * (1 - (1 - 35 / 37) ** 3)
  assert float(schedule(45)) == pytest.approx(held, abs=1e-6)
  assert float(schedule(46)) == float(schedule(45))
  assert float(schedule(47)) == _f32(0.9)


def test_polynomial_schedule_update_steps_are_the_grid_plus_end():
  schedule = _schedule(POLY_CASES["cubic_ragged_end"])  # begin 10, end 47, every 5
  steps = np.arange(0, 70)
  got = steps[np.asarray(schedule.is_update_step(steps))].tolist()
  assert got == [10, 15, 20, 25, 30, 35, 40, 45, 47]


def test_polynomial_schedule_update_steps_when_end_is_on_the_grid():
  schedule = _schedule(POLY_CASES["power_1.5_from_nonzero_start"])  # begin 4, end 36, every 4
  steps = np.arange(0, 50)
  got = steps[np.asarray(schedule.is_update_step(steps))].tolist()
  assert got == list(range(4, 37, 4))


@pytest.mark.parametrize("case", POLY_CASES.values(), ids=POLY_CASES.keys())
def test_polynomial_schedule_under_jit_with_traced_step_matches_reference(case):
  s_i, s_f, t0, t1, freq, power = case
  schedule = _schedule(case)
  fn = jax.jit(lambda t: (schedule(t), schedule.is_update_step(t)))
  for t in (t0 - 1, t0, t0 + freq + 1, t1 - 1, t1, t1 + 3):
    value, update = fn(t)
    assert float(value) == pytest.approx(
        reference.polynomial_sparsity(t, s_i, s_f, t0, t1, freq, power), abs=1e-6), t
    assert bool(update) == (t0 <= t <= t1 and ((t - t0) % freq == 0 or t == t1)), t


def test_polynomial_with_final_changes_only_the_final_sparsity():
  schedule = _schedule(POLY_CASES["cubic_ragged_end"])
  other = schedule.with_final(0.5)
  assert other.final_sparsity == 0.5
  assert dataclasses.replace(other, final_sparsity=0.9) == schedule
  assert schedule.final_sparsity == 0.9  # the original is untouched
  steps = np.arange(0, 60)
  want = [reference.polynomial_sparsity(int(t), 0.0, 0.5, 10, 47, 5) for t in steps]
  np.testing.assert_allclose(np.asarray(other(steps), np.float64), want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(other.is_update_step(steps), schedule.is_update_step(steps))


def test_polynomial_with_traced_final_under_jit_matches_reference():
  schedule = _schedule(POLY_CASES["cubic_ragged_end"])
  fn = jax.jit(lambda final, t: schedule.with_final(final)(t))
  for t in (10, 27, 47):
    assert float(fn(0.6, t)) == pytest.approx(
        reference.polynomial_sparsity(t, 0.0, 0.6, 10, 47, 5), abs=1e-6)


def test_constant_schedule_is_constant_and_updates_only_at_step_zero():
  schedule = sparsejax.ConstantSchedule(0.7)
  assert [float(schedule(t)) for t in (0, 1, 1000)] == [_f32(0.7)] * 3
  assert [bool(schedule.is_update_step(t)) for t in (0, 1, 1000)] == [True, False, False]
  other = schedule.with_final(0.2)
  assert other.final_sparsity == 0.2 and float(other(5)) == _f32(0.2)


def test_one_shot_schedule_is_dense_until_its_step_then_updates_once():
  schedule = sparsejax.OneShotSchedule(0.9, step=3)
  assert [float(schedule(t)) for t in range(6)] == [0.0, 0.0, 0.0] + [_f32(0.9)] * 3
  assert [bool(schedule.is_update_step(t)) for t in range(6)] == [False] * 3 + [True, False, False]
  other = schedule.with_final(0.4)
  assert (other.sparsity, other.step) == (0.4, 3)
  assert [float(other(t)) for t in (2, 3)] == [0.0, _f32(0.4)]


@pytest.mark.parametrize("make", [
    lambda s: sparsejax.PolynomialSchedule(s, 0.5, 0, 10),
    lambda s: sparsejax.PolynomialSchedule(0.0, s, 0, 10),
    lambda s: sparsejax.ConstantSchedule(s),
    lambda s: sparsejax.OneShotSchedule(s, step=2),
], ids=["poly_initial", "poly_final", "constant", "one_shot"])
@pytest.mark.parametrize("sparsity", [-0.1, 1.5])
def test_schedules_reject_sparsity_outside_unit_interval(make, sparsity):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
    make(sparsity)


@pytest.mark.parametrize("begin,end", [(10, 10), (10, 5)])
def test_polynomial_schedule_rejects_end_not_after_begin(begin, end):
  with pytest.raises(ValueError, match=f"end_step \\({end}\\) must be after begin_step"):
    sparsejax.PolynomialSchedule(0.0, 0.5, begin, end)


def test_polynomial_schedule_rejects_update_frequency_zero():
  with pytest.raises(ValueError, match="update_frequency must be an int >= 1"):
    sparsejax.PolynomialSchedule(0.0, 0.5, 0, 10, update_frequency=0)


def test_polynomial_schedule_rejects_non_positive_power():
  with pytest.raises(ValueError, match="power must be > 0"):
    sparsejax.PolynomialSchedule(0.0, 0.5, 0, 10, power=0.0)


@pytest.mark.parametrize("make,name", [
    (lambda: sparsejax.PolynomialSchedule(0.0, 0.5, -1, 10), "begin_step"),
    (lambda: sparsejax.OneShotSchedule(0.5, step=-3), "step"),
], ids=["poly_begin", "one_shot_step"])
def test_schedules_reject_negative_steps(make, name):
  with pytest.raises(ValueError, match=f"^{name} must be an int >= 0"):
    make()


def test_polynomial_schedule_accepts_numpy_ints_and_rejects_bool_frequency():
  schedule = sparsejax.PolynomialSchedule(0.0, 0.5, np.int64(0), np.int32(4))
  assert float(schedule(4)) == np.float32(0.5)
  with pytest.raises(ValueError, match="update_frequency must be an int >= 1"):
    sparsejax.PolynomialSchedule(0.0, 0.5, 0, 4, update_frequency=True)


def test_polynomial_schedule_is_exactly_initial_sparsity_until_the_first_ramp_step():
  schedule = sparsejax.PolynomialSchedule(0.1, 0.5, begin_step=3, end_step=9, update_frequency=3)
  assert [float(schedule(t)) for t in (0, 3, 5)] == [np.float32(0.1)] * 3
