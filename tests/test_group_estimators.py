"""Group quantiles and group advantages against enumeration of every group a small discrete policy can draw.

The oracle of an estimator is the gradient it claims to follow: for a softmax policy π over K outcomes and groups
of G i.i.d. samples, `E[mean_i A_i ∇ log π(y_i)]` (enumerating all K**G groups) must equal
`(1-β)(π_BoN - π) + β π ⊙ (R̄ - π·R̄)`, the negated gradient at θ_old of `(1-β) KL(π_BoN || π_θ) - β E_{π_θ}[R̄]`,
where π_BoN comes from brute-force Best-of-n enumeration and R̄(y) is the expected backward reward of y, computed
here by a separate numpy loop over the other G-1 samples (or its closed form).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import group_estimators
from bond_jax import quantiles
from bon_oracles import all_tuples, brute_force_bon, exact_quantiles, random_case

K = 4  # outcomes; rewards with ties (3 levels)


@pytest.fixture(scope="module")
def case():
  probs, rewards = random_case(seed=3, num=K, levels=3)
  assert len(set(rewards)) < K  # ties present
  return probs, rewards


def loop_backward_reward(rewards, y, others, n, reward_form, floor, penalty, ties_lose):
  """The backward reward of outcome y against the other samples of its group, written out with numpy."""
  own, others = rewards[y], rewards[list(others)]
  p_lt, p_le = np.mean(others < own), max(np.mean(others <= own), floor)
  if reward_form == "penalty":
    pairs = [(a, b) for a in range(len(others)) for b in range(a + 1, len(others))]
    beats = (lambda r: r >= own) if ties_lose else (lambda r: r > own)
    return -penalty * np.mean([beats(others[a]) and beats(others[b]) for a, b in pairs])
  if reward_form == "log_quantile":
    return math.log(n) + (n - 1) * math.log(p_le)
  if p_lt == p_le:
    return math.log(n) + (n - 1) * math.log(p_le)
  return math.log((p_le**n - p_lt**n) / (p_le - p_lt))


def expected_reward(probs, rewards, group, **kwargs):
  """R̄(y) = E over the other G-1 samples of the backward reward of y."""
  others = all_tuples(K, group - 1)
  weights = np.prod(probs[others], axis=1)
  return np.array([weights @ [loop_backward_reward(rewards, y, o, **kwargs) for o in others] for y in range(K)])


def estimated_direction(probs, rewards, advantages_fn, group):
  """`E[mean_i A_i ∇_θ log π(y_i)]` over all K**G groups, with ∇_θ log softmax(θ)[y] = e_y - π."""
  groups = all_tuples(K, group)
  advantages = np.asarray(advantages_fn(jnp.asarray(rewards[groups], jnp.float32)), np.float64)
  weights = np.prod(probs[groups], axis=1)
  one_hot = np.eye(K)[groups] - probs  # [groups, G, K]
  return np.einsum("t,ti,tik->k", weights, advantages, one_hot) / group


def exact_direction(probs, bon, reward_bar, beta):
  return (1 - beta) * (bon - probs) + beta * probs * (reward_bar - probs @ reward_bar)


@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("n,beta,reward_form", [(2, 0.5, "tie_aware"), (3, 0.3, "log_quantile"), (3, 0.0, "tie_aware"),
                                                (2, 1.0, "tie_aware")])
def test_bond_group_advantages_follow_the_jeffreys_gradient(case, n, beta, reward_form, baseline):
  probs, rewards = case
  group, floor = 5, 1 / 8
  got = estimated_direction(probs, rewards, lambda r: group_estimators.bond_group_advantages(
      r, n=n, beta=beta, reward_form=reward_form, floor=floor, baseline=baseline), group)
  reward_bar = expected_reward(probs, rewards, group, n=n, reward_form=reward_form, floor=floor, penalty=0.0,
                               ties_lose=False)
  expected = exact_direction(probs, brute_force_bon(probs, rewards, n), reward_bar, beta)
  np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("ties_lose", [False, True])
def test_jbond_group_advantages_follow_the_jbond_gradient(case, ties_lose, baseline):
  """The paper's penalty, averaged over pairs of other samples, has expectation -penalty · P[both beat y]."""
  probs, rewards = case
  group, beta, penalty = 4, 0.5, 2.0
  got = estimated_direction(probs, rewards, lambda r: group_estimators.jbond_group_advantages(
      r, beta=beta, penalty=penalty, ties_lose=ties_lose, baseline=baseline), group)
  p_lt, p_le = exact_quantiles(probs, rewards)
  reward_bar = -penalty * (1 - (p_lt if ties_lose else p_le)) ** 2
  np.testing.assert_allclose(reward_bar, expected_reward(probs, rewards, group, n=2, reward_form="penalty", floor=0,
                                                         penalty=penalty, ties_lose=ties_lose), atol=1e-12)
  expected = exact_direction(probs, brute_force_bon(probs, rewards, 2), reward_bar, beta)
  np.testing.assert_allclose(got, expected, atol=2e-6)


def test_jbond_tie_aware_is_bond_with_n_2(case):
  rewards = jnp.asarray(case[1][all_tuples(K, 3)[:20]], jnp.float32)
  np.testing.assert_array_equal(
      group_estimators.jbond_group_advantages(rewards, reward_form="tie_aware", beta=0.3),
      group_estimators.bond_group_advantages(rewards, n=2, beta=0.3))


def test_baseline_cuts_the_second_moment(case):
  """The baseline leaves the expected direction unchanged (tests above) and shrinks the advantages."""
  probs, rewards = case
  groups = all_tuples(K, 5)
  weights = np.prod(probs[groups], axis=1)
  grouped = jnp.asarray(rewards[groups], jnp.float32)
  raw, centred = (np.asarray(group_estimators.bond_group_advantages(grouped, n=2, baseline=b)) for b in (False, True))
  assert weights @ (centred**2).sum(1) < 0.8 * (weights @ (raw**2).sum(1))


@pytest.mark.parametrize("n,k", [(2, 3), (3, 3), (4, 3), (3, 5)])
def test_bon_density_ratio_estimate_is_unbiased(case, n, k):
  """Averaged over every k-tuple of references, the estimate is π_BoN / π_ref of brute-force Best-of-n."""
  probs, rewards = case
  refs = all_tuples(K, k)
  weights = np.prod(probs[refs], axis=1)
  own = rewards[:, None, None]
  count_lt = np.sum(rewards[refs][None] < own, -1)
  count_le = np.sum(rewards[refs][None] <= own, -1)
  estimates = np.asarray(quantiles.bon_density_ratio_estimate(count_lt, count_le, k, n), np.float64)
  np.testing.assert_allclose(estimates @ weights, brute_force_bon(probs, rewards, n) / probs, rtol=2e-5)


def test_group_quantiles_match_a_loop_with_masks():
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 3, size=(3, 5)).astype(np.float32)
  mask = rng.random((3, 5)) < 0.7
  mask[2] = [True, False, False, False, False]  # a sample with no valid other
  p_lt, p_le = quantiles.group_quantiles(rewards.ravel(), group_size=5, mask=mask.ravel())
  for (p, i), lt, le in zip(np.ndindex(3, 5), np.asarray(p_lt), np.asarray(p_le)):
    others = [rewards[p, j] for j in range(5) if j != i and mask[p, j]]
    if not mask[p, i] or not others:
      assert (lt, le) == (0.0, 1.0)
      continue
    assert lt == pytest.approx(np.mean(np.array(others) < rewards[p, i]))
    assert le == pytest.approx(np.mean(np.array(others) <= rewards[p, i]))
  two_d = quantiles.group_quantiles(rewards, mask=mask)
  np.testing.assert_array_equal(two_d[1].ravel(), p_le)


def test_masked_samples_get_no_advantage_and_do_not_count():
  rewards = jnp.array([[0., 1., 2., 3., 9.]])
  mask = jnp.array([[True, True, True, True, False]])
  masked = group_estimators.bond_group_advantages(rewards, mask=mask, floor=0.1)
  np.testing.assert_allclose(masked[:, :4], group_estimators.bond_group_advantages(rewards[:, :4], floor=0.1),
                             atol=1e-6)
  assert masked[0, 4] == 0


@pytest.mark.parametrize("call,match", [
    (lambda: group_estimators.bond_group_advantages(jnp.zeros(6), group_size=2), "needs >= 3 samples per prompt"),
    (lambda: group_estimators.bond_group_advantages(jnp.zeros((2, 3)), n=3), "needs >= 4 samples per prompt"),
    (lambda: group_estimators.jbond_group_advantages(jnp.zeros((2, 2)), baseline=False), "needs >= 3 samples"),
    (lambda: group_estimators.bond_group_advantages(jnp.zeros(7), group_size=3), "not a multiple of `group_size`"),
    (lambda: group_estimators.bond_group_advantages(jnp.zeros(6)), r"`rewards` must have shape \[prompts, group\]"),
    (lambda: group_estimators.bond_group_advantages(jnp.zeros((2, 4)), beta=2.0), "`beta` must be in"),
    (lambda: group_estimators.jbond_group_advantages(jnp.zeros((2, 4)), reward_form="log_quantile"),
     "`reward_form` must be one of"),
])
def test_bad_groups_and_arguments_are_rejected(call, match):
  with pytest.raises(ValueError, match=match):
    call()
