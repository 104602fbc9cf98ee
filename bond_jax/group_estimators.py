"""BOND and J-BOND advantages for GRPO-style trainers: G samples per prompt, ranked within their group.

A GRPO-family trainer (Tunix, TRL, verl, ...) samples a group of G generations of each prompt from its rollout
policy `π_old`, scores them, and turns the flat rewards into one advantage per sample, which its policy loss
multiplies into `∇ log π_θ(y)`. Here each sample is ranked against the *other* samples of its group
(`quantiles.group_quantiles`), which are draws from `π_old` itself. So the anchor of BOND is the rollout policy:
the advantages are those of the Jeffreys objective towards Best-of-n of the current policy,

    J(θ) = (1-β) · KL(BoN_n(π_old) || π_θ) + β · KL(π_θ || BoN_n(π_old)),

evaluated at `θ = θ_old` (each update moves the policy towards Best-of-n of itself: iterative BOND whose
anchor follows the policy at every step; docs/method.md, 'Iterative BOND and the moving anchor'). At
`θ = θ_old`, `∇ KL(π_θ || π_old) = 0`, so

    -∇J = E_{y~π_old}[∇ log π_θ(y) · ((1-β) · w(y) + β · log w(y))],
    w = π_BoN / π_old = (p_le^n - p_lt^n) / (p_le - p_lt),

and the advantage of a sample is `(1-β) · ŵ + β · R` minus a baseline:
- `ŵ`: the exactly unbiased estimate of `w` from the other G-1 samples (`bon_density_ratio_estimate`);
- `R`: the backward reward from the leave-one-out quantiles: BOND's `bond_log_ratio` (a plug-in estimate of
  `log w`, exact in the limit of large groups), or J-BOND's (n = 2) paper penalty, averaged over every pair of
  other samples as the two anchor samples (exactly unbiased for `-penalty · (1 - p_le)^2`, the expectation of
  the paper's reward), or its tie-aware reward `log(p̂_lt + p̂_le)`;
- the baseline of sample i: the mean of the same quantity over the other samples j of its group, each
  ranked without sample i, so that it does not depend on sample i and the gradient stays exactly unbiased.

So `E[mean_i A_i ∇ log π(y_i)]` equals `-∇J` exactly for the forward part and for the expected reward `E[R | y]`
(tested against enumeration). Advantages are not normalised (no division by the group's standard deviation,
which would bias the gradient); a policy loss that sums token log-probabilities per sequence
(`loss_agg_mode="seq-mean-token-sum"` in Tunix's GRPO loss, or `losses.score_function_loss` with
`costs=-advantages`) then follows `-∇J` exactly at the first update of each batch.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp

from bond_jax import arguments
from bond_jax import losses
from bond_jax import quantiles


def _value_of_counts(count_lt, count_le, others, beta, floor, penalty, *, form: str, n: int, ties_lose: bool):
  """`β · R + (1-β) · ŵ` of a sample with `count_lt` / `count_le` of its `others` other samples below / not above it.

  `form`: `"tie_aware"` or `"log_quantile"` (BOND's `bond_log_ratio` of the quantiles) or `"penalty"` (the paper's
  J-BOND penalty averaged over every pair of others; n = 2).
  """
  if form == "penalty":
    beaten_by = others - (count_lt if ties_lose else count_le)
    backward = -penalty * beaten_by * (beaten_by - 1) / (others * jnp.maximum(others - 1, 1))
  else:
    backward = losses.bond_log_ratio(count_lt / others, count_le / others, n, floor=floor, reward_form=form)
  return beta * backward + (1 - beta) * quantiles.bon_density_ratio_estimate(count_lt, count_le, others, n)


@functools.partial(jax.jit, static_argnames=("group_size", "baseline", "min_others", "form", "n", "ties_lose"))
def _group_advantages(rewards, mask, beta, floor, penalty, *, group_size, baseline: bool, min_others: int,
                      form: str, n: int, ties_lose: bool):
  """Per-sample `_value_of_counts` minus its leave-one-out baseline, zero where unusable.

  `min_others` is the number of other valid samples a value needs; samples with fewer get advantage 0.
  """
  value_of_counts = functools.partial(_value_of_counts, beta=beta, floor=floor, penalty=penalty, form=form, n=n,
                                      ties_lose=ties_lose)
  grouped = quantiles.to_groups(rewards, group_size)
  group = grouped.shape[1]
  if group - 1 < min_others:
    raise ValueError(f"groups of {group} samples are too small: this estimator needs >= {min_others + 1} samples "
                     f"per prompt.")
  if baseline and group - 2 < min_others:
    raise ValueError(f"groups of {group} samples are too small for the leave-one-out baseline, which ranks each "
                     f"other sample without the sample itself: it needs >= {min_others + 2} samples per prompt; "
                     f"draw more or pass `baseline=False`.")
  if mask is None:
    valid = jnp.ones(grouped.shape, bool)
  else:
    valid = quantiles.to_groups(mask, group_size, "mask").astype(bool)
    arguments.check_shape(valid, "mask", grouped.shape, "the shape of `rewards`")
  less, tied = quantiles.pairwise_comparisons(grouped, valid)
  count_lt = jnp.sum(less, axis=-1)
  count_le = count_lt + jnp.sum(tied, axis=-1)
  others = jnp.sum(valid, axis=-1, keepdims=True) - valid  # [prompts, group]
  usable = valid & (others >= min_others)
  value = jnp.where(usable, value_of_counts(count_lt, count_le, jnp.maximum(others, 1)), 0.0)
  if baseline:
    # Entry [p, i, j]: sample j of prompt p ranked against its group without sample i.
    lt_without = count_lt[:, None, :] - jnp.swapaxes(less, 1, 2)
    le_without = count_le[:, None, :] - jnp.swapaxes(less | tied, 1, 2)
    others_without = (others - valid)[:, None, :]
    counted = (valid[:, :, None] & usable[:, None, :] & (others_without >= min_others)
               & ~jnp.eye(group, dtype=bool))
    values_without = value_of_counts(lt_without, le_without, jnp.maximum(others_without, 1))
    total = jnp.sum(jnp.where(counted, values_without, 0.0), axis=-1)
    value = jnp.where(usable, value - total / jnp.maximum(jnp.sum(counted, axis=-1), 1), 0.0)
  return value.reshape(jnp.shape(rewards))


def bond_group_advantages(
    rewards: chex.Array,
    group_size: int | None = None,
    *,
    n: int = 2,
    beta=0.5,
    reward_form: str = "tie_aware",
    floor=None,
    mask: chex.Array | None = None,
    baseline: bool = True,
) -> chex.Array:
  """BOND advantages of each sample in its group: Jeffreys towards Best-of-n of the rollout policy.

  See the module docstring for the objective and the estimator. With `beta=1` this is the backward-KL BOND
  reward `bond_log_ratio` of the leave-one-out quantiles; with `beta=0` the unbiased Best-of-n importance
  weight, i.e. fine-tuning on Best-of-n samples without drawing them apart.

  Args:
    rewards: `[prompts * group]` with `group_size` (each prompt's samples consecutive), or `[prompts, group]`.
    group_size: samples per prompt G for flat `rewards`. Needs `G >= n + 1` (`G >= n` without baseline; with
      `beta=1`, `G >= 3`, or 2 without baseline).
    n: the n of Best-of-n, a Python integer >= 1 (2 is the paper's iterative BOND and J-BOND).
    beta: weight of the backward KL in `[0, 1]` (or a traced scalar); 0.5 is the paper's.
    reward_form: `"tie_aware"` (exact Theorem 1 ratio, use it) or `"log_quantile"` (the paper's).
    floor: clip for the leave-one-out `p_le` (or a traced scalar); None: half a sample, `1 / (2 (G-1))`.
    mask: optional boolean validity, the shape of `rewards`; invalid samples get advantage 0 and are never
      compared.
    baseline: subtract the leave-one-out baseline described in the module docstring.

  Returns:
    float32 advantages, the shape of `rewards` (larger is better: a policy loss maximises `A · log π`).

  Raises:
    ValueError: groups too small for `n` or for the baseline, bad hyperparameters or shapes.

  Example:
    >>> rewards = jnp.array([0., 1., 1., 2., 5., 3., 4., 4.])  # 2 prompts x 4 samples
    >>> advantages = bond_group_advantages(rewards, group_size=4, n=2)
    >>> advantages.shape, bool(advantages[3] > advantages[0])  # the best sample of a group gains most
    ((8,), True)
  """
  n = arguments.check_n(n)
  arguments.check_real(beta, "beta", 0.0, 1.0)
  arguments.check_choice(reward_form, "reward_form", losses.REWARD_FORMS)
  group = quantiles.to_groups(rewards, group_size).shape[1]
  if floor is None:
    floor = losses.quantile_floor(max(group - 1, 1))
  arguments.check_real(floor, "floor", 0.0, 1.0)
  # Pure backward (beta = 1) needs one other sample; the Best-of-n weight needs n - 1.
  min_others = 1 if (arguments.is_python_number(beta) and beta == 1) else max(n - 1, 1)
  return _group_advantages(rewards, mask, beta, floor, 0.0, group_size=group_size, baseline=baseline,
                           min_others=min_others, form=reward_form, n=n, ties_lose=False)


def jbond_group_advantages(
    rewards: chex.Array,
    group_size: int | None = None,
    *,
    beta=0.5,
    reward_form: str = "penalty",
    penalty=math.log(16),
    ties_lose: bool = False,
    floor=None,
    mask: chex.Array | None = None,
    baseline: bool = True,
) -> chex.Array:
  """J-BOND advantages of each sample in its group, the other samples of the group serving as anchor samples.

  J-BOND (docs/method.md, 'J-BOND') with the anchor at the rollout policy: the forward term's Best-of-2 NLL
  becomes the unbiased Best-of-2 weight `p̂_lt + p̂_le`, and the backward reward is the paper's (`"penalty"`:
  `-penalty` times the fraction of pairs of other samples that both beat the sample, strictly or with
  `ties_lose` also on ties) or the tie-aware `log(p̂_lt + p̂_le)` (`"tie_aware"`, equal to
  `bond_group_advantages(n=2)`). J-BOND's `γ · KL(π || π_anchor)` has zero gradient at the rollout policy; with
  an EMA anchor it belongs in the policy loss (see `bond_jax.integrations.tunix`).

  Args:
    rewards: `[prompts * group]` with `group_size`, or `[prompts, group]`.
    group_size: samples per prompt G for flat `rewards`. Needs `G >= 4` for `"penalty"` (3 without baseline),
      `G >= 3` for `"tie_aware"`.
    beta: weight of the backward term in `[0, 1]` (or a traced scalar); 0.5 is the paper's.
    reward_form: `"penalty"` (the paper's) or `"tie_aware"` (`losses.JBOND_REWARD_FORMS`).
    penalty: `"penalty"` only: the penalty >= 0 (or a traced scalar), `log 16` in the paper.
    ties_lose: `"penalty"` only: whether ties count as losses (the paper's appendix).
    floor: `"tie_aware"` only: clip for `p̂_le`; None: `1 / (2 (G-1))`.
    mask: optional boolean validity, the shape of `rewards`.
    baseline: subtract the leave-one-out baseline (see the module docstring).

  Returns:
    float32 advantages, the shape of `rewards`.

  Raises:
    ValueError: groups too small, bad hyperparameters or shapes.

  Example:
    >>> rewards = jnp.array([[0., 1., 2., 3.]])
    >>> jbond_group_advantages(rewards, beta=1.0, baseline=False) / jnp.log(16.)  # -C(beaten by, 2) / C(3, 2)
    Array([[-1.        , -0.33333334,  0.        ,  0.        ]], dtype=float32)
  """
  arguments.check_real(beta, "beta", 0.0, 1.0)
  arguments.check_choice(reward_form, "reward_form", losses.JBOND_REWARD_FORMS)
  if reward_form == "tie_aware":
    return bond_group_advantages(rewards, group_size, n=2, beta=beta, floor=floor, mask=mask, baseline=baseline)
  arguments.check_real(penalty, "penalty", 0.0)
  return _group_advantages(rewards, mask, beta, 0.0, penalty, group_size=group_size, baseline=baseline,
                           min_others=2, form="penalty", n=2, ties_lose=ties_lose)
