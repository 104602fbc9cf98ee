"""Reward quantiles and the exact Best-of-N distribution (docs/method.md).

Best-of-N draws `y_1..y_N ~ π_ref` and keeps the highest reward (ties to the lowest index). With
`p_le(y) = P[r(y') <= r(y)]` and `p_lt(y) = P[r(y') < r(y)]` for `y' ~ π_ref`, Theorem 1 of
Sessa et al. (arXiv 2407.14622) gives its distribution exactly:

    π_BoN(y) = π_ref(y) · (p_le^N - p_lt^N) / (p_le - p_lt).

Everything here is a pure, jit-compatible function of arrays; `n` is a static Python integer.
"""

import math

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from bond_jax import arguments


def _count_below(own: chex.Array, refs: chex.Array, valid: chex.Array):
  """`(count_lt, count_le, num_valid)` of broadcast comparisons `refs < own`, `refs <= own` over the last axis."""
  count_lt = jnp.sum(valid & (refs < own), axis=-1)
  count_le = jnp.sum(valid & (refs <= own), axis=-1)
  return count_lt, count_le, jnp.sum(valid, axis=-1)


def _fractions(count_lt: chex.Array, count_le: chex.Array, num_valid: chex.Array):
  """Counts to quantiles; `(0, 1)` where nothing was compared, so that every BOND log ratio there is 0."""
  has_refs = num_valid > 0
  denominator = jnp.maximum(num_valid, 1).astype(jnp.float32)
  p_lt = jnp.where(has_refs, count_lt / denominator, 0.0)
  p_le = jnp.where(has_refs, count_le / denominator, 1.0)
  return p_lt, p_le


def _validity(mask: chex.Array | None, like: chex.Array, name: str, layout: str) -> chex.Array:
  if mask is None:
    return jnp.ones(jnp.shape(like), dtype=bool)
  arguments.check_shape(mask, name, jnp.shape(like), layout)
  return jnp.asarray(mask).astype(bool)


def reward_quantiles(
    rewards: chex.Array, ref_rewards: chex.Array, ref_mask: chex.Array | None = None
) -> tuple[chex.Array, chex.Array]:
  """Monte Carlo reward quantiles of samples against reference samples of the same prompt.

  `p_lt[b, i] = mean_j 1[ref_rewards[b, j] < rewards[b, i]]` and likewise `p_le` with `<=`, the
  mean running over the valid (unmasked) references of row `b` only (docs/method.md, 'Estimating the
  quantile'). One vectorised comparison of shape `[batch, samples, k]`.

  A row with no valid reference carries no information about the quantile: it gets `p_lt = 0`
  and `p_le = 1`, as if every reference tied with every sample. Then the exact BoN log-ratio
  (`bon_log_density_ratio`) and `log p_le` are both 0, so such rows add no BOND reward signal.

  Args:
    rewards: `[batch, samples]` rewards of the samples to rank.
    ref_rewards: `[batch, k]` rewards of reference samples `y' ~ π_ref(.|x)`.
    ref_mask: optional `[batch, k]` boolean; False marks padding that never counts.

  Returns:
    `(p_lt, p_le)`, each `[batch, samples]` float32 in `[0, 1]`, with `p_lt <= p_le`.

  Raises:
    ValueError: an argument of another shape.

  Example:
    >>> p_lt, p_le = reward_quantiles(jnp.array([[1., 2.]]), jnp.array([[1., 0., 3.]]))
    >>> 3 * p_lt, 3 * p_le  # counts of the 3 references below, and below or tied
    (Array([[1., 2.]], dtype=float32), Array([[2., 2.]], dtype=float32))
  """
  arguments.check_rank(rewards, "rewards", (2,), "[batch, samples]")
  arguments.check_rank(ref_rewards, "ref_rewards", (2,), "[batch, k]")
  arguments.check_shape(ref_rewards, "ref_rewards", (rewards.shape[0], ref_rewards.shape[1]),
                        "[batch, k] (batch of `rewards`)")
  valid = _validity(ref_mask, ref_rewards, "ref_mask", "[batch, k]")
  counts = _count_below(rewards[:, :, None], ref_rewards[:, None, :], valid[:, None, :])
  return _fractions(*counts)


def to_groups(values: chex.Array, group_size: int | None = None, name: str = "rewards") -> chex.Array:
  """`[prompts, group]` view of per-sample values laid out as GRPO-style trainers hold them.

  Args:
    values: `[prompts * group]` (flat, each prompt's samples consecutive) with `group_size`, or
      `[prompts, group]` without.
    group_size: samples per prompt for flat `values`; None for `[prompts, group]` input.
    name: the argument's name, for errors.

  Returns:
    `[prompts, group]` values.

  Raises:
    ValueError: `values` of another rank, or a length not divisible by `group_size`.

  Example:
    >>> to_groups(jnp.arange(6.), 3)
    Array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32)
  """
  values = jnp.asarray(values)
  if group_size is None:
    arguments.check_rank(values, name, (2,), "[prompts, group] (or flat, with `group_size`)")
    return values
  group_size = arguments.check_n(group_size, "group_size")
  arguments.check_rank(values, name, (1,), "[prompts * group_size] (flat, with `group_size`)")
  if values.shape[0] % group_size:
    raise ValueError(f"`{name}` has {values.shape[0]} entries, not a multiple of `group_size` = {group_size}.")
  return values.reshape(-1, group_size)


def pairwise_comparisons(rewards: chex.Array, mask: chex.Array) -> tuple[chex.Array, chex.Array]:
  """`less[p, i, j] = 1[r_pj < r_pi]` and `tied[p, i, j] = 1[r_pj == r_pi]` over valid others `j != i`.

  Args:
    rewards: `[prompts, group]` rewards.
    mask: `[prompts, group]` boolean validity.

  Returns:
    `(less, tied)`, each `[prompts, group, group]` boolean, False on the diagonal and for invalid `i` or `j`.

  Example:
    >>> less, tied = pairwise_comparisons(jnp.array([[0., 1., 1.]]), jnp.ones((1, 3), bool))
    >>> less.astype(int)[0], tied.astype(int)[0]
    (Array([[0, 0, 0],
           [1, 0, 0],
           [1, 0, 0]], dtype=int32), Array([[0, 0, 0],
           [0, 0, 1],
           [0, 1, 0]], dtype=int32))
  """
  group = rewards.shape[-1]
  valid = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(group, dtype=bool)
  own, others = rewards[:, :, None], rewards[:, None, :]
  return valid & (others < own), valid & (others == own)


def group_quantiles(
    rewards: chex.Array, group_size: int | None = None, mask: chex.Array | None = None
) -> tuple[chex.Array, chex.Array]:
  """Leave-one-out reward quantiles of each sample against the other samples of its group.

  For GRPO-style batches (G samples of each prompt from the rollout policy π): `p_lt` of sample i is
  the fraction of the *other* valid samples of its group with a lower reward, `p_le` with a lower or
  equal one, i.e. `reward_quantiles` with the rest of the group as the references. They estimate the
  quantiles under π itself, so BOND rewards built on them target Best-of-N of the rollout policy
  (docs/method.md, 'Iterative BOND and the moving anchor'). A sample with no valid other gets
  `(p_lt, p_le) = (0, 1)`, as in `reward_quantiles`.

  Args:
    rewards: `[prompts * group]` with `group_size`, or `[prompts, group]`.
    group_size: samples per prompt for flat input (see `to_groups`).
    mask: optional boolean validity, the shape of `rewards`; invalid samples are never compared.

  Returns:
    `(p_lt, p_le)`, float32, the shape of `rewards`.

  Raises:
    ValueError: arguments of other shapes.

  Example:
    >>> p_lt, p_le = group_quantiles(jnp.array([0., 1., 1., 2., 5., 3.]), group_size=3)
    >>> p_lt.tolist(), p_le.tolist()
    ([0.0, 0.5, 0.5, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.0, 1.0, 0.5])
  """
  grouped = to_groups(rewards, group_size)
  valid = _validity(None if mask is None else to_groups(mask, group_size, "mask"), grouped, "mask",
                    "the shape of `rewards`")
  less, tied = pairwise_comparisons(grouped, valid)
  count_lt = jnp.sum(less, axis=-1)
  count_le = count_lt + jnp.sum(tied, axis=-1)
  others = jnp.sum(valid, axis=-1, keepdims=True) - 1
  p_lt, p_le = _fractions(count_lt, count_le, jnp.where(valid, others, 0))
  return p_lt.reshape(jnp.shape(rewards)), p_le.reshape(jnp.shape(rewards))


def _log_comb(total: chex.Array, chosen: chex.Array) -> chex.Array:
  """`log C(total, chosen)`, `-inf` where `chosen` is outside `[0, total]`."""
  total, chosen = jnp.asarray(total, jnp.float32), jnp.asarray(chosen, jnp.float32)
  inside = (chosen >= 0) & (chosen <= total)
  safe = jnp.where(inside, chosen, 0.0)
  value = gammaln(total + 1) - gammaln(safe + 1) - gammaln(total - safe + 1)
  return jnp.where(inside, value, -jnp.inf)


def bon_density_ratio_estimate(
    count_lt: chex.Array, count_le: chex.Array, num_refs: chex.Array, n: int
) -> chex.Array:
  """Unbiased estimate of `π_BoN(y) / π_ref(y) = (p_le^n - p_lt^n) / (p_le - p_lt)` from k reference samples.

  `(p_le^n - p_lt^n) / (p_le - p_lt) = E[1[no z_j beats y] · n / (1 + #{j: z_j ties y})]` over `n - 1`
  i.i.d. `z_j ~ π_ref` (y inserted at a uniformly random place among them wins the first-index
  tie-break with probability `1 / (1 + ties)`). Averaging that over every `(n-1)`-subset of the k
  references (a U-statistic) gives, with `a = count_lt` references below y and `t = count_le - count_lt`
  tied with it,

      Σ_{s=0}^{n-1} C(t, s) C(a, n-1-s) / C(k, n-1) · n / (s + 1),

  exactly unbiased for any `k >= n - 1`. It is the importance weight that turns samples of π_ref
  into an unbiased forward-KL (Best-of-N NLL) gradient: `E_{π_ref}[w · ∇log π] = E_{π_BoN}[∇log π]`.
  For `n = 2` it is `p̂_lt + p̂_le`.

  Args:
    count_lt: `[...]` number of references with a strictly lower reward.
    count_le: `[...]` number with a lower or equal reward.
    num_refs: `[...]` (or scalar) number of valid references k; entries with `k < n - 1` give NaN.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` float32 non-negative estimates with mean exactly the density ratio (and `1` for `n = 1`).

  Example:
    >>> # 3 references: one below y, one tied, one above. n = 2: p̂_lt + p̂_le = 1/3 + 2/3.
    >>> round(float(bon_density_ratio_estimate(1, 2, 3, n=2)), 4)
    1.0
  """
  n = arguments.check_n(n)
  count_lt, count_le, num_refs = (jnp.asarray(x, jnp.float32) for x in (count_lt, count_le, num_refs))
  ties = count_le - count_lt
  s = jnp.arange(n, dtype=jnp.float32)
  expand = lambda x: jnp.asarray(x)[..., None]
  log_terms = (_log_comb(expand(ties), s) + _log_comb(expand(count_lt), n - 1 - s) + jnp.log(n / (s + 1)))
  estimate = jnp.sum(jnp.exp(log_terms), axis=-1) / jnp.exp(_log_comb(num_refs, n - 1))
  return jnp.where(num_refs >= n - 1, estimate, jnp.nan)


def bon_log_density_ratio(p_lt: chex.Array, p_le: chex.Array, n: int) -> chex.Array:
  """Exact `log(π_BoN(y) / π_ref(y)) = log((p_le^n - p_lt^n) / (p_le - p_lt))` (Theorem 1).

  Written as `(n-1) log p_le + log((1 - q^n) / (1 - q))` with `q = p_lt / p_le`, and
  `log q = log1p(-(p_le - p_lt) / p_le)`, the tie factor is `log(-expm1(n log q)) -
  log(-expm1(log q))`: accurate for any gap, exactly `0` at `p_lt = 0` and, at `p_lt = p_le`
  (no reference ties, e.g. a Monte Carlo estimate), the limit `log n`, giving
  `log n + (n-1) log p_le`. `p_le = 0` gives `-inf` (for `n >= 2`). This is also the exact
  tie-aware BOND reward of the backward KL (docs/method.md, 'The BOND objective').

  Args:
    p_lt: `[...]` quantiles `P[r(y') < r(y)]`, in `[0, 1]`.
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`, same shape, `p_lt <= p_le`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` float32 log density ratios, `0` everywhere for `n = 1`.

  Raises:
    ValueError: a bad `n` or shapes that differ.

  Example:
    >>> bon_log_density_ratio(jnp.array([0.0, 0.5]), jnp.array([0.5, 0.5]), n=2)  # [log 0.5, log(2 · 0.5)]
    Array([-0.6931472,  0.       ], dtype=float32)
  """
  n = arguments.check_n(n)
  arguments.check_shape(p_le, "p_le", jnp.shape(p_lt), "the shape of `p_lt`")
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

  Exact when ties with `y` have no mass; the paper (Sessa et al., arXiv 2407.14622) uses it in practice.

  Args:
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[...]` float32 approximate log density ratios (`0` for `n = 1`, `-inf` where `p_le = 0`, `n >= 2`).

  Example:
    >>> bon_log_density_ratio_no_ties(jnp.array([0.5, 1.0]), n=4)  # log 4 + 3 log p_le
    Array([-0.6931472,  1.3862944], dtype=float32)
  """
  n = arguments.check_n(n)
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
    `[...]` float32 Best-of-N log-probabilities.

  Example:
    >>> # Two equally likely outcomes with rewards 0 < 1: BoN_2 = [1/4, 3/4].
    >>> log_bon = bon_log_prob(jnp.log(jnp.array([.5, .5])), jnp.array([0., .5]), jnp.array([.5, 1.]), 2)
    >>> jnp.exp(log_bon)
    Array([0.25, 0.75], dtype=float32)
  """
  if p_lt is None:
    log_ratio = bon_log_density_ratio_no_ties(p_le, n)
  else:
    log_ratio = bon_log_density_ratio(p_lt, p_le, n)
  arguments.check_shape(ref_log_prob, "ref_log_prob", log_ratio.shape, "the shape of `p_le`")
  return ref_log_prob + log_ratio


def bon_kl_upper_bound(n: int) -> float:
  """`log n - (n-1)/n`: `KL(π_BoN || π_ref)` without ties, a strict upper bound with ties.

  Example:
    >>> round(bon_kl_upper_bound(4), 4)  # log 4 - 3/4
    0.6363
  """
  n = arguments.check_n(n)
  return math.log(n) - (n - 1) / n


def bon_expected_quantile(n: int) -> float:
  """`n / (n+1)`, the mean reward quantile of Best-of-N without ties (Beta(n, 1) mean).

  With ties, `E[p_lt(Y)] < n/(n+1) < E[p_le(Y)]` for `Y ~ π_BoN`.

  Example:
    >>> bon_expected_quantile(4)
    0.8
  """
  n = arguments.check_n(n)
  return n / (n + 1)


def _integrated_log_bon_density(u: chex.Array, n: chex.Array) -> chex.Array:
  """`∫_0^u n v^(n-1) log(n v^(n-1)) dv = u^n (log n + (n-1) log u - (n-1)/n)`, 0 at `u = 0`."""
  safe_u = jnp.where(u > 0, u, 1.0)
  value = u ** n * (jnp.log(n) + (n - 1) * jnp.log(safe_u) - (n - 1) / n)
  return jnp.where(u > 0, value, 0.0)


def bon_kl_and_quantile(ref_rewards: chex.Array, n) -> tuple[chex.Array, chex.Array]:
  """`KL(π_BoN || π_ref)` and Best-of-n's expected mid-rank quantile, exact (Theorem 1) for the reward
  distribution estimated from k reference samples of each prompt, ties included.

  Only the reward's distribution under `π_ref` matters: `π_BoN / π_ref` depends on `y` through `p_lt(y)` and
  `p_le(y)` alone, so the KL between the generations' distributions is the KL between the rewards'. The estimated
  distribution takes a reward seen c >= 2 times among the k samples as an atom of mass `c/k` (a tie: Best-of-n
  gives it mass `p_le^n - p_lt^n`, the KL term `(p_le^n - p_lt^n) log((p_le^n - p_lt^n) / (c/k))`), and a reward
  seen once as a continuous stretch of quantiles `[p_lt, p_le]` of width `1/k`, on which Best-of-n has density
  `n u^(n-1)`. Without repeated rewards the KL is therefore exactly the tie-free `log n - (n-1)/n`
  (`bon_kl_upper_bound`) and the quantile `n/(n+1)`; with ties both are lower, e.g. for a binary reward they are
  the closed forms of Theorem 1 at the estimated pass rate. The mid-rank quantile is `(p_lt + p_le) / 2`, what a
  sample ranked against fresh reference samples scores in expectation (`evaluation`).

  Args:
    ref_rewards: `[batch, k]` rewards of k samples `y' ~ π_ref` of each prompt.
    n: the N of Best-of-N, a number >= 1 (not necessarily an integer: `F^n` is a distribution for any real
      `n >= 1`) or an array `[m]` of them.

  Returns:
    `(kl, quantile)`, each `[batch]` (`[batch, m]` for an array `n`) float32, the KL in nats.

  Example:
    >>> rewards = jnp.array([[0.1, 0.4, 0.2, 0.3], [0., 0., 1., 1.]])  # no ties; a fair coin
    >>> kl, quantile = bon_kl_and_quantile(rewards, 2)
    >>> [round(float(v), 4) for v in kl]   # [log 2 - 1/2, 3/4 log 3/2 + 1/4 log 1/2]
    [0.1931, 0.1308]
    >>> [round(float(v), 4) for v in quantile]   # [2/3, 1/4 · 1/4 + 3/4 · 3/4]
    [0.6667, 0.625]
  """
  arguments.check_rank(ref_rewards, "ref_rewards", (2,), "[batch, k]")
  k = ref_rewards.shape[1]
  own, others = ref_rewards[:, :, None], ref_rewards[:, None, :]
  below = jnp.sum(others < own, axis=-1).astype(jnp.float32)  # [batch, k]
  copies = jnp.sum(others == own, axis=-1).astype(jnp.float32)  # With itself: c >= 1.
  n = jnp.asarray(n, jnp.float32)
  expand = (lambda x: x) if n.ndim == 0 else (lambda x: x[..., None])
  p_lt, p_le, copies = expand(below / k), expand((below + copies) / k), expand(copies)
  # An atom's terms are shared among its c copies, so that every sample contributes 1/c of them.
  bon_mass = p_le ** n - p_lt ** n
  atom_kl = bon_mass * (jnp.log(jnp.maximum(bon_mass, 1e-30)) - jnp.log(copies / k)) / copies
  stretch_kl = _integrated_log_bon_density(p_le, n) - _integrated_log_bon_density(p_lt, n)
  atom_quantile = bon_mass * (p_lt + p_le) / 2 / copies
  stretch_quantile = n / (n + 1) * (p_le ** (n + 1) - p_lt ** (n + 1))
  tied = copies > 1
  kl = jnp.sum(jnp.where(tied, atom_kl, stretch_kl), axis=1)
  quantile = jnp.sum(jnp.where(tied, atom_quantile, stretch_quantile), axis=1)
  return kl, quantile


def best_of_n(rewards: chex.Array, mask: chex.Array | None = None) -> chex.Array:
  """Index of the best sample along the last axis; ties go to the lowest index; masked samples never win.

  Args:
    rewards: `[..., samples]` rewards (e.g. `[batch, samples]`, or `[batch, groups, n]` for the Best-of-n
      of each of several disjoint groups); NaN is treated as masked.
    mask: optional boolean of the shape of `rewards`; False marks padding.

  Returns:
    `[...]` int32 indices into the samples axis; `0` where no sample is valid.

  Raises:
    ValueError: a scalar `rewards` or a `mask` of another shape.

  Example:
    >>> best_of_n(jnp.array([[1., 3., 3.], [2., 0., 1.]]))
    Array([1, 0], dtype=int32)
    >>> best_of_n(jnp.array([1., 3., 2., 0.]).reshape(2, 2))  # Best-of-2 of two groups
    Array([1, 0], dtype=int32)
  """
  rewards = jnp.asarray(rewards)
  if rewards.ndim == 0:
    raise ValueError("`rewards` must have shape [..., samples], got a scalar.")
  mask = _validity(mask, rewards, "mask", f"the shape of `rewards` {rewards.shape}")
  mask = mask & ~jnp.isnan(rewards)
  best = jnp.max(jnp.where(mask, rewards, -jnp.inf), axis=-1, keepdims=True)
  # argmax of a boolean array returns its first True, i.e. the lowest winning index; comparing
  # against the best valid reward keeps masked samples out even when every reward is -inf.
  return jnp.argmax(mask & (rewards == best), axis=-1).astype(jnp.int32)


def take_samples(samples: chex.ArrayTree, index: chex.Array) -> chex.ArrayTree:
  """Picks samples by index from every leaf of a pytree: `leaf[..., index[...], ...]` on the samples axis.

  The samples axis of each leaf is axis `index.ndim`: leaves are `[*index.shape, samples, ...]` (e.g.
  tokens `[batch, samples, time]` with `index` `[batch]`). Use it with `best_of_n` to gather the winners.

  Args:
    samples: pytree of arrays `[*index.shape, samples, ...]`.
    index: int array of sample indices, e.g. `best_of_n(rewards)`.

  Returns:
    The pytree with the samples axis taken away: leaves `[*index.shape, ...]`.

  Raises:
    ValueError: a leaf whose leading axes are not `index.shape`.

  Example:
    >>> rewards = jnp.array([[1., 3., 2.], [0., 0., 5.]])
    >>> tokens = jnp.arange(12).reshape(2, 3, 2)  # [batch, samples, time]
    >>> take_samples({"tokens": tokens, "rewards": rewards}, best_of_n(rewards))["tokens"]
    Array([[ 2,  3],
           [10, 11]], dtype=int32)
  """
  index = jnp.asarray(index)
  axis = index.ndim

  def take(leaf):
    if leaf.ndim <= axis or leaf.shape[:axis] != index.shape:
      raise ValueError(f"every leaf of `samples` must have shape {index.shape} + (samples, ...) for `index` of "
                       f"shape {index.shape}, got {leaf.shape}.")
    picked = jnp.take_along_axis(leaf, index.reshape(index.shape + (1,) * (leaf.ndim - axis)), axis=axis)
    return jnp.squeeze(picked, axis)

  return jax.tree.map(take, samples)
