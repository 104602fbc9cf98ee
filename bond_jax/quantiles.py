"""Reward quantiles and the exact Best-of-N distribution (BOND spec sections 2 and 3).

Best-of-N draws `y_1..y_N ~ π_ref` and keeps the highest reward (ties to the lowest index). With
`p_le(y) = P[r(y') <= r(y)]` and `p_lt(y) = P[r(y') < r(y)]` for `y' ~ π_ref`, Theorem 1 of
Sessa et al. (arXiv 2407.14622) gives its distribution exactly:

    π_BoN(y) = π_ref(y) · (p_le^N - p_lt^N) / (p_le - p_lt).

Everything here is a pure, jit-compatible function of arrays; `n` is a static Python integer.
"""

import math
import numbers

import chex
import jax.numpy as jnp


def check_n(n, name: str = "n") -> int:
  """Returns `n` if it is a Python integer >= 1, else raises a `ValueError` naming `name`."""
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
    raise ValueError(f"`{name}` must be an integer >= 1, got {n!r}.")
  return int(n)


def reward_quantiles(
    rewards: chex.Array, ref_rewards: chex.Array, ref_mask: chex.Array | None = None
) -> tuple[chex.Array, chex.Array]:
  """Monte Carlo reward quantiles of samples against reference samples of the same prompt.

  `p_lt[b, i] = mean_j 1[ref_rewards[b, j] < rewards[b, i]]` and likewise `p_le` with `<=`, the
  mean running over the valid (unmasked) references of row `b` only. One vectorised comparison of
  shape `[batch, samples, k]`.

  A row with no valid reference carries no information about the quantile: it gets `p_lt = 0`
  and `p_le = 1`, as if every reference tied with every sample. Then the exact BoN log-ratio
  (`bon_log_density_ratio`) and `log p_le` are both 0, so such rows add no BOND reward signal.

  Args:
    rewards: `[batch, samples]` rewards of the samples to rank.
    ref_rewards: `[batch, k]` rewards of reference samples `y' ~ π_ref(.|x)`.
    ref_mask: optional `[batch, k]` boolean; False marks padding that never counts.

  Returns:
    `(p_lt, p_le)`, each `[batch, samples]` float32 in `[0, 1]`, with `p_lt <= p_le`.

  Example:
    >>> p_lt, p_le = reward_quantiles(jnp.array([[1., 2.]]), jnp.array([[1., 0., 3.]]))
    >>> # p_lt = [[1/3, 2/3]], p_le = [[2/3, 2/3]]
  """
  chex.assert_rank([rewards, ref_rewards], 2)
  chex.assert_equal_shape_prefix([rewards, ref_rewards], 1)
  if ref_mask is None:
    ref_mask = jnp.ones(ref_rewards.shape, dtype=bool)
  chex.assert_equal_shape([ref_rewards, ref_mask])
  ref_mask = ref_mask.astype(bool)[:, None, :]
  ref, own = ref_rewards[:, None, :], rewards[:, :, None]
  num_valid = jnp.sum(ref_mask, axis=-1).astype(jnp.float32)
  count_lt = jnp.sum(ref_mask & (ref < own), axis=-1)
  count_le = jnp.sum(ref_mask & (ref <= own), axis=-1)
  has_refs = num_valid > 0
  denominator = jnp.maximum(num_valid, 1.0)
  p_lt = jnp.where(has_refs, count_lt / denominator, 0.0)
  p_le = jnp.where(has_refs, count_le / denominator, 1.0)
  return p_lt, p_le


def bon_log_density_ratio(p_lt: chex.Array, p_le: chex.Array, n: int) -> chex.Array:
  """Exact `log(π_BoN(y) / π_ref(y)) = log((p_le^n - p_lt^n) / (p_le - p_lt))` (Theorem 1).

  Written as `(n-1) log p_le + log((1 - q^n) / (1 - q))` with `q = p_lt / p_le`, and
  `log q = log1p(-(p_le - p_lt) / p_le)`, the tie factor is `log(-expm1(n log q)) -
  log(-expm1(log q))`: accurate for any gap, exactly `0` at `p_lt = 0` and, at `p_lt = p_le`
  (no reference ties, e.g. a Monte Carlo estimate), the limit `log n`, giving
  `log n + (n-1) log p_le`. `p_le = 0` gives `-inf` (for `n >= 2`). This is also the exact
  tie-aware BOND reward of the backward KL (spec section 3).

  Args:
    p_lt: `[...]` quantiles `P[r(y') < r(y)]`, in `[0, 1]`.
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`, same shape, `p_lt <= p_le`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` log density ratios, `0` everywhere for `n = 1`.

  Example:
    >>> bon_log_density_ratio(jnp.array([0.0, 0.5]), jnp.array([0.5, 0.5]), n=2)
    >>> # [log 0.5, log(2 * 0.5)] = [-0.693, 0.0]
  """
  n = check_n(n)
  chex.assert_equal_shape([p_lt, p_le])
  p_lt, p_le = jnp.asarray(p_lt, jnp.float32), jnp.asarray(p_le, jnp.float32)
  if n == 1:
    return jnp.zeros_like(p_le)
  gap = p_le - p_lt
  has_gap = gap > 0
  # Where there is no gap the tie factor is its limit log n; the safe value keeps the unused
  # branch (and its gradient) finite.
  safe_log_q = jnp.where(has_gap, jnp.log1p(-gap / jnp.where(has_gap, p_le, 1.0)), -1.0)
  tie_factor = jnp.log(-jnp.expm1(n * safe_log_q)) - jnp.log(-jnp.expm1(safe_log_q))
  tie_factor = jnp.where(has_gap, tie_factor, math.log(n))
  return (n - 1) * jnp.log(p_le) + tie_factor


def bon_log_density_ratio_no_ties(p_le: chex.Array, n: int) -> chex.Array:
  """No-tie approximation `log n + (n-1) log p_le` of `log(π_BoN(y) / π_ref(y))`.

  Exact when ties with `y` have no mass; the paper (arXiv 2407.14622) uses it in practice.

  Args:
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` approximate log density ratios (`0` for `n = 1`, `-inf` where `p_le = 0`, `n >= 2`).

  Example:
    >>> bon_log_density_ratio_no_ties(jnp.array([0.5, 1.0]), n=4)  # log 4 + 3 log p_le
  """
  n = check_n(n)
  p_le = jnp.asarray(p_le, jnp.float32)
  if n == 1:
    return jnp.zeros_like(p_le)
  return math.log(n) + (n - 1) * jnp.log(p_le)


def bon_log_prob(
    ref_log_prob: chex.Array, p_lt: chex.Array | None, p_le: chex.Array, n: int
) -> chex.Array:
  """`log π_BoN(y) = log π_ref(y) + log((p_le^n - p_lt^n) / (p_le - p_lt))` (Theorem 1).

  Args:
    ref_log_prob: `[...]` `log π_ref(y)` (may be `-inf`).
    p_lt: `[...]` `P[r(y') < r(y)]`, or None for the no-tie approximation
      `log π_ref(y) + log n + (n-1) log p_le`.
    p_le: `[...]` `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` Best-of-N log-probabilities.

  Example:
    >>> # Two equally likely outcomes with rewards 0 < 1: BoN_2 = [1/4, 3/4].
    >>> bon_log_prob(jnp.log(jnp.array([.5, .5])), jnp.array([0., .5]), jnp.array([.5, 1.]), 2)
  """
  if p_lt is None:
    log_ratio = bon_log_density_ratio_no_ties(p_le, n)
  else:
    log_ratio = bon_log_density_ratio(p_lt, p_le, n)
  chex.assert_equal_shape([ref_log_prob, log_ratio])
  return ref_log_prob + log_ratio


def bon_kl_upper_bound(n: int) -> float:
  """`log n - (n-1)/n`: `KL(π_BoN || π_ref)` without ties, a strict upper bound with ties.

  Example:
    >>> bon_kl_upper_bound(4)  # log 4 - 3/4 = 0.636
  """
  n = check_n(n)
  return math.log(n) - (n - 1) / n


def bon_expected_quantile(n: int) -> float:
  """`n / (n+1)`, the mean reward quantile of Best-of-N without ties (Beta(n, 1) mean).

  With ties, `E[p_lt(Y)] < n/(n+1) < E[p_le(Y)]` for `Y ~ π_BoN`.

  Example:
    >>> bon_expected_quantile(4)  # 0.8
  """
  n = check_n(n)
  return n / (n + 1)


def best_of_n(rewards: chex.Array, mask: chex.Array | None = None) -> chex.Array:
  """Index of the best sample per row; ties go to the lowest index; masked samples never win.

  Args:
    rewards: `[batch, samples]` rewards; NaN is treated as masked.
    mask: optional `[batch, samples]` boolean; False marks padding.

  Returns:
    `[batch]` int32 indices; `0` for a row with no valid sample.

  Example:
    >>> best_of_n(jnp.array([[1., 3., 3.]]))  # [1]
  """
  chex.assert_rank(rewards, 2)
  if mask is None:
    mask = jnp.ones(rewards.shape, dtype=bool)
  chex.assert_equal_shape([rewards, mask])
  mask = mask.astype(bool) & ~jnp.isnan(rewards)
  best = jnp.max(jnp.where(mask, rewards, -jnp.inf), axis=-1, keepdims=True)
  # argmax of a boolean array returns its first True, i.e. the lowest winning index; comparing
  # against the best valid reward keeps masked samples out even when every reward is -inf.
  return jnp.argmax(mask & (rewards == best), axis=-1).astype(jnp.int32)
