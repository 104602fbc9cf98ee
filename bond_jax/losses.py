"""BOND, J-BOND and REINFORCE losses (spec sections 3 and 5) as pure functions.

Every loss takes per-sequence log-probabilities `[batch, samples]` (row b: samples of prompt b),
with gradient only through the policy's own log-probabilities, and returns `(loss, metrics)`:
a scalar to minimise and a dict of scalar diagnostics.

Score-function (policy-gradient) losses are written so that the loss *value* is the mean cost
(e.g. the k1 estimate of `KL(π || π_BoN)`) while the *gradient* is the variance-reduced
REINFORCE estimate `mean((cost - baseline) · ∇ log π(y))`. Baselines are leave-one-out, so the
gradient is an exactly unbiased estimate of the gradient of the expected cost.
"""

import math
import numbers

import chex
import jax
import jax.numpy as jnp

from bond_jax import kl
from bond_jax import quantiles

REWARD_FORMS = ("tie_aware", "log_quantile")  # BOND's backward-KL reward (`bond_log_ratio`).
JBOND_REWARD_FORMS = ("penalty", "tie_aware")  # J-BOND's reward (`jbond_reward`, `jbond_tie_aware_reward`).
BASELINES = ("samples", "batch", "none")

Metrics = dict[str, chex.Array]


def _check_real(value, name: str, low: float, high: float = math.inf):
  """Raises a `ValueError` unless `value` is a Python number in `[low, high]`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"`{name}` must be a real number, got {value!r}.")
  if not low <= value <= high:
    interval = f"[{low}, {high}]" if high < math.inf else f"[{low}, inf)"
    raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def _check_choice(value, name: str, choices: tuple[str, ...]):
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _valid(mask: chex.Array | None, like: chex.Array) -> chex.Array:
  if mask is None:
    return jnp.ones(like.shape, dtype=bool)
  chex.assert_equal_shape([mask, like])
  return mask.astype(bool)


def _masked_mean(values: chex.Array, mask: chex.Array) -> chex.Array:
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1)


def sequence_log_probs(
    logits: chex.Array, tokens: chex.Array, mask: chex.Array | None = None
) -> chex.Array:
  """Per-sequence log-likelihood `sum_t mask_t · log softmax(logits_t)[tokens_t]`.

  Args:
    logits: `[..., time, vocab]` next-token logits aligned with `tokens`.
    tokens: `[..., time]` integer token ids.
    mask: optional `[..., time]` boolean; False marks prompt or padding positions.

  Returns:
    `[...]` float32 log-probabilities.

  Example:
    >>> sequence_log_probs(logits_BxSxTxV, tokens_BxSxT, mask_BxSxT)  # [batch, samples]
  """
  chex.assert_equal_shape_prefix([logits, tokens], tokens.ndim)
  chex.assert_rank(logits, tokens.ndim + 1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_log_probs = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(_valid(mask, tokens), token_log_probs, 0.0), axis=-1)


def quantile_floor(num_refs: int) -> float:
  """`1 / (2k)`, the default floor on a k-sample quantile estimate (half a sample) [ours].

  Example:
    >>> bond_reward(p_le, floor=quantile_floor(16))
  """
  num_refs = quantiles.check_n(num_refs, "num_refs")
  return 1.0 / (2 * num_refs)


def bond_reward(p_le: chex.Array, floor: float) -> chex.Array:
  """The BOND reward `log max(p_le, floor)`.

  A Monte Carlo `p_le` is 0 when y loses to all k references; the explicit floor (use
  `quantile_floor(k)`, i.e. `1/(2k)`, for the spec default; 0 only for exact quantiles) keeps
  the reward finite.

  Args:
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    floor: a Python number in `[0, 1]`.

  Returns:
    `[...]` rewards in `[log floor, 0]`.

  Example:
    >>> bond_reward(jnp.array([0.0, 0.5]), floor=0.25)  # [log 0.25, log 0.5]
  """
  _check_real(floor, "floor", 0.0, 1.0)
  return jnp.log(jnp.maximum(jnp.asarray(p_le, jnp.float32), floor))


def bond_log_ratio(
    p_lt: chex.Array, p_le: chex.Array, n: int, *, floor: float, reward_form: str = "tie_aware"
) -> chex.Array:
  """The BOND estimate of `log(π_BoN(y) / π_ref(y))`, the reward of the backward KL.

  `reward_form="tie_aware"` is the exact Theorem 1 ratio `bon_log_density_ratio`,
  `log((p_le^n - p_lt^n) / (p_le - p_lt))`; `"log_quantile"` is the paper's
  `log n + (n-1) log p_le` (drops the tie term). Both clip `p_le` to `floor` first (see
  `bond_reward`).

  Which to use: `tie_aware`, always. Where no reward ties with y's (continuous reward models on
  long generations; any Monte Carlo estimate in which no reference reward equals y's), the two
  are the same number. Where ties carry mass (verifiable right/wrong rewards, few-level rubrics,
  short outputs) `log_quantile` is biased: for a binary reward with pass rate p it omits
  `log((1 - (1-p)^n) / p)` from every correct answer's reward, so the backward KL's minimiser is
  `π_ref · p_le^(n-1)` (normalised), not `π_BoN`. `log_quantile` is there to reproduce the paper.

  Args:
    p_lt: `[...]` quantiles `P[r(y') < r(y)]`.
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.
    floor: lower clip for `p_le`, a Python number in `[0, 1]`.
    reward_form: `"tie_aware"` or `"log_quantile"`.

  Returns:
    `[...]` log density ratios.

  Example:
    >>> bond_log_ratio(p_lt, p_le, 8, floor=quantile_floor(16), reward_form="log_quantile")
  """
  _check_choice(reward_form, "reward_form", REWARD_FORMS)
  _check_real(floor, "floor", 0.0, 1.0)
  p_le = jnp.maximum(jnp.asarray(p_le, jnp.float32), floor)
  if reward_form == "log_quantile":
    return quantiles.bon_log_density_ratio_no_ties(p_le, n)
  return quantiles.bon_log_density_ratio(p_lt, p_le, n)


def leave_one_out_baseline(
    values: chex.Array, mask: chex.Array | None = None, *, over: str = "samples"
) -> chex.Array:
  """Mean of the *other* valid entries: of the same row (`"samples"`) or the whole batch (`"batch"`).

  Leaving the entry out makes the baseline independent of its own sample, so a score-function
  gradient stays exactly unbiased. Masked entries and entries with no other valid entry get
  baseline 0; `over="none"` gives 0 everywhere.

  Args:
    values: `[batch, samples]` per-sample costs or returns.
    mask: optional `[batch, samples]` boolean validity.
    over: `"samples"`, `"batch"` or `"none"`.

  Returns:
    `[batch, samples]` baselines.

  Example:
    >>> leave_one_out_baseline(jnp.array([[1., 2., 6.]]))  # [[4., 3.5, 1.5]]
  """
  _check_choice(over, "over", BASELINES)
  chex.assert_rank(values, 2)
  mask = _valid(mask, values)
  if over == "none":
    return jnp.zeros_like(values)
  axis = -1 if over == "samples" else None
  values = jnp.where(mask, values, 0.0)
  others_total = jnp.sum(values, axis=axis, keepdims=True) - values
  others_count = jnp.sum(mask, axis=axis, keepdims=True) - mask
  has_others = mask & (others_count > 0)
  return jnp.where(has_others, others_total / jnp.maximum(others_count, 1), 0.0)


def score_function_loss(
    policy_log_probs: chex.Array,
    costs: chex.Array,
    mask: chex.Array | None = None,
    *,
    baseline: str = "samples",
) -> chex.Array:
  """Surrogate whose value is `mean(cost)` and whose gradient estimates `∇ E_{y~π}[cost(y)]`.

  Gradient: `mean((cost - b) · ∇ log π(y))` with the leave-one-out baseline `b`
  (`leave_one_out_baseline(costs, mask, over=baseline)`). Costs are treated as constants; that
  is exact even when they contain `log π(y)` itself, whose score term has mean zero.

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)` of samples `y ~ π_θ`, differentiable.
    costs: `[batch, samples]` per-sample costs (gradient stopped).
    mask: optional `[batch, samples]` boolean validity.
    baseline: `"samples"` (other samples of the same prompt), `"batch"` or `"none"`.

  Returns:
    Scalar surrogate loss.

  Example:
    >>> score_function_loss(log_pi_BxS, log_pi_BxS - log_ref_BxS)  # ∇ KL(π || π_ref)
  """
  chex.assert_equal_shape([policy_log_probs, costs])
  mask = _valid(mask, costs)
  costs = jax.lax.stop_gradient(jnp.where(mask, costs, 0.0))
  log_probs = jnp.where(mask, policy_log_probs, 0.0)
  advantages = costs - leave_one_out_baseline(costs, mask, over=baseline)
  surrogate = costs + advantages * (log_probs - jax.lax.stop_gradient(log_probs))
  return _masked_mean(surrogate, mask)


def backward_kl_loss(
    policy_log_probs: chex.Array,
    ref_log_probs: chex.Array,
    p_lt: chex.Array,
    p_le: chex.Array,
    n: int,
    *,
    floor: float,
    reward_form: str = "tie_aware",
    mask: chex.Array | None = None,
    baseline: str = "samples",
) -> tuple[chex.Array, Metrics]:
  """Backward KL `KL(π || π_BoN)` by the score function (spec section 3).

  Cost of a sample: `log π(y) - log π_ref(y) - bond_log_ratio(y)`, whose expectation under π is
  `KL(π || π_BoN)` (exactly with `reward_form="tie_aware"` and exact quantiles). The loss value is
  its k1 estimate; the gradient is unbiased, with the leave-one-out baseline over the samples
  of each prompt by default (needs >= 2 samples per prompt to reduce variance).

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable.
    ref_log_probs: `[batch, samples]` `log π_ref(y)` (or the anchor's), no gradient.
    p_lt: `[batch, samples]` `P[r(y') < r(y)]` under π_ref (exact or `reward_quantiles`).
    p_le: `[batch, samples]` `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.
    floor: clip for `p_le` (`quantile_floor(k)` for k-sample estimates, 0 for exact ones).
    reward_form: `"tie_aware"` (exact Theorem 1 ratio) or `"log_quantile"` (`log n + (n-1) log
      p_le`, the paper's choice).
    mask: optional `[batch, samples]` boolean validity.
    baseline: see `leave_one_out_baseline`.

  Returns:
    `(loss, metrics)`; metrics: `kl_bon` (k1 of `KL(π || π_BoN)`), `kl_ref` (k1 of
    `KL(π || π_ref)`), `bond_reward` (mean log ratio).

  Example:
    >>> p_lt, p_le = reward_quantiles(rewards_BxS, ref_rewards_BxK)
    >>> loss, metrics = backward_kl_loss(log_pi_BxS, log_ref_BxS, p_lt, p_le, 8,
    ...                                  floor=quantile_floor(ref_rewards_BxK.shape[1]))
  """
  chex.assert_equal_shape([policy_log_probs, ref_log_probs, p_lt, p_le])
  mask = _valid(mask, policy_log_probs)
  log_ratio = bond_log_ratio(p_lt, p_le, n, floor=floor, reward_form=reward_form)
  kl_ref = kl.kl_k1(policy_log_probs, ref_log_probs, mask)
  costs = kl_ref - jnp.where(mask, log_ratio, 0.0)
  loss = score_function_loss(policy_log_probs, costs, mask, baseline=baseline)
  metrics = {
      "kl_bon": loss,
      "kl_ref": _masked_mean(kl_ref, mask),
      "bond_reward": _masked_mean(log_ratio, mask),
  }
  return loss, metrics


def forward_kl_loss(
    bon_policy_log_probs: chex.Array, mask: chex.Array | None = None
) -> tuple[chex.Array, Metrics]:
  """Forward KL `KL(π_BoN || π)` up to a constant: the NLL of Best-of-N samples (spec section 3).

  Its gradient `-mean ∇ log π_θ(y_BoN)` is unbiased for `∇ KL(π_BoN || π_θ)`.

  Args:
    bon_policy_log_probs: `[batch, ...]` `log π_θ(y)` of Best-of-N samples, differentiable.
    mask: optional boolean of the same shape.

  Returns:
    `(loss, {"nll": loss})`.

  Example:
    >>> best = best_of_n(ref_rewards_BxN)
    >>> loss, _ = forward_kl_loss(jnp.take_along_axis(log_pi_BxN, best[:, None], axis=1))
  """
  mask = _valid(mask, bon_policy_log_probs)
  loss = -_masked_mean(bon_policy_log_probs, mask)
  return loss, {"nll": loss}


def jeffreys_loss(
    forward: tuple[chex.Array, Metrics], backward: tuple[chex.Array, Metrics], beta
) -> tuple[chex.Array, Metrics]:
  """Jeffreys divergence `(1-β)·KL(π_BoN || π) + β·KL(π || π_BoN)` from the two losses.

  Args:
    forward: `forward_kl_loss(...)` output.
    backward: `backward_kl_loss(...)` output.
    beta: weight of the backward term, in `[0, 1]` (a Python number is validated; a traced
      scalar is not). 0.5 is the paper's choice.

  Returns:
    `(loss, metrics)` with the inputs' metrics prefixed `forward/` and `backward/`.

  Example:
    >>> loss, metrics = jeffreys_loss(forward_kl_loss(...), backward_kl_loss(...), beta=0.5)
  """
  if isinstance(beta, numbers.Real):
    _check_real(beta, "beta", 0.0, 1.0)
  (forward_loss, forward_metrics), (backward_loss, backward_metrics) = forward, backward
  loss = (1 - beta) * forward_loss + beta * backward_loss
  metrics = {f"forward/{k}": v for k, v in forward_metrics.items()}
  metrics |= {f"backward/{k}": v for k, v in backward_metrics.items()}
  return loss, metrics


def jbond_reward(
    policy_rewards: chex.Array,
    anchor_rewards: chex.Array,
    penalty: float = math.log(16),
    ties_lose: bool = False,
) -> chex.Array:
  """The J-BOND reward: `-penalty` when y is worse than every anchor sample, else 0 (section 5).

  The paper's reward, a bounded stand-in for `log p_le`. Right when rewards rarely tie; with
  ties (e.g. verifiable right/wrong rewards) it misses most of the signal: use
  `jbond_tie_aware_reward` there.

  Args:
    policy_rewards: `[batch, samples]` rewards of `y ~ π_θ`.
    anchor_rewards: `[batch, k]` rewards of `y' ~ π_anchor` (k = 2 in the paper).
    penalty: non-negative Python number; `log 16` makes the expected reward at the median
      match `log 0.5`.
    ties_lose: False: only strictly worse is penalised (the paper's main text); True: worse
      or equal (its appendix).

  Returns:
    `[batch, samples]` rewards in `{-penalty, 0}`.

  Example:
    >>> jbond_reward(jnp.array([[1.], [2.]]), jnp.array([[2., 3.], [2., 3.]]))  # [[-2.77], [0.]]
  """
  _check_real(penalty, "penalty", 0.0)
  chex.assert_rank([policy_rewards, anchor_rewards], 2)
  chex.assert_equal_shape_prefix([policy_rewards, anchor_rewards], 1)
  own, anchors = policy_rewards[:, :, None], anchor_rewards[:, None, :]
  loses = jnp.all(own <= anchors if ties_lose else own < anchors, axis=-1)
  return jnp.where(loses, -penalty, 0.0)


def jbond_tie_aware_reward(
    policy_rewards: chex.Array,
    anchor_rewards: chex.Array,
    anchor_mask: chex.Array | None = None,
    floor: float | None = None,
) -> chex.Array:
  """The tie-aware J-BOND reward: a k-sample estimate of `log(π_BoN2(y) / π_anchor(y))`.

  J-BOND's backward term is `KL(π || Best-of-2 of π_anchor)`; by Theorem 1 its exact reward is
  `log(p_le + p_lt)` (n = 2: `(p_le^2 - p_lt^2) / (p_le - p_lt) = p_le + p_lt`), the quantiles
  taken under the anchor. With `s_j = 1[r(y'_j) < r(y)] + 1[r(y'_j) <= r(y)]` (2 for a win, 1
  for a tie, 0 for a loss), `mean_j s_j` is an unbiased estimate of `p_le + p_lt`; the reward is
  its log, `bond_log_ratio(p̂_lt, p̂_le, 2, floor=floor, reward_form="tie_aware")`, so losing
  to every anchor sample gives `log floor` instead of `-inf`. With the paper's two anchor samples
  it takes the values `log 2` (two wins), `log 1.5`, `0` (two ties, or a win and a loss),
  `log 0.5`, `log floor` (two losses; `log 1/4` by default).

  When it is right: rewards with ties (verifiable right/wrong checks, few-level rubrics). For a
  binary reward at anchor pass rate p, the paper's reward (`jbond_reward`) separates a correct
  from a wrong answer by only `p^2 · penalty` in expectation, which vanishes on hard tasks, while
  the exact separation is `log((2-p) / (1-p))`; this estimate's expectation is within a few
  percent of it. Without ties both are biased two-sample estimates of `log(2 p_le)` (the
  paper's is calibrated at the median, this one is the plug-in estimate) and either works.

  Args:
    policy_rewards: `[batch, samples]` rewards of `y ~ π_θ`.
    anchor_rewards: `[batch, k]` rewards of `y'_1..y'_k ~ π_anchor`.
    anchor_mask: optional `[batch, k]` boolean; False marks anchor samples that never count.
    floor: lower clip for `p̂_le`; None: `quantile_floor(k)`, half an anchor sample.

  Returns:
    `[batch, samples]` rewards, at least `log floor`, at most `log 2`.

  Example:
    >>> jbond_tie_aware_reward(jnp.array([[1.], [0.]]), jnp.array([[0., 1.], [1., 1.]]))
    >>> # [[log 1.5], [log 0.25]]: a win and a tie; two losses, floored
  """
  chex.assert_rank([policy_rewards, anchor_rewards], 2)
  if floor is None:
    floor = quantile_floor(anchor_rewards.shape[1])
  p_lt, p_le = quantiles.reward_quantiles(policy_rewards, anchor_rewards, anchor_mask)
  return bond_log_ratio(p_lt, p_le, 2, floor=floor, reward_form="tie_aware")


def jbond_loss(
    policy_log_probs: chex.Array,
    anchor_log_probs: chex.Array,
    policy_rewards: chex.Array,
    anchor_rewards: chex.Array,
    bon_policy_log_probs: chex.Array,
    *,
    beta: float = 0.5,
    gamma: float = 0.0,
    penalty: float = math.log(16),
    ties_lose: bool = False,
    reward_form: str = "penalty",
    mask: chex.Array | None = None,
    bon_mask: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
  """J-BOND: `(1-β)·forward + β·backward + γ·KL(π || π_anchor)` (spec section 5).

  - forward: NLL of the Best-of-k anchor sample (`best_of_n(anchor_rewards)`).
  - backward: score function with cost `-reward + log π(y) - log π_anchor(y)` (the negated
    J-BOND return), centred with a leave-one-out *batch* average (one sample per prompt). The
    reward is the paper's `jbond_reward` (`reward_form="penalty"`, a bounded stand-in for
    `log p_le`) or `jbond_tie_aware_reward` (`"tie_aware"`, the estimated exact Best-of-2 log
    ratio; use it whenever rewards tie, e.g. verifiable right/wrong rewards).
  - KL: score function with cost `log π(y) - log π_anchor(y)`, same baseline, so its gradient is
    unbiased for `∇ KL(π || π_anchor)`.

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable.
    anchor_log_probs: `[batch, samples]` `log π_anchor(y)` of the same samples, no gradient.
    policy_rewards: `[batch, samples]` rewards of y.
    anchor_rewards: `[batch, k]` rewards of `y'_1..y'_k ~ π_anchor`.
    bon_policy_log_probs: `[batch, ...]` `log π_θ(y'_best)`, differentiable.
    beta: backward weight in `[0, 1]`.
    gamma: weight of the anchor KL, >= 0.
    penalty: see `jbond_reward` (`"penalty"` only).
    ties_lose: see `jbond_reward` (`"penalty"` only).
    reward_form: `"penalty"` (the paper's reward) or `"tie_aware"`.
    mask: optional `[batch, samples]` validity of the policy samples.
    bon_mask: optional validity for `bon_policy_log_probs`.

  Returns:
    `(loss, metrics)`; metrics: `forward`, `backward`, `kl` (the three terms), `reward` (mean
    J-BOND reward), `kl_anchor_k3`.

  Example:
    >>> best = best_of_n(anchor_rewards_Bx2)
    >>> bon_lp = jnp.take_along_axis(log_pi_on_anchor_Bx2, best[:, None], axis=1)
    >>> loss, metrics = jbond_loss(log_pi_Bx1, log_anchor_Bx1, r_Bx1, anchor_rewards_Bx2, bon_lp)
  """
  _check_real(beta, "beta", 0.0, 1.0)
  _check_real(gamma, "gamma", 0.0)
  _check_choice(reward_form, "reward_form", JBOND_REWARD_FORMS)
  chex.assert_equal_shape([policy_log_probs, anchor_log_probs, policy_rewards])
  mask = _valid(mask, policy_log_probs)
  if reward_form == "tie_aware":
    reward = jbond_tie_aware_reward(policy_rewards, anchor_rewards)
  else:
    reward = jbond_reward(policy_rewards, anchor_rewards, penalty, ties_lose)
  kl_anchor = kl.kl_k1(policy_log_probs, anchor_log_probs, mask)
  forward, _ = forward_kl_loss(bon_policy_log_probs, bon_mask)
  backward = score_function_loss(policy_log_probs, kl_anchor - reward, mask, baseline="batch")
  kl_term = score_function_loss(policy_log_probs, kl_anchor, mask, baseline="batch")
  loss = (1 - beta) * forward + beta * backward + gamma * kl_term
  metrics = {
      "forward": forward,
      "backward": backward,
      "kl": kl_term,
      "reward": _masked_mean(reward, mask),
      "kl_anchor_k3": _masked_mean(kl.kl_k3(policy_log_probs, anchor_log_probs, mask), mask),
  }
  return loss, metrics


def reinforce_loss(
    policy_log_probs: chex.Array,
    ref_log_probs: chex.Array,
    rewards: chex.Array,
    *,
    kl_coef: float,
    mask: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
  """REINFORCE on the raw reward with a KL penalty to π_ref (the paper's baseline, section 5).

  Minimises `E_π[-r(y)] + kl_coef · KL(π || π_ref)` by the score function with cost
  `kl_coef · (log π(y) - log π_ref(y)) - r(y)` and the leave-one-out baseline over the samples
  of each prompt (the paper: 2 samples per prompt).

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable.
    ref_log_probs: `[batch, samples]` `log π_ref(y)`, no gradient.
    rewards: `[batch, samples]` rewards.
    kl_coef: KL coefficient, a Python number >= 0 (the paper sweeps 0.001 to 1).
    mask: optional `[batch, samples]` validity.

  Returns:
    `(loss, metrics)`; metrics: `reward` (mean), `kl_ref` (k1 of `KL(π || π_ref)`).

  Example:
    >>> loss, metrics = reinforce_loss(log_pi_Bx2, log_ref_Bx2, rewards_Bx2, kl_coef=0.01)
  """
  _check_real(kl_coef, "kl_coef", 0.0)
  chex.assert_equal_shape([policy_log_probs, ref_log_probs, rewards])
  mask = _valid(mask, rewards)
  kl_ref = kl.kl_k1(policy_log_probs, ref_log_probs, mask)
  rewards = jnp.where(mask, rewards, 0.0)
  loss = score_function_loss(policy_log_probs, kl_coef * kl_ref - rewards, mask)
  return loss, {"reward": _masked_mean(rewards, mask), "kl_ref": _masked_mean(kl_ref, mask)}
