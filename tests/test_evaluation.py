"""Evaluation's exact Best-of-N KL and quantile (against enumeration and closed forms), its Best-of-N groups
(against brute force) and its standard errors (against the spread of repeated evaluations)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import evaluation
from bond_jax import quantiles
from bon_oracles import brute_force_bon, exact_quantiles


def enumerated_kl_and_quantile(probs, rewards, n):
  """KL(BoN_n || π) and E_BoN[(p_lt + p_le) / 2] of a discrete distribution, Best-of-n by enumerating n-tuples."""
  bon = brute_force_bon(probs, rewards, n)
  p_lt, p_le = exact_quantiles(probs, rewards)
  kl = float(np.sum(np.where(bon > 0, bon * np.log(np.where(bon > 0, bon, 1.0) / probs), 0.0)))
  return kl, float(np.sum(bon * (p_lt + p_le) / 2))


@pytest.mark.parametrize("n", [1, 2, 4, 8.5, 100])
def test_without_ties_bon_kl_and_quantile_are_the_closed_forms(n):
  rewards = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
  kl, quantile = quantiles.bon_kl_and_quantile(rewards, n)
  np.testing.assert_allclose(kl, math.log(n) - (n - 1) / n, atol=2e-5)
  np.testing.assert_allclose(quantile, n / (n + 1), atol=2e-6)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_with_ties_bon_kl_and_quantile_match_enumeration(n):
  # 12 samples of 4 reward levels, each seen 2 to 4 times: the estimated distribution is discrete.
  samples = np.array([0.3, -1.0, 2.0, 0.3, 0.7, 2.0, -1.0, 0.3, 0.7, 2.0, 0.3, 0.7])
  values, counts = np.unique(samples, return_counts=True)
  expected = enumerated_kl_and_quantile(counts / len(samples), values, n)
  kl, quantile = quantiles.bon_kl_and_quantile(jnp.asarray(samples[None], jnp.float32), n)
  np.testing.assert_allclose([float(kl[0]), float(quantile[0])], expected, rtol=1e-5, atol=1e-6)
  assert float(kl[0]) < math.log(n) - (n - 1) / n  # Ties: strictly below the tie-free bound.


def test_mixed_ties_match_enumeration_of_a_refined_distribution():
  """A reward seen once stands for a continuous stretch of quantiles: split it into many equal tie-free atoms and
  enumerate Best-of-n of the refinement; the atoms seen twice stay atoms."""
  samples = np.array([0.5, 1.0, 0.5, 3.0, 2.0, 2.0])  # Atoms 0.5 and 2.0; singletons 1.0 and 3.0.
  pieces = 400
  values, counts = np.unique(samples, return_counts=True)
  refined_values, refined_probs = [], []
  for value, count in zip(values, counts):
    split = pieces if count == 1 else 1
    refined_values += list(value + 1e-6 * np.arange(split))
    refined_probs += [count / len(samples) / split] * split
  expected = enumerated_kl_and_quantile(np.array(refined_probs), np.array(refined_values), 2)
  kl, quantile = quantiles.bon_kl_and_quantile(jnp.asarray(samples[None], jnp.float32), 2)
  np.testing.assert_allclose([float(kl[0]), float(quantile[0])], expected, atol=2e-3)


def test_best_of_n_groups_rank_each_winner_against_the_samples_outside_its_group():
  rng = np.random.default_rng(1)
  pool = rng.integers(0, 5, size=(3, 12)).astype(np.float32)  # Many ties.
  n = 4
  index, best, quantile = evaluation.best_of_n_groups(jnp.asarray(pool), n)
  for b in range(3):
    for g in range(3):
      group = pool[b, g * n:(g + 1) * n]
      assert index[b, g] == g * n + int(np.argmax(group)) and best[b, g] == group.max()
      others = np.delete(pool[b], np.arange(g * n, (g + 1) * n))
      expected = (np.mean(others < group.max()) + np.mean(others <= group.max())) / 2
      assert float(quantile[b, g]) == pytest.approx(expected)


def _synthetic_evaluation(rng, prompts):
  """Per-prompt metrics of one evaluation of `prompts` prompts drawn at random, with a tie-free frontier."""
  ns = np.array(evaluation.FRONTIER_NS, np.float64)
  noise = rng.normal(size=(2, prompts))
  kl = np.exp(0.3 + 0.4 * noise[0])
  quantile = np.clip(0.78 + 0.05 * noise[0] + 0.1 * noise[1], 0, 1)
  return {"quantile/policy": quantile, "kl/policy_ref": kl,
          "frontier/kl": np.tile(np.log(ns) - (ns - 1) / ns, (prompts, 1)),
          "frontier/quantile": np.tile(ns / (ns + 1), (prompts, 1))}


def test_standard_errors_match_the_spread_of_repeated_evaluations():
  rng = np.random.default_rng(0)
  runs = [evaluation.summarize([_synthetic_evaluation(rng, prompts=40)]) for _ in range(1000)]
  for name in ("quantile/policy", "kl/policy_ref", "frontier/gap", "frontier/excess_kl"):
    spread = np.std([r[name] for r in runs])
    reported = np.mean([r[name + evaluation.SE_SUFFIX] for r in runs])
    assert reported == pytest.approx(spread, rel=0.08), name
