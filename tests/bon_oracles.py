"""Independent numpy oracles on small discrete spaces, shared by the BOND maths tests."""

import numpy as np


def random_case(seed, num, levels=None):
  """Random π_ref over `num` outcomes; rewards with `levels` distinct values (None: all distinct)."""
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(num))
  rewards = rng.permutation(num) if levels is None else rng.integers(0, levels, num)
  return probs, rewards.astype(np.float64)


def exact_quantiles(probs, rewards):
  """`(p_lt, p_le)` of every outcome under `probs`, float64, from the sorted reward CDF."""
  order = np.argsort(rewards)
  sorted_rewards = rewards[order]
  cdf = np.concatenate([[0.0], np.cumsum(probs[order])])
  p_lt = cdf[np.searchsorted(sorted_rewards, rewards, side="left")]
  p_le = cdf[np.searchsorted(sorted_rewards, rewards, side="right")]
  return p_lt, p_le


def all_tuples(num, length):
  """`[num**length, length]` every index tuple, in lexicographic order."""
  return np.indices((num,) * length).reshape(length, -1).T


def brute_force_bon(probs, rewards, n):
  """Best-of-n distribution by enumerating all n-tuples, first index wins ties."""
  tuples = all_tuples(len(probs), n)
  weights = np.prod(probs[tuples], axis=1)
  winners = tuples[np.arange(len(tuples)), np.argmax(rewards[tuples], axis=1)]
  return np.bincount(winners, weights=weights, minlength=len(probs))


def softmax(logits):
  z = np.exp(logits - logits.max())
  return z / z.sum()
