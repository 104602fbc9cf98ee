"""BOND, J-BOND and REINFORCE losses as pure functions (docs/method.md; Sessa et al., arXiv 2407.14622).

Every loss takes log-probabilities of sampled sequences, either per sequence `[batch, samples]` (row b: the
samples of prompt b) or per token `[batch, samples, time]` together with a boolean `token_mask`
`[batch, samples, time]` (False on prompt and padding positions), which the loss sums over time itself. The
gradient flows only through the policy's own log-probabilities. Each returns `(loss, metrics)`: a scalar to
minimise and a dict of scalar diagnostics. Hyperparameters (`beta`, `gamma`, `floor`, `penalty`, `kl_coef`) may
be Python numbers, which are validated, or traced scalars inside a jitted step, which are not; `n` and the
string options are static. A `mask` `[batch, samples]` marks the samples that exist; masked ones never count.

Score-function (policy-gradient) losses are written so that the loss *value* is the mean cost
(e.g. the k1 estimate of `KL(π || π_BoN)`) while the *gradient* is the variance-reduced
REINFORCE estimate `mean((cost - baseline) · ∇ log π(y))`. Baselines are leave-one-out, so the
gradient is an exactly unbiased estimate of the gradient of the expected cost.
"""

import math
import warnings

import chex
import jax
import jax.numpy as jnp

from bond_jax import arguments
from bond_jax import kl
from bond_jax import quantiles

REWARD_FORMS = ("tie_aware", "log_quantile")  # BOND's backward-KL reward (`bond_log_ratio`).
JBOND_REWARD_FORMS = ("penalty", "tie_aware")  # J-BOND's reward (`jbond_loss`).
BASELINES = ("samples", "batch", "none")

Metrics = dict[str, chex.Array]

_SEQUENCE = "[batch, samples]"
_BON_TOKENS = "[batch, time] or [batch, samples, time]"


class BaselineWarning(UserWarning):
  """A leave-one-out baseline was asked for where no other sample exists to form it."""


def _valid(mask: chex.Array | None, shape: tuple[int, ...], name: str = "mask") -> chex.Array:
  if mask is None:
    return jnp.ones(shape, dtype=bool)
  arguments.check_shape(mask, name, shape, _SEQUENCE)
  return jnp.asarray(mask).astype(bool)


def _masked_mean(values: chex.Array, mask: chex.Array) -> chex.Array:
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1)


def _sequence_shape(token_mask: chex.Array | None, first: chex.Array, name: str) -> tuple[int, ...]:
  """The per-sequence shape `[batch, samples]`: `token_mask`'s without time, else that of `first`."""
  if token_mask is not None:
    arguments.check_rank(token_mask, "token_mask", (3,), "[batch, samples, time]")
    return tuple(token_mask.shape[:-1])
  arguments.check_rank(first, name, (2,), f"{_SEQUENCE} (per-token log-probs [..., time] need `token_mask`)")
  return tuple(jnp.shape(first))


def _per_sequence(log_probs: chex.Array, name: str, shape: tuple[int, ...], token_mask: chex.Array | None,
                  layout: str = _SEQUENCE) -> chex.Array:
  """`log_probs` per sequence: as given if of `shape`, summed over the valid tokens if per token."""
  log_probs = jnp.asarray(log_probs)
  if log_probs.shape == tuple(shape):
    return log_probs.astype(jnp.float32)
  if token_mask is not None and log_probs.shape == token_mask.shape:
    return jnp.sum(jnp.where(token_mask, log_probs.astype(jnp.float32), 0.0), axis=-1)
  if token_mask is None:
    expected = f"{layout} = {tuple(shape)} (per-token log-probs [..., time] need `token_mask`)"
  else:
    expected = f"{layout} = {tuple(shape)} or per-token {tuple(token_mask.shape)} (the shape of `token_mask`)"
  raise ValueError(f"`{name}` must have shape {expected}, got {log_probs.shape}.")


def token_log_probs(logits: chex.Array, tokens: chex.Array) -> chex.Array:
  """Per-token log-likelihoods `log softmax(logits_t)[tokens_t]`, the per-token input every loss accepts.

  Args:
    logits: `[..., time, vocab]` next-token logits aligned with `tokens` (any float dtype).
    tokens: `[..., time]` integer token ids.

  Returns:
    `[..., time]` float32 log-probabilities.

  Raises:
    ValueError: `logits` whose leading axes are not `tokens`'s.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75]]]))  # [samples=1, time=2, vocab=2]
    >>> jnp.exp(token_log_probs(logits, jnp.array([[0, 1]])))
    Array([[0.5 , 0.75]], dtype=float32)
  """
  tokens = jnp.asarray(tokens)
  if jnp.ndim(logits) != tokens.ndim + 1 or tuple(jnp.shape(logits))[:-1] != tokens.shape:
    raise ValueError(f"`logits` must have shape `tokens.shape` + (vocab,) = {tokens.shape} + (vocab,), "
                     f"got {jnp.shape(logits)}.")
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def sequence_log_probs(
    logits: chex.Array, tokens: chex.Array, mask: chex.Array | None = None
) -> chex.Array:
  """Per-sequence log-likelihood `sum_t mask_t · log softmax(logits_t)[tokens_t]` (`token_log_probs` summed).

  Args:
    logits: `[..., time, vocab]` next-token logits aligned with `tokens`.
    tokens: `[..., time]` integer token ids.
    mask: optional `[..., time]` boolean; False marks prompt or padding positions.

  Returns:
    `[...]` float32 log-probabilities.

  Raises:
    ValueError: arguments of other shapes.

  Example:
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75]]]))
    >>> jnp.exp(sequence_log_probs(logits, jnp.array([[0, 1]]), jnp.array([[True, True]])))  # 0.5 · 0.75
    Array([0.375], dtype=float32)
  """
  per_token = token_log_probs(logits, tokens)
  if mask is None:
    return jnp.sum(per_token, axis=-1)
  arguments.check_shape(mask, "mask", per_token.shape, "the shape of `tokens`")
  return jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1)


def quantile_floor(num_refs: int) -> float:
  """`1 / (2k)`, the default floor on a k-sample quantile estimate (half a sample) [ours].

  Example:
    >>> quantile_floor(16)
    0.03125
  """
  num_refs = arguments.check_n(num_refs, "num_refs")
  return 1.0 / (2 * num_refs)


def bond_reward(p_le: chex.Array, floor) -> chex.Array:
  """The BOND reward `log max(p_le, floor)`.

  A Monte Carlo `p_le` is 0 when y loses to all k references; the explicit floor (use
  `quantile_floor(k)`, i.e. `1/(2k)`, by default; 0 only for exact quantiles) keeps
  the reward finite.

  Args:
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    floor: a number in `[0, 1]` (or a traced scalar).

  Returns:
    `[...]` float32 rewards in `[log floor, 0]`.

  Example:
    >>> bond_reward(jnp.array([0.0, 0.5]), floor=0.25)  # [log 0.25, log 0.5]
    Array([-1.3862944, -0.6931472], dtype=float32)
  """
  arguments.check_real(floor, "floor", 0.0, 1.0)
  return jnp.log(jnp.maximum(jnp.asarray(p_le, jnp.float32), floor))


def bond_log_ratio(
    p_lt: chex.Array, p_le: chex.Array, n: int, *, floor, reward_form: str = "tie_aware"
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
  `π_ref · p_le^(n-1)` (normalised), not `π_BoN`. `log_quantile` is there to reproduce the paper
  (docs/method.md, 'Ties and verifiable rewards').

  Args:
    p_lt: `[...]` quantiles `P[r(y') < r(y)]`.
    p_le: `[...]` quantiles `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.
    floor: lower clip for `p_le`, a number in `[0, 1]` (or a traced scalar).
    reward_form: `"tie_aware"` or `"log_quantile"` (`REWARD_FORMS`).

  Returns:
    `[...]` float32 log density ratios.

  Raises:
    ValueError: a bad `n`, `floor`, `reward_form` or shape.

  Example:
    >>> p_lt, p_le = jnp.array([0.0, 0.5]), jnp.array([0.5, 0.5])
    >>> bond_log_ratio(p_lt, p_le, 2, floor=0.0)  # exact: [log 0.5, log 1]
    Array([-0.6931472,  0.       ], dtype=float32)
    >>> bond_log_ratio(p_lt, p_le, 2, floor=0.0, reward_form="log_quantile")  # log 2 + log p_le
    Array([0., 0.], dtype=float32)
  """
  arguments.check_choice(reward_form, "reward_form", REWARD_FORMS)
  arguments.check_real(floor, "floor", 0.0, 1.0)
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
    over: `"samples"`, `"batch"` or `"none"` (`BASELINES`).

  Returns:
    `[batch, samples]` baselines.

  Raises:
    ValueError: a bad `over` or shape.

  Warns:
    BaselineWarning: `over="samples"` with one sample per prompt, where no baseline can be formed.

  Example:
    >>> leave_one_out_baseline(jnp.array([[1., 2., 6.]]))
    Array([[4. , 3.5, 1.5]], dtype=float32)
  """
  arguments.check_choice(over, "over", BASELINES)
  arguments.check_rank(values, "values", (2,), _SEQUENCE)
  mask = _valid(mask, values.shape)
  if over == "none":
    return jnp.zeros_like(values)
  if over == "samples" and values.shape[1] == 1:
    warnings.warn("baseline over 'samples' with 1 sample per prompt: there is no other sample to form it, so the "
                  "gradient gets no variance reduction; draw >= 2 samples per prompt or use baseline='batch'.",
                  BaselineWarning, stacklevel=2)
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
    token_mask: chex.Array | None = None,
) -> chex.Array:
  """Surrogate whose value is `mean(cost)` and whose gradient estimates `∇ E_{y~π}[cost(y)]`.

  Gradient: `mean((cost - b) · ∇ log π(y))` with the leave-one-out baseline `b`
  (`leave_one_out_baseline(costs, mask, over=baseline)`). Costs are treated as constants; that
  is exact even when they contain `log π(y)` itself, whose score term has mean zero. To use
  advantages `A` computed elsewhere (e.g. `bond_group_advantages`), pass `costs=-A, baseline="none"`.

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)` of samples `y ~ π_θ`, differentiable, or per token
      `[batch, samples, time]` with `token_mask`.
    costs: `[batch, samples]` per-sample costs (gradient stopped).
    mask: optional `[batch, samples]` boolean validity.
    baseline: `"samples"` (other samples of the same prompt), `"batch"` or `"none"`.
    token_mask: `[batch, samples, time]` boolean, for per-token `policy_log_probs`.

  Returns:
    Scalar float32 surrogate loss.

  Raises:
    ValueError: a bad `baseline` or shape.

  Example:
    >>> log_pi = jnp.log(jnp.array([[0.5, 0.25]]))
    >>> loss, grad = jax.value_and_grad(score_function_loss)(log_pi, jnp.array([[1., 3.]]))
    >>> loss, grad  # mean cost 2; (cost - other's cost) / 2
    (Array(2., dtype=float32), Array([[-1.,  1.]], dtype=float32))
  """
  shape = _sequence_shape(token_mask, costs, "costs")
  arguments.check_shape(costs, "costs", shape, _SEQUENCE)
  log_probs = _per_sequence(policy_log_probs, "policy_log_probs", shape, token_mask)
  mask = _valid(mask, shape)
  costs = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(costs, jnp.float32), 0.0))
  log_probs = jnp.where(mask, log_probs, 0.0)
  advantages = costs - leave_one_out_baseline(costs, mask, over=baseline)
  surrogate = costs + advantages * (log_probs - jax.lax.stop_gradient(log_probs))
  return _masked_mean(surrogate, mask)


def backward_kl_loss(
    policy_log_probs: chex.Array,
    ref_log_probs: chex.Array,
    p_lt: chex.Array | None = None,
    p_le: chex.Array | None = None,
    n: int | None = None,
    *,
    floor=None,
    reward_form: str = "tie_aware",
    mask: chex.Array | None = None,
    baseline: str = "samples",
    token_mask: chex.Array | None = None,
    bon_log_ratio: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
  """Backward KL `KL(π || π_BoN)` by the score function (docs/method.md, 'The BOND objective').

  Cost of a sample: `log π(y) - log π_ref(y) - log(π_BoN(y) / π_ref(y))`, whose expectation under π is
  `KL(π || π_BoN)`. The log ratio is either computed from quantiles (`p_lt`, `p_le`, `n`, `floor`,
  `reward_form`; see `bond_log_ratio`; exact with `reward_form="tie_aware"` and exact quantiles) or passed
  precomputed as `bon_log_ratio`. The loss value is the k1 estimate; the gradient is unbiased, with the
  leave-one-out baseline over the samples of each prompt by default (needs >= 2 samples per prompt).

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable; or per token
      `[batch, samples, time]` with `token_mask`.
    ref_log_probs: `log π_ref(y)` (or the anchor's) of the same samples, per sequence or per token; no gradient.
    p_lt: `[batch, samples]` `P[r(y') < r(y)]` under π_ref (exact or `reward_quantiles`).
    p_le: `[batch, samples]` `P[r(y') <= r(y)]`.
    n: the N of Best-of-N, a Python integer >= 1.
    floor: clip for `p_le` (`quantile_floor(k)` for k-sample estimates, 0 for exact ones); required with
      quantiles; may be a traced scalar.
    reward_form: `"tie_aware"` (exact Theorem 1 ratio) or `"log_quantile"` (`log n + (n-1) log
      p_le`, the paper's choice).
    mask: optional `[batch, samples]` boolean validity.
    baseline: see `leave_one_out_baseline`.
    token_mask: `[batch, samples, time]` boolean, for per-token log-probs.
    bon_log_ratio: `[batch, samples]` precomputed `log(π_BoN(y) / π_ref(y))`, instead of the quantiles.

  Returns:
    `(loss, metrics)`; metrics: `kl_bon` (k1 of `KL(π || π_BoN)`), `kl_ref` (k1 of
    `KL(π || π_ref)`), `bond_reward` (mean log ratio).

  Raises:
    ValueError: both or neither of the quantiles and `bon_log_ratio`, a missing `floor`, bad options or shapes.

  Example:
    >>> from bond_jax.quantiles import reward_quantiles
    >>> rewards, ref_rewards = jnp.array([[1., 3.]]), jnp.array([[0., 2., 4., 1.]])
    >>> p_lt, p_le = reward_quantiles(rewards, ref_rewards)
    >>> log_pi, log_ref = jnp.log(jnp.array([[0.2, 0.3]])), jnp.log(jnp.array([[0.1, 0.1]]))
    >>> loss, metrics = backward_kl_loss(log_pi, log_ref, p_lt, p_le, 4, floor=quantile_floor(4))
    >>> # bond_reward: mean of log((1/2^4 - 1/4^4) / (1/2 - 1/4)) and log 4 + 3 log(3/4)
    >>> round(float(metrics["kl_ref"]), 4), round(float(metrics["bond_reward"]), 4)
    (0.8959, -0.4638)
    >>> # The same, per token (2 tokens each) and from a precomputed log ratio:
    >>> token_mask = jnp.ones((1, 2, 2), bool)
    >>> loss2, _ = backward_kl_loss(jnp.log(jnp.array([[[1., .2], [1., .3]]])), log_ref, token_mask=token_mask,
    ...                             bon_log_ratio=bond_log_ratio(p_lt, p_le, 4, floor=quantile_floor(4)))
    >>> bool(jnp.allclose(loss, loss2))
    True
  """
  shape = _sequence_shape(token_mask, policy_log_probs, "policy_log_probs")
  if bon_log_ratio is not None:
    if any(x is not None for x in (p_lt, p_le, n)):
      raise ValueError("pass either `bon_log_ratio` or the quantiles (`p_lt`, `p_le`, `n`), not both.")
    arguments.check_shape(bon_log_ratio, "bon_log_ratio", shape, _SEQUENCE)
    log_ratio = jnp.asarray(bon_log_ratio, jnp.float32)
  else:
    if any(x is None for x in (p_lt, p_le, n)):
      raise ValueError("pass the quantiles `p_lt`, `p_le` and `n`, or a precomputed `bon_log_ratio`.")
    if floor is None:
      raise ValueError("`floor` is required with quantiles: quantile_floor(k) for k-sample estimates, 0 for exact "
                       "ones.")
    arguments.check_shape(p_lt, "p_lt", shape, _SEQUENCE)
    arguments.check_shape(p_le, "p_le", shape, _SEQUENCE)
    log_ratio = bond_log_ratio(p_lt, p_le, n, floor=floor, reward_form=reward_form)
  policy_log_probs = _per_sequence(policy_log_probs, "policy_log_probs", shape, token_mask)
  ref_log_probs = jax.lax.stop_gradient(_per_sequence(ref_log_probs, "ref_log_probs", shape, token_mask))
  mask = _valid(mask, shape)
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
    bon_policy_log_probs: chex.Array, mask: chex.Array | None = None, *, token_mask: chex.Array | None = None
) -> tuple[chex.Array, Metrics]:
  """Forward KL `KL(π_BoN || π)` up to a constant: the NLL of Best-of-N samples (docs/method.md).

  Its gradient `-mean ∇ log π_θ(y)` over Best-of-N samples y is unbiased for `∇ KL(π_BoN || π_θ)`.

  Args:
    bon_policy_log_probs: `log π_θ(y)` of Best-of-N samples, differentiable: per sequence `[batch]` or
      `[batch, samples]`, or per token `[batch, time]` or `[batch, samples, time]` with `token_mask`.
    mask: optional boolean validity, per sequence.
    token_mask: boolean of the shape of per-token `bon_policy_log_probs`.

  Returns:
    `(loss, {"nll": loss})`.

  Raises:
    ValueError: arguments of other shapes.

  Example:
    >>> from bond_jax.quantiles import best_of_n, take_samples
    >>> rewards = jnp.array([[1., 3.], [2., 0.]])  # two Best-of-2 draws
    >>> log_pi = jnp.log(jnp.array([[0.4, 0.5], [0.25, 0.1]]))
    >>> best = best_of_n(rewards)
    >>> loss, _ = forward_kl_loss(take_samples(log_pi, best))
    >>> round(float(loss), 4)  # -(log 0.5 + log 0.25) / 2
    1.0397
  """
  if token_mask is not None:
    arguments.check_rank(token_mask, "token_mask", (2, 3), _BON_TOKENS)
    shape = tuple(token_mask.shape[:-1])
  else:
    arguments.check_rank(bon_policy_log_probs, "bon_policy_log_probs", (1, 2),
                         "[batch] or [batch, samples] (per-token log-probs [..., time] need `token_mask`)")
    shape = tuple(jnp.shape(bon_policy_log_probs))
  log_probs = _per_sequence(bon_policy_log_probs, "bon_policy_log_probs", shape, token_mask)
  mask = _valid(mask, shape)
  loss = -_masked_mean(log_probs, mask)
  return loss, {"nll": loss}


def jeffreys_loss(
    forward: tuple[chex.Array, Metrics], backward: tuple[chex.Array, Metrics], beta
) -> tuple[chex.Array, Metrics]:
  """Jeffreys divergence `(1-β)·KL(π_BoN || π) + β·KL(π || π_BoN)` from the two losses.

  Args:
    forward: `forward_kl_loss(...)` output.
    backward: `backward_kl_loss(...)` output.
    beta: weight of the backward term, in `[0, 1]` (or a traced scalar). 0.5 is the paper's choice.

  Returns:
    `(loss, metrics)` with the inputs' metrics prefixed `forward/` and `backward/`.

  Example:
    >>> forward = (jnp.float32(2.0), {"nll": jnp.float32(2.0)})
    >>> backward = (jnp.float32(-1.0), {"kl_bon": jnp.float32(-1.0)})
    >>> loss, metrics = jeffreys_loss(forward, backward, beta=0.25)
    >>> loss, sorted(metrics)
    (Array(1.25, dtype=float32), ['backward/kl_bon', 'forward/nll'])
  """
  arguments.check_real(beta, "beta", 0.0, 1.0)
  (forward_loss, forward_metrics), (backward_loss, backward_metrics) = forward, backward
  loss = (1 - beta) * forward_loss + beta * backward_loss
  metrics = {f"forward/{k}": v for k, v in forward_metrics.items()}
  metrics |= {f"backward/{k}": v for k, v in backward_metrics.items()}
  return loss, metrics


def _check_rewards(policy_rewards, anchor_rewards, anchor_mask):
  arguments.check_rank(policy_rewards, "policy_rewards", (2,), _SEQUENCE)
  arguments.check_rank(anchor_rewards, "anchor_rewards", (2,), "[batch, k]")
  arguments.check_shape(anchor_rewards, "anchor_rewards", (policy_rewards.shape[0], anchor_rewards.shape[1]),
                        "[batch, k] (batch of `policy_rewards`)")
  return _valid(anchor_mask, anchor_rewards.shape, "anchor_mask")


def jbond_reward(
    policy_rewards: chex.Array,
    anchor_rewards: chex.Array,
    penalty=math.log(16),
    ties_lose: bool = False,
    anchor_mask: chex.Array | None = None,
) -> chex.Array:
  """The paper's J-BOND reward: `-penalty` when y is worse than every anchor sample, else 0.

  A bounded stand-in for `log p_le` (docs/method.md, 'J-BOND'). Right when rewards rarely tie; with
  ties (e.g. verifiable right/wrong rewards) it misses most of the signal: use
  `jbond_tie_aware_reward` there.

  Args:
    policy_rewards: `[batch, samples]` rewards of `y ~ π_θ`.
    anchor_rewards: `[batch, k]` rewards of `y' ~ π_anchor` (k = 2 in the paper).
    penalty: a number >= 0 (or a traced scalar); `log 16` makes the expected reward at the median
      match `log 0.5`.
    ties_lose: False: only strictly worse is penalised (the paper's main text); True: worse
      or equal (its appendix).
    anchor_mask: optional `[batch, k]` boolean; masked anchor samples never count, and a row
      without a valid one is never penalised.

  Returns:
    `[batch, samples]` float32 rewards in `{-penalty, 0}`.

  Raises:
    ValueError: a negative `penalty` or arguments of other shapes.

  Example:
    >>> jbond_reward(jnp.array([[1.], [2.]]), jnp.array([[2., 3.], [2., 3.]]))  # [[-log 16], [0]]
    Array([[-2.7725887],
           [ 0.       ]], dtype=float32)
  """
  arguments.check_real(penalty, "penalty", 0.0)
  valid = _check_rewards(policy_rewards, anchor_rewards, anchor_mask)
  own, anchors = policy_rewards[:, :, None], anchor_rewards[:, None, :]
  beaten = (own <= anchors) if ties_lose else (own < anchors)
  loses = jnp.all(beaten | ~valid[:, None, :], axis=-1) & jnp.any(valid, axis=-1)[:, None]
  return jnp.where(loses, -jnp.asarray(penalty, jnp.float32), 0.0)


def jbond_tie_aware_reward(
    policy_rewards: chex.Array,
    anchor_rewards: chex.Array,
    anchor_mask: chex.Array | None = None,
    floor=None,
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
    `[batch, samples]` float32 rewards, at least `log floor`, at most `log 2`.

  Example:
    >>> reward = jbond_tie_aware_reward(jnp.array([[1.], [0.]]), jnp.array([[0., 1.], [1., 1.]]))
    >>> jnp.exp(reward)  # a win and a tie: 1.5; two losses, floored: 1/4
    Array([[1.5 ],
           [0.25]], dtype=float32)
  """
  _check_rewards(policy_rewards, anchor_rewards, anchor_mask)
  if floor is None:
    floor = quantile_floor(anchor_rewards.shape[1])
  p_lt, p_le = quantiles.reward_quantiles(policy_rewards, anchor_rewards, anchor_mask)
  return bond_log_ratio(p_lt, p_le, 2, floor=floor, reward_form="tie_aware")


def jbond_loss(
    policy_log_probs: chex.Array,
    anchor_log_probs: chex.Array,
    policy_rewards: chex.Array | None = None,
    anchor_rewards: chex.Array | None = None,
    bon_policy_log_probs: chex.Array | None = None,
    *,
    beta=0.5,
    gamma=0.0,
    penalty=math.log(16),
    ties_lose: bool = False,
    reward_form: str = "penalty",
    floor=None,
    reward: chex.Array | None = None,
    mask: chex.Array | None = None,
    anchor_mask: chex.Array | None = None,
    bon_mask: chex.Array | None = None,
    baseline: str = "batch",
    token_mask: chex.Array | None = None,
    bon_token_mask: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
  """J-BOND: `(1-β)·forward + β·backward + γ·KL(π || π_anchor)` (docs/method.md, 'J-BOND').

  - forward: NLL of the Best-of-k anchor sample (`best_of_n(anchor_rewards)`).
  - backward: score function with cost `-reward + log π(y) - log π_anchor(y)` (the negated
    J-BOND return), centred with a leave-one-out average over the batch by default (the paper draws
    one sample per prompt). The reward is the paper's `jbond_reward` (`reward_form="penalty"`, a
    bounded stand-in for `log p_le`), `jbond_tie_aware_reward` (`"tie_aware"`, the estimated exact
    Best-of-2 log ratio; use it whenever rewards tie, e.g. verifiable right/wrong rewards), or
    a `reward` computed elsewhere.
  - KL: score function with cost `log π(y) - log π_anchor(y)`, same baseline, so its gradient is
    unbiased for `∇ KL(π || π_anchor)`.

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable; or per token
      `[batch, samples, time]` with `token_mask`.
    anchor_log_probs: `log π_anchor(y)` of the same samples, per sequence or per token; no gradient.
    policy_rewards: `[batch, samples]` rewards of y (None with `reward`).
    anchor_rewards: `[batch, k]` rewards of `y'_1..y'_k ~ π_anchor` (None with `reward`).
    bon_policy_log_probs: `log π_θ(y'_best)` of the Best-of-k anchor samples, differentiable: `[batch]`,
      `[batch, m]`, or per token `[batch, time]` or `[batch, m, time]` with `bon_token_mask`. Required.
    beta: backward weight in `[0, 1]` (or a traced scalar).
    gamma: weight of the anchor KL, >= 0 (or a traced scalar).
    penalty: see `jbond_reward` (`"penalty"` only; may be traced).
    ties_lose: see `jbond_reward` (`"penalty"` only).
    reward_form: `"penalty"` (the paper's reward) or `"tie_aware"` (`JBOND_REWARD_FORMS`).
    floor: `"tie_aware"` only: see `jbond_tie_aware_reward` (None: half an anchor sample).
    reward: `[batch, samples]` precomputed J-BOND reward, instead of `policy_rewards` and `anchor_rewards`.
    mask: optional `[batch, samples]` validity of the policy samples.
    anchor_mask: optional `[batch, k]` validity of the anchor samples (for the reward).
    bon_mask: optional per-sequence validity for `bon_policy_log_probs`.
    baseline: `"batch"` (the paper's), `"samples"` (needs >= 2 policy samples per prompt) or `"none"`.
    token_mask: `[batch, samples, time]` boolean, for per-token policy and anchor log-probs.
    bon_token_mask: boolean of the shape of per-token `bon_policy_log_probs`.

  Returns:
    `(loss, metrics)`; metrics: `forward`, `backward`, `kl` (the three terms), `reward` (mean
    J-BOND reward), `kl_anchor_k3`.

  Raises:
    ValueError: bad hyperparameters or options, missing or doubled inputs, arguments of other shapes.

  Example:
    >>> from bond_jax.quantiles import best_of_n, take_samples
    >>> anchor_rewards = jnp.array([[2., 1.], [0., 3.]])  # two prompts, two anchor samples each
    >>> log_pi_on_anchor = jnp.log(jnp.array([[0.3, 0.1], [0.2, 0.4]]))
    >>> bon_lp = take_samples(log_pi_on_anchor, best_of_n(anchor_rewards))  # [batch]
    >>> log_pi, log_anchor = jnp.log(jnp.array([[0.2], [0.1]])), jnp.log(jnp.array([[0.25], [0.1]]))
    >>> loss, metrics = jbond_loss(log_pi, log_anchor, jnp.array([[0.], [1.]]), anchor_rewards, bon_lp)
    >>> round(float(metrics["reward"]), 4)  # the first sample loses to both anchor samples: -log 16 / 2
    -1.3863
  """
  arguments.check_real(beta, "beta", 0.0, 1.0)
  arguments.check_real(gamma, "gamma", 0.0)
  arguments.check_choice(reward_form, "reward_form", JBOND_REWARD_FORMS)
  if bon_policy_log_probs is None:
    raise ValueError("`bon_policy_log_probs` (log π_θ of the Best-of-k anchor samples) is required.")
  shape = _sequence_shape(token_mask, policy_log_probs, "policy_log_probs")
  if reward is not None:
    if policy_rewards is not None or anchor_rewards is not None:
      raise ValueError("pass either `reward` or `policy_rewards` and `anchor_rewards`, not both.")
    arguments.check_shape(reward, "reward", shape, _SEQUENCE)
    reward = jnp.asarray(reward, jnp.float32)
  elif policy_rewards is None or anchor_rewards is None:
    raise ValueError("pass `policy_rewards` and `anchor_rewards`, or a precomputed `reward`.")
  else:
    arguments.check_shape(policy_rewards, "policy_rewards", shape, _SEQUENCE)
    if reward_form == "tie_aware":
      reward = jbond_tie_aware_reward(policy_rewards, anchor_rewards, anchor_mask, floor)
    else:
      reward = jbond_reward(policy_rewards, anchor_rewards, penalty, ties_lose, anchor_mask)
  policy_log_probs = _per_sequence(policy_log_probs, "policy_log_probs", shape, token_mask)
  anchor_log_probs = jax.lax.stop_gradient(_per_sequence(anchor_log_probs, "anchor_log_probs", shape, token_mask))
  mask = _valid(mask, shape)
  kl_anchor = kl.kl_k1(policy_log_probs, anchor_log_probs, mask)
  if bon_token_mask is not None:
    arguments.check_rank(bon_token_mask, "bon_token_mask", (2, 3), _BON_TOKENS)
  forward, _ = forward_kl_loss(bon_policy_log_probs, bon_mask, token_mask=bon_token_mask)
  backward = score_function_loss(policy_log_probs, kl_anchor - reward, mask, baseline=baseline)
  kl_term = score_function_loss(policy_log_probs, kl_anchor, mask, baseline=baseline)
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
    kl_coef,
    mask: chex.Array | None = None,
    baseline: str = "samples",
    token_mask: chex.Array | None = None,
) -> tuple[chex.Array, Metrics]:
  """REINFORCE on the raw reward with a KL penalty to π_ref (the paper's baseline).

  Minimises `E_π[-r(y)] + kl_coef · KL(π || π_ref)` by the score function with cost
  `kl_coef · (log π(y) - log π_ref(y)) - r(y)` and the leave-one-out baseline over the samples
  of each prompt (the paper: 2 samples per prompt).

  Args:
    policy_log_probs: `[batch, samples]` `log π_θ(y)`, `y ~ π_θ`, differentiable; or per token
      `[batch, samples, time]` with `token_mask`.
    ref_log_probs: `log π_ref(y)` of the same samples, per sequence or per token; no gradient.
    rewards: `[batch, samples]` rewards.
    kl_coef: KL coefficient >= 0 (or a traced scalar; the paper sweeps 0.001 to 1).
    mask: optional `[batch, samples]` validity.
    baseline: see `leave_one_out_baseline`.
    token_mask: `[batch, samples, time]` boolean, for per-token log-probs.

  Returns:
    `(loss, metrics)`; metrics: `reward` (mean), `kl_ref` (k1 of `KL(π || π_ref)`).

  Raises:
    ValueError: a negative `kl_coef`, a bad `baseline` or arguments of other shapes.

  Example:
    >>> log_pi, log_ref = jnp.log(jnp.array([[0.5, 0.2]])), jnp.log(jnp.array([[0.5, 0.4]]))
    >>> loss, metrics = reinforce_loss(log_pi, log_ref, jnp.array([[1., 0.]]), kl_coef=0.1)
    >>> round(float(metrics["kl_ref"]), 4), metrics["reward"]  # (0 + log 0.5) / 2, (1 + 0) / 2
    (-0.3466, Array(0.5, dtype=float32))
  """
  arguments.check_real(kl_coef, "kl_coef", 0.0)
  shape = _sequence_shape(token_mask, policy_log_probs, "policy_log_probs")
  arguments.check_shape(rewards, "rewards", shape, _SEQUENCE)
  policy_log_probs = _per_sequence(policy_log_probs, "policy_log_probs", shape, token_mask)
  ref_log_probs = jax.lax.stop_gradient(_per_sequence(ref_log_probs, "ref_log_probs", shape, token_mask))
  mask = _valid(mask, shape)
  kl_ref = kl.kl_k1(policy_log_probs, ref_log_probs, mask)
  rewards = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
  loss = score_function_loss(policy_log_probs, kl_coef * kl_ref - rewards, mask, baseline=baseline)
  return loss, {"reward": _masked_mean(rewards, mask), "kl_ref": _masked_mean(kl_ref, mask)}
