"""Quantiles and the Best-of-N distribution against brute force, sampling and closed forms."""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import quantiles
from bon_oracles import brute_force_bon, exact_quantiles, random_case

SETTINGS = hypothesis.settings(max_examples=40, deadline=None, derandomize=True)


def library_bon(probs, rewards, n, ties=True):
  p_lt, p_le = exact_quantiles(probs, rewards)
  log_probs = quantiles.bon_log_prob(
      jnp.log(jnp.asarray(probs, jnp.float32)), p_lt if ties else None, p_le, n
  )
  return np.exp(np.asarray(log_probs, np.float64))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("levels", [None, 3, 1])
def test_theorem1_matches_brute_force_enumeration(n, levels):
  probs, rewards = random_case(seed=n, num=6, levels=levels)
  expected = brute_force_bon(probs, rewards, n)
  got = library_bon(probs, rewards, n)
  np.testing.assert_allclose(got, expected, atol=2e-6, rtol=2e-5)
  np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)


def test_dropping_the_tie_term_is_wrong_with_ties():
  probs, rewards = random_case(seed=0, num=6, levels=2)
  no_ties = library_bon(probs, rewards, 3, ties=False)
  assert np.abs(no_ties - brute_force_bon(probs, rewards, 3)).max() > 0.05


def test_theorem1_matches_sampled_best_of_n_frequencies():
  probs, rewards = random_case(seed=7, num=8, levels=4)
  n, draws = 4, 200_000
  tuples = np.random.default_rng(0).choice(len(probs), size=(draws, n), p=probs)
  winner_index = np.asarray(quantiles.best_of_n(jnp.asarray(rewards[tuples])))
  np.testing.assert_array_equal(winner_index, np.argmax(rewards[tuples], axis=1))
  freq = np.bincount(tuples[np.arange(draws), winner_index], minlength=len(probs)) / draws
  expected = library_bon(probs, rewards, n)
  sigma = np.sqrt(expected * (1 - expected) / draws)
  np.testing.assert_array_less(np.abs(freq - expected), 5 * sigma + 1e-6)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_no_tie_limit_matches_closed_forms(n):
  probs, rewards = random_case(seed=n, num=20_000)
  bon = library_bon(probs, rewards, n)
  np.testing.assert_allclose(bon.sum(), 1.0, atol=1e-4)
  kl = np.sum(bon * (np.log(bon) - np.log(probs)))
  bound = quantiles.bon_kl_upper_bound(n)
  assert kl < bound
  np.testing.assert_allclose(kl, bound, atol=1e-5)
  p_lt, p_le = exact_quantiles(probs, rewards)
  mean_quantile = quantiles.bon_expected_quantile(n)
  assert bon @ p_lt < mean_quantile < bon @ p_le
  np.testing.assert_allclose([bon @ p_lt, bon @ p_le], mean_quantile, atol=2e-4)


@pytest.mark.parametrize("n", [2, 5])
def test_ties_give_strict_bounds(n):
  probs, rewards = random_case(seed=3, num=10, levels=3)
  bon = library_bon(probs, rewards, n)
  kl = np.sum(bon * (np.log(bon) - np.log(probs)))
  assert kl < quantiles.bon_kl_upper_bound(n) - 1e-3
  p_lt, p_le = exact_quantiles(probs, rewards)
  # The continuous quantile max(U_i) ~ Beta(n, 1) lies between p_lt(Y) and p_le(Y).
  assert bon @ p_lt < quantiles.bon_expected_quantile(n) - 1e-3
  assert bon @ p_le > quantiles.bon_expected_quantile(n) + 1e-3


@pytest.mark.parametrize("m,n", [(2, 2), (2, 3), (3, 2), (4, 5)])
@pytest.mark.parametrize("levels", [None, 3])
def test_best_of_m_of_best_of_n_is_best_of_mn(m, n, levels):
  probs, rewards = random_case(seed=m * n, num=10, levels=levels)
  inner = library_bon(probs, rewards, n)
  np.testing.assert_allclose(
      library_bon(inner, rewards, m), library_bon(probs, rewards, m * n), atol=1e-6, rtol=1e-4
  )


def test_large_n_stays_finite_and_normalised():
  probs, rewards = random_case(seed=1, num=12, levels=4)
  bon = library_bon(probs, rewards, 10_000)
  assert np.all(np.isfinite(bon))
  np.testing.assert_allclose(bon.sum(), 1.0, atol=1e-5)
  top = rewards == rewards.max()
  np.testing.assert_allclose(bon[top], probs[top] / probs[top].sum(), atol=1e-5)


def tie_sum_oracle(p_lt, p_le, n):
  """`log(p_le^(n-1) · Σ_i (p_lt/p_le)^(i-1))` summed term by term in float64."""
  p_lt, p_le = np.broadcast_arrays(np.float64(p_lt), np.float64(p_le))
  if n == 1:
    return np.zeros_like(p_le)
  q = np.divide(p_lt, p_le, out=np.zeros_like(p_le), where=p_le > 0)
  series = np.sum(q[..., None] ** np.arange(n), axis=-1)
  with np.errstate(divide="ignore"):
    return (n - 1) * np.log(p_le) + np.log(series)


@SETTINGS
@hypothesis.given(
    p_le=hnp.arrays(np.float64, 6, elements=st.floats(0, 1)),
    fraction=hnp.arrays(np.float64, 6, elements=st.floats(0, 1)),
    n=st.sampled_from([1, 2, 3, 7, 50, 1000]),
)
def test_log_density_ratio_matches_series(p_le, fraction, n):
  p_le = p_le.astype(np.float32).astype(np.float64)
  p_lt = (p_le * fraction).astype(np.float32).astype(np.float64)
  p_lt = np.minimum(p_lt, p_le)
  got = np.asarray(quantiles.bon_log_density_ratio(p_lt, p_le, n), np.float64)
  expected = tie_sum_oracle(p_lt, p_le, n)
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
  finite = np.isfinite(expected)
  np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 10, 10_000])
def test_log_density_ratio_edges(n):
  p_le = jnp.array([0.3, 0.3, 0.3, 0.3, 1.0, 0.0])
  p_lt = jnp.array([0.0, 0.3, 0.3 - 1e-7, 0.2999, 0.0, 0.0])
  got = np.asarray(quantiles.bon_log_density_ratio(p_lt, p_le, n))
  no_ties = np.asarray(quantiles.bon_log_density_ratio_no_ties(p_le, n))
  np.testing.assert_allclose(got[0], (n - 1) * math.log(0.3), rtol=1e-5)  # p_lt = 0
  np.testing.assert_allclose(got[1], no_ties[1], rtol=1e-5)  # p_lt = p_le: the limit
  np.testing.assert_allclose(got[1], math.log(n) + (n - 1) * math.log(0.3), rtol=1e-5)
  np.testing.assert_allclose(got[2:4], tie_sum_oracle(np.float64(p_lt[2:4]), 0.3, n), rtol=1e-4)
  assert got[2] <= got[1] and got[3] <= got[2]  # approaches the limit from below
  assert got[4] == 0.0  # p_lt = 0, p_le = 1: the top outcome under full ties
  assert got[5] == -np.inf and no_ties[5] == -np.inf  # p_le = 0


def test_n_equal_one_is_the_reference():
  ref = jnp.log(jnp.array([0.2, 0.8]))
  p = jnp.array([0.0, 0.0])
  np.testing.assert_array_equal(quantiles.bon_log_prob(ref, p, p, 1), ref)
  np.testing.assert_array_equal(quantiles.bon_log_prob(ref, None, p, 1), ref)


def test_minus_inf_reference_log_prob_stays_minus_inf():
  got = quantiles.bon_log_prob(jnp.array([-jnp.inf, 0.0]), jnp.array([0.2, 0.0]),
                               jnp.array([0.5, 1.0]), 4)
  assert got[0] == -np.inf and np.isfinite(got[1])


def test_closed_forms():
  assert quantiles.bon_kl_upper_bound(1) == 0.0
  assert quantiles.bon_kl_upper_bound(4) == pytest.approx(math.log(4) - 0.75)
  assert quantiles.bon_expected_quantile(4) == pytest.approx(0.8)


@SETTINGS
@hypothesis.given(
    data=st.data(),
    batch=st.integers(1, 3),
    samples=st.integers(1, 4),
    k=st.integers(1, 5),
)
def test_reward_quantiles_match_loop_oracle(data, batch, samples, k):
  levels = st.integers(-2, 2).map(float)
  rewards = data.draw(hnp.arrays(np.float32, (batch, samples), elements=levels))
  ref_rewards = data.draw(hnp.arrays(np.float32, (batch, k), elements=levels))
  ref_mask = data.draw(hnp.arrays(np.bool_, (batch, k)))
  p_lt, p_le = quantiles.reward_quantiles(rewards, ref_rewards, ref_mask)
  expected_lt, expected_le = np.zeros((batch, samples)), np.ones((batch, samples))
  for b in range(batch):
    valid = ref_rewards[b][ref_mask[b]]
    for i in range(samples):
      if valid.size:
        expected_lt[b, i] = np.mean(valid < rewards[b, i])
        expected_le[b, i] = np.mean(valid <= rewards[b, i])
  np.testing.assert_allclose(p_lt, expected_lt, atol=1e-6)
  np.testing.assert_allclose(p_le, expected_le, atol=1e-6)


def test_reward_quantiles_without_mask_and_equal_rewards():
  p_lt, p_le = quantiles.reward_quantiles(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  np.testing.assert_array_equal(p_lt, 0.0)
  np.testing.assert_array_equal(p_le, 1.0)


@SETTINGS
@hypothesis.given(
    data=st.data(), batch=st.integers(1, 3), samples=st.integers(1, 5),
)
def test_best_of_n_matches_loop_oracle(data, batch, samples):
  levels = st.sampled_from([-np.inf, -1.0, 0.0, 1.0])
  rewards = data.draw(hnp.arrays(np.float32, (batch, samples), elements=levels))
  mask = data.draw(hnp.arrays(np.bool_, (batch, samples)))
  got = np.asarray(quantiles.best_of_n(rewards, mask))
  for b in range(batch):
    valid = [i for i in range(samples) if mask[b, i]]
    if not valid:
      assert got[b] == 0
      continue
    best = max(rewards[b, i] for i in valid)
    assert got[b] == min(i for i in valid if rewards[b, i] == best)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4", None])
def test_invalid_n_is_rejected(n):
  p = jnp.array([0.5])
  for call in (
      lambda: quantiles.bon_log_density_ratio(p, p, n),
      lambda: quantiles.bon_log_density_ratio_no_ties(p, n),
      lambda: quantiles.bon_kl_upper_bound(n),
      lambda: quantiles.bon_expected_quantile(n),
  ):
    with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
      call()


@pytest.mark.parametrize("call,match", [
    (lambda: quantiles.reward_quantiles(jnp.zeros((2, 3)), jnp.zeros((3, 4))), r"`ref_rewards` must have shape"),
    (lambda: quantiles.reward_quantiles(jnp.zeros((2, 3, 1)), jnp.zeros((2, 4))), r"`rewards` must have shape"),
    (lambda: quantiles.reward_quantiles(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3), bool)),
     r"`ref_mask` must have shape \[batch, k\] = \(2, 4\), got \(2, 3\)"),
    (lambda: quantiles.bon_log_density_ratio(jnp.zeros(3), jnp.zeros(4), 2), "`p_le` must have shape"),
    (lambda: quantiles.best_of_n(jnp.zeros((2, 3)), jnp.ones((2, 4), bool)), "`mask` must have shape"),
    (lambda: quantiles.take_samples(jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32)), "every leaf of `samples`"),
])
def test_shape_mismatches_are_rejected(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_best_of_n_of_disjoint_groups_and_take_samples():
  """Best-of-2 of each disjoint pair of 4 samples, and the winners' tokens, against a loop."""
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 3, (3, 4)).astype(np.float32)
  tokens = rng.integers(0, 50, (3, 4, 5))
  best = np.asarray(quantiles.best_of_n(rewards.reshape(3, 2, 2)))
  winners = quantiles.take_samples(tokens.reshape(3, 2, 2, 5), best)
  for b, g in np.ndindex(3, 2):
    pair = rewards[b, 2 * g:2 * g + 2]
    assert best[b, g] == int(pair[1] > pair[0])
    np.testing.assert_array_equal(winners[b, g], tokens[b, 2 * g + best[b, g]])
