"""Verifiable (right/wrong) and few-level rewards: tie-aware BOND and J-BOND reach Best-of-N, the paper's forms can't.

Spaces of 8 outcomes whose rewards take 2 or 3 values, so most samples tie. A backward-KL objective
`E_π[log π - log π_ref - R(y)]` over all policies is minimised by `π* ∝ π_ref · exp(E[R(y)])` (the
Gibbs variational principle), where `E[R(y)]` averages the reward over the Monte Carlo reference
samples. Each test computes that expectation exactly, by enumerating the reference samples'
outcomes, so the fixed point of each reward form is known in closed form.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bond_jax
from bond_jax import losses
from bon_oracles import all_tuples, brute_force_bon, exact_quantiles, softmax

N, K, BATCH, STEPS = 8, 16, 64, 500
# Total reference mass of each reward level (worst first) and how many of the 8 outcomes share it.
CASES = {"binary": ((0.9, 0.1), (6, 2)), "three_level": ((0.6, 0.3, 0.1), (3, 3, 2))}


def tied_case(name):
  """`(probs, rewards)`: π_ref over 8 outcomes and their rewards, reward level l holding mass `masses[l]`."""
  masses, sizes = CASES[name]
  rng = np.random.default_rng(7)
  rewards = np.repeat(np.arange(len(sizes)), sizes).astype(np.float64)
  probs = np.concatenate([m * rng.dirichlet(np.ones(s)) for m, s in zip(masses, sizes)])
  return probs, rewards


def exact_kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


def theorem1_bon(probs, rewards):
  """Best-of-N of π_ref by Theorem 1 (checked against brute force in test_quantiles; 8**8 tuples is too many)."""
  p_lt, p_le = exact_quantiles(probs, rewards)
  return softmax(np.log(probs) + np.asarray(bond_jax.bon_log_density_ratio(p_lt, p_le, N), np.float64))


def gibbs(probs, expected_reward):
  """`π_ref · exp(E[R])`, normalised: the minimiser of `E_π[log π - log π_ref - E[R]]`."""
  return softmax(np.log(probs) + expected_reward)


def expected_bond_reward(probs, rewards, reward_form):
  """`E[bond_log_ratio(p̂_lt, p̂_le)]` per outcome, p̂ from K reference samples: all multinomial counts."""
  p_lt, p_le = exact_quantiles(probs, rewards)
  below, ties = np.meshgrid(np.arange(K + 1), np.arange(K + 1), indexing="ij")
  valid = below + ties <= K
  below, ties = below[valid], ties[valid]
  ratio = losses.bond_log_ratio(jnp.asarray(below / K), jnp.asarray((below + ties) / K), N,
                                floor=losses.quantile_floor(K), reward_form=reward_form)
  coef = np.array([math.comb(K, b) * math.comb(K - b, t) for b, t in zip(below, ties)])
  # Multinomial probabilities of (below, tied, above) counts; numpy's 0 ** 0 = 1 covers empty classes.
  p_below, p_tie, p_above = p_lt[:, None], (p_le - p_lt)[:, None], (1 - p_le)[:, None]
  weights = coef * p_below**below * p_tie**ties * p_above ** (K - below - ties)
  return weights @ np.asarray(ratio, np.float64)


@functools.partial(jax.jit, static_argnames="reward_form")
def train_backward_bond(ref_logits, rewards, key, *, reward_form):
  """Adam on `backward_kl_loss` towards Best-of-N of π_ref, quantiles from K fresh reference samples."""
  optimizer = optax.adam(optax.cosine_decay_schedule(0.1, STEPS))

  def step(carry, key):
    theta, opt_state = carry
    policy_key, ref_key = jax.random.split(key)
    y = jax.random.categorical(policy_key, theta, shape=(BATCH, 2))
    refs = jax.random.categorical(ref_key, ref_logits, shape=(BATCH, K))
    p_lt, p_le = bond_jax.reward_quantiles(rewards[y], rewards[refs])

    def loss_fn(theta):
      log_pi = jax.nn.log_softmax(theta)
      return bond_jax.backward_kl_loss(log_pi[y], jax.nn.log_softmax(ref_logits)[y], p_lt, p_le, N,
                                       floor=bond_jax.quantile_floor(K), reward_form=reward_form)[0]

    updates, opt_state = optimizer.update(jax.grad(loss_fn)(theta), opt_state)
    return (optax.apply_updates(theta, updates), opt_state), None

  (theta, _), _ = jax.lax.scan(step, (ref_logits, optimizer.init(ref_logits)), jax.random.split(key, STEPS))
  return theta


@pytest.mark.parametrize("name", list(CASES))
def test_log_quantile_fixed_point_is_not_best_of_n(name):
  """With exact quantiles the paper's reward is minimised by `π_ref · p_le^(N-1)`, measurably not π_BoN."""
  probs, rewards = tied_case(name)
  p_lt, p_le = exact_quantiles(probs, rewards)
  bon = theorem1_bon(probs, rewards)
  log_quantile_optimum = gibbs(probs, (N - 1) * np.log(p_le))
  tie_aware_optimum = gibbs(probs, np.asarray(bond_jax.bon_log_density_ratio(p_lt, p_le, N), np.float64))
  assert exact_kl(log_quantile_optimum, bon) > 0.05
  assert exact_kl(tie_aware_optimum, bon) < 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_tie_aware_bond_training_reaches_best_of_n(name):
  """Backward-KL BOND with K-sample quantiles: tie-aware ends within 0.05 nats of π_BoN; log_quantile can't."""
  probs, rewards = tied_case(name)
  bon = theorem1_bon(probs, rewards)
  ref_logits, rewards_f32 = jnp.log(jnp.asarray(probs, jnp.float32)), jnp.asarray(rewards, jnp.float32)
  assert exact_kl(probs, bon) > 0.2

  optima = {form: gibbs(probs, expected_bond_reward(probs, rewards, form)) for form in losses.REWARD_FORMS}
  trained = {form: softmax(np.asarray(train_backward_bond(ref_logits, rewards_f32, jax.random.key(0),
                                                          reward_form=form), np.float64))
             for form in losses.REWARD_FORMS}
  # Training lands on each form's own fixed point ...
  for form in losses.REWARD_FORMS:
    assert exact_kl(trained[form], optima[form]) < 0.01, form
  # ... which is Best-of-N for the tie-aware reward (up to the K-sample estimate's small bias) only.
  assert exact_kl(optima["tie_aware"], bon) < 0.01
  assert exact_kl(trained["tie_aware"], bon) < 0.05
  assert exact_kl(optima["log_quantile"], bon) > 0.05
  assert exact_kl(trained["log_quantile"], bon) > 0.05


@pytest.mark.parametrize("name", list(CASES))
def test_tie_aware_jbond_fixed_point_is_best_of_2(name):
  """J-BOND's backward term with 2 anchor samples: its minimiser against Best-of-2 of the anchor."""
  probs, rewards = tied_case(name)
  bon2 = brute_force_bon(probs, rewards, 2)
  triples = all_tuples(len(probs), 3)  # (y, y'_1, y'_2)
  weights = np.prod(probs[triples[:, 1:]], axis=1)
  rewards_f32 = jnp.asarray(rewards, jnp.float32)
  own, anchors = rewards_f32[triples[:, :1]], rewards_f32[triples[:, 1:]]

  def expected(per_triple):
    return np.bincount(triples[:, 0], weights=weights * np.asarray(per_triple, np.float64)[:, 0])

  tie_aware = gibbs(probs, expected(losses.jbond_tie_aware_reward(own, anchors)))
  paper = gibbs(probs, expected(losses.jbond_reward(own, anchors)))
  assert exact_kl(tie_aware, bon2) < 0.01
  assert exact_kl(paper, bon2) > 3 * exact_kl(tie_aware, bon2)
  assert exact_kl(paper, bon2) > 0.01
