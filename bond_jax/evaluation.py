"""Evaluation on held-out prompts: the policy against the reference and against Best-of-N of the reference, with
standard errors and the Best-of-N frontier.

Per prompt, the reference draws a pool of k = `config.eval.num_ref_samples` samples and the policy
`config.eval.num_policy_samples`, all at the run's sampling temperature. The pool is the yardstick:
- a policy sample's quantile is its mid-rank `(p_lt + p_le) / 2` against the whole pool: a reference sample scores
  1/2 in expectation even when rewards tie, and Best-of-N `N/(N+1)` when they don't (`bon_expected_quantile`);
- Best-of-N: the pool's k // N disjoint groups of N samples each give one Best-of-N sample, mid-ranked against the
  k - N samples outside its group (never against its own candidates), its reward and quantile averaged over the
  groups;
- `KL(π || π_ref)` is that of the tempered distributions (docs/method.md, "Which distributions the estimates refer
  to"), estimated on the policy's samples by the sum of the exact KLs of the next-token distributions along each
  sample (`sampling.generation_kl`), unbiased and of far lower variance than the k1 estimate;
- `KL(π_BoN || π_ref)` and the frontier (Best-of-N's expected quantile against its KL, for N = 1 ... 8192 in
  `FRONTIER_NS`) are exact by Theorem 1 for the reward distribution the pool estimates, ties included
  (`quantiles.bon_kl_and_quantile`); without ties they are `log N - (N-1)/N` and `N/(N+1)`, which the report
  keeps as the bound `kl_bound`.

The step returns per-prompt values; `summarize` averages them over the evaluation's prompts and gives each mean
its standard error over prompts (prompts are the independent units: the noise of their samples, of their
reference pool and of the prompt itself are all in it). `frontier/gap` is the policy's quantile minus the
frontier's at the policy's KL (interpolated between the `FRONTIER_NS`), with a standard error to first order in
the noise of both.

Every evaluation also returns, per prompt, a reference sample, a policy sample and a Best-of-N sample for each N
(`Completions`), which the trainer writes to `completions.jsonl` (`completion_rows`).
"""

from collections.abc import Callable, Sequence
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond_jax import micro_batching
from bond_jax import quantiles
from bond_jax import sampling
from bond_jax import sharding
from bond_jax.models.config import ModelConfig
from bond_jax.rewards import RewardFn

Batch = dict[str, jax.Array]

# Best-of-N sizes of the frontier curve: about sqrt(2) apart, to KL(π_BoN || π_ref) = log 8192 - 1 = 8.0 nats.
FRONTIER_NS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192)
SE_SUFFIX = "/se"  # `summarize`: the standard error of metric `m` is `m/se`.


class Completions(NamedTuple):
  """One sample of each kind per prompt, for a person to read; samples axis: reference, policy, then Best-of-N for
  each N of `config.eval.bon_ns`.

  Attributes:
    tokens: `[batch, 2 + len(bon_ns), time]` int32 generated tokens.
    mask: `[batch, 2 + len(bon_ns), time]` bool, True on generated tokens.
    rewards: `[batch, 2 + len(bon_ns)]` their rewards.
    quantiles: `[batch, 2 + len(bon_ns)]` their mid-rank quantiles against the reference pool (the reference
      sample against the rest of the pool, a Best-of-N sample against the samples outside its group).
  """

  tokens: jax.Array
  mask: jax.Array
  rewards: jax.Array
  quantiles: jax.Array


class EvalOutput(NamedTuple):
  """What one evaluation step returns: `metrics` maps names to per-prompt values `[batch]` (the frontier's
  `[batch, len(FRONTIER_NS)]`), `completions` the samples to read."""

  metrics: dict[str, jax.Array]
  completions: Completions


def mid_quantile(rewards: jax.Array, ref_rewards: jax.Array, ref_mask: jax.Array | None = None) -> jax.Array:
  """`(p_lt + p_le) / 2` of each sample against the (unmasked) reference samples of its row, `[batch, samples]`."""
  p_lt, p_le = quantiles.reward_quantiles(rewards, ref_rewards, ref_mask)
  return (p_lt + p_le) / 2


def best_of_n_groups(pool_rewards: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Best-of-n of each of the k // n disjoint groups of a pool, mid-ranked against the samples outside its group.

  Args:
    pool_rewards: `[batch, k]` rewards of k reference samples per prompt, `n <= k // 2`.
    n: the N of Best-of-N.

  Returns:
    `(index, rewards, quantiles)`, each `[batch, k // n]`: the winner's index in the pool, its reward and its
    quantile.

  Example:
    >>> index, rewards, quantile = best_of_n_groups(jnp.array([[0., 3., 1., 2.]]), 2)
    >>> index.tolist(), rewards.tolist(), quantile.tolist()   # 3 beats both of {1, 2}; 2 beats one of {0, 3}
    ([[1, 3]], [[3.0, 2.0]], [[1.0, 0.5]])
  """
  batch, k = pool_rewards.shape
  groups = k // n
  grouped = pool_rewards[:, :groups * n].reshape(batch, groups, n)
  winner = quantiles.best_of_n(grouped)  # [batch, groups]
  index = jnp.arange(groups) * n + winner
  best = jnp.take_along_axis(pool_rewards, index, axis=1)
  outside = jnp.arange(k)[None, :] // n != jnp.arange(groups)[:, None]  # [groups, k]
  quantile = mid_quantile(best.reshape(batch * groups, 1), jnp.repeat(pool_rewards, groups, axis=0),
                          jnp.tile(outside, (batch, 1)))
  return index, best, quantile.reshape(batch, groups)


def make_eval_step(config: ml_collections.ConfigDict, model_config: ModelConfig, reward_fn: RewardFn,
                   ) -> Callable[[object, object, Batch, jax.Array], EvalOutput]:
  """Builds `eval_step(params, ref_params, batch, rng) -> EvalOutput` (pure; jit it).

  Per-prompt metrics `[batch]`: `reward/{policy,reference,bon_N}`, `quantile/{policy,reference,bon_N}`,
  `win_rate/vs_bon_N` (the policy's samples against the Best-of-N samples, ties counting 1/2), `kl/policy_ref`
  (`sampling.generation_kl`), `kl/bon_N` (exact with ties, `quantiles.bon_kl_and_quantile`) for each N in
  `config.eval.bon_ns`; `frontier/kl`, `frontier/quantile` `[batch, len(FRONTIER_NS)]`.

  Example:
    >>> from bond_jax import rewards, run_config
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> config = run_config.base_config()
    >>> config.sampling.max_new_tokens, config.eval.num_ref_samples, config.eval.bon_ns = 3, 8, (2, 4)
    >>> model_config = model_config_lib.tiny(vocab_size=8)
    >>> params = transformer.init_params(model_config, jax.random.key(0))
    >>> count_threes = rewards.token_reward(lambda p, pm, g, gm: jnp.sum((g == 3) & gm, -1).astype(jnp.float32))
    >>> eval_step = jax.jit(make_eval_step(config, model_config, count_threes))
    >>> batch = {"prompts": jnp.array([[1, 2], [3, 4]]), "prompt_mask": jnp.ones((2, 2), bool)}
    >>> out = eval_step(params, params, batch, jax.random.key(1))
    >>> out.metrics["kl/policy_ref"].tolist(), out.metrics["kl/bon_2"].shape, out.completions.tokens.shape
    ([0.0, 0.0], (2,), (2, 4, 3))
  """
  k = config.eval.num_ref_samples
  policy_sampling = sampling.make_sampling_config(config.sampling, model_config, config.eval.num_policy_samples)
  ref_sampling = sampling.make_sampling_config(config.sampling, model_config, k)
  bon_ns: Sequence[int] = tuple(config.eval.bon_ns)

  parts = config.memory.inference_micro_batches  # Each pass over the prompts runs in this many parts.

  def eval_step(params, ref_params, batch: Batch, rng: jax.Array) -> EvalOutput:
    policy_rng, ref_rng = jax.random.split(rng)
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    policy_out = sampling.sample(params, prompts, prompt_mask, policy_rng, policy_sampling, model_config, parts)
    # The reference's decoding weights are gathered once the policy's samples exist: one model's at a time.
    ref_out = sampling.sample(sharding.params_after(ref_params, policy_out), prompts, prompt_mask, ref_rng,
                              ref_sampling, model_config, parts)
    policy_rewards, ref_rewards = (micro_batching.map_rows(reward_fn, parts, prompts, prompt_mask, out.tokens, out.mask)
                                   for out in (policy_out, ref_out))
    policy_quantiles = mid_quantile(policy_rewards, ref_rewards)
    # Each reference sample against the rest of the pool: 1/2 on average, exactly.
    ref_quantiles = mid_quantile(ref_rewards[:, :1], ref_rewards[:, 1:])
    frontier_kl, frontier_quantile = quantiles.bon_kl_and_quantile(ref_rewards, jnp.asarray(FRONTIER_NS))
    kl_to_ref = sampling.generation_kl(params, ref_params, model_config, prompts, prompt_mask, policy_out.tokens,
                                       policy_out.mask, policy_sampling, parts)
    metrics = {
        "reward/policy": jnp.mean(policy_rewards, axis=1),
        "reward/reference": jnp.mean(ref_rewards, axis=1),
        "quantile/policy": jnp.mean(policy_quantiles, axis=1),
        "quantile/reference": jnp.full(ref_rewards.shape[:1], 0.5),
        "kl/policy_ref": jnp.mean(kl_to_ref, axis=1),
        "frontier/kl": frontier_kl,
        "frontier/quantile": frontier_quantile,
    }
    bon_shown = []
    for n in bon_ns:
      index, best, best_quantiles = best_of_n_groups(ref_rewards, n)
      metrics |= {
          f"reward/bon_{n}": jnp.mean(best, axis=1),
          f"quantile/bon_{n}": jnp.mean(best_quantiles, axis=1),
          f"win_rate/vs_bon_{n}": jnp.mean(mid_quantile(policy_rewards, best), axis=1),
          f"kl/bon_{n}": quantiles.bon_kl_and_quantile(ref_rewards, n)[0],
      }
      # The last group's winner, which does not share a candidate with the reference sample shown (the pool's first).
      bon_shown.append((index[:, -1:], best[:, -1:], best_quantiles[:, -1:]))
    bon_index = jnp.concatenate([i for i, _, _ in bon_shown], axis=1)
    # [batch, k, time] -> [batch, len(bon_ns), time].
    pick = lambda x: jnp.take_along_axis(x, bon_index[:, :, None], axis=1)  # noqa: E731
    completions = Completions(
        tokens=jnp.concatenate([ref_out.tokens[:, :1], policy_out.tokens[:, :1], pick(ref_out.tokens)], axis=1),
        mask=jnp.concatenate([ref_out.mask[:, :1], policy_out.mask[:, :1], pick(ref_out.mask)], axis=1),
        rewards=jnp.concatenate([ref_rewards[:, :1], policy_rewards[:, :1], *[r for _, r, _ in bon_shown]], axis=1),
        quantiles=jnp.concatenate([ref_quantiles, policy_quantiles[:, :1], *[q for _, _, q in bon_shown]], axis=1))
    return EvalOutput(metrics, completions)

  return eval_step


def frontier_points(metrics: dict[str, float]) -> list[dict[str, float]]:
  """`[{n, kl, quantile}]`: the frontier of a `summarize`d evaluation, Best-of-N's expected quantile against its
  KL for each N of `FRONTIER_NS` (exact for the estimated reward distribution)."""
  return [{"n": n, "kl": metrics[f"frontier/kl/bon_{n}"], "quantile": metrics[f"frontier/quantile/bon_{n}"]}
          for n in FRONTIER_NS]


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> tuple[float, float]:
  """`(y, dy/dx)` at `x` of the piecewise-linear curve through `(xs, ys)` (`xs` non-decreasing): the value and the
  slope of the segment that holds `x`; beyond either end, the end's value and slope 0.

  Example:
    >>> interpolate([0.0, 1.0, 2.0], [0.5, 0.9, 1.0], 0.25)
    (0.6, 0.4)
  """
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  value = float(np.interp(x, xs, ys))
  if not xs[0] <= x < xs[-1]:
    return value, 0.0
  i = int(np.searchsorted(xs, x, side="right") - 1)
  width = xs[i + 1] - xs[i]
  return value, float((ys[i + 1] - ys[i]) / width) if width > 0 else 0.0


def summarize(per_prompt: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over prompts, with standard errors, of the per-prompt metrics of one evaluation's batches.

  Args:
    per_prompt: `EvalOutput.metrics` of each batch, as host arrays.

  Returns:
    `{name: mean}` and `{name + "/se": standard error}` for every per-prompt metric (sample standard deviation over
    prompts / sqrt(prompts)); the frontier as `frontier/kl/bon_N` and `frontier/quantile/bon_N` for each N of
    `FRONTIER_NS`; where the policy stands against it, with standard errors to first order (over prompts, of the
    per-prompt values linearised around the means):
    - `frontier/quantile_at_policy_kl`, and `frontier/gap`: `quantile/policy` minus it (below the frontier: < 0);
    - `frontier/kl_at_policy_quantile`, the KL at which Best-of-N reaches the policy's quantile, and
      `frontier/excess_kl`: `kl/policy_ref` minus it, the nats the policy spends beyond Best-of-N's.

  Example:
    >>> ns = np.array(FRONTIER_NS)   # A tie-free frontier for both prompts.
    >>> frontier = {"frontier/kl": np.tile(np.log(ns) - (ns - 1) / ns, (2, 1)),
    ...             "frontier/quantile": np.tile(ns / (ns + 1), (2, 1))}
    >>> metrics = summarize([{"quantile/policy": np.array([0.7, 0.8]), "kl/policy_ref": np.array([0.6, 0.8]),
    ...                       **frontier}])
    >>> round(metrics["quantile/policy"], 4), round(metrics["quantile/policy/se"], 4)
    (0.75, 0.05)
    >>> round(metrics["frontier/quantile_at_policy_kl"], 4), round(metrics["frontier/gap"], 4)
    (0.8113, -0.0613)
    >>> round(metrics["frontier/kl_at_policy_quantile"], 4), round(metrics["frontier/excess_kl"], 4)   # N = 3
    (0.4319, 0.2681)
  """
  values = {name: np.concatenate([np.asarray(p[name]) for p in per_prompt]) for name in per_prompt[0]}
  metrics = {}
  for name, v in values.items():
    if v.ndim == 1:
      metrics[name] = float(np.mean(v))
      metrics[name + SE_SUFFIX] = standard_error(v)
  for metric in ("kl", "quantile"):
    means = np.mean(values[f"frontier/{metric}"], axis=0)
    metrics |= {f"frontier/{metric}/bon_{n}": float(m) for n, m in zip(FRONTIER_NS, means, strict=True)}
  points = frontier_points(metrics)
  kls, qs = [p["kl"] for p in points], [p["quantile"] for p in points]
  kl_i, q_i = values["kl/policy_ref"], values["quantile/policy"]
  at_kl, slope = interpolate(kls, qs, metrics["kl/policy_ref"])
  at_quantile, inverse_slope = interpolate(qs, kls, metrics["quantile/policy"])
  metrics |= {
      "frontier/quantile_at_policy_kl": at_kl,
      "frontier/gap": metrics["quantile/policy"] - at_kl,
      "frontier/gap" + SE_SUFFIX: standard_error(q_i - slope * kl_i),
      "frontier/kl_at_policy_quantile": at_quantile,
      "frontier/excess_kl": metrics["kl/policy_ref"] - at_quantile,
      "frontier/excess_kl" + SE_SUFFIX: standard_error(kl_i - inverse_slope * q_i),
  }
  return metrics


def standard_error(values: np.ndarray) -> float:
  """`std(values, ddof=1) / sqrt(len(values))`: the standard error of their mean (NaN for fewer than 2).

  Example:
    >>> standard_error(np.array([1., 2., 3., 4.]))   # sqrt(5/3) / 2
    0.6454972243679028
  """
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return math.nan
  return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def report(eval_metrics: dict[str, float], bon_ns: Sequence[int]) -> dict[str, dict[str, float]]:
  """The end-of-run summary: `{reference, bon_N..., policy} -> {reward_mean, reward_quantile, kl_to_ref}`, each
  with its standard error over the held-out prompts (`reward_mean_se`, ...).

  `kl_to_ref` is 0 for the reference, exact with ties for Best-of-N (`quantiles.bon_kl_and_quantile`; `kl_bound`
  is the tie-free `log N - (N-1)/N`, an upper bound) and `sampling.generation_kl` for the policy, whose row also
  holds `frontier_quantile` (the frontier's quantile at the policy's KL), `frontier_gap` (the policy's quantile
  minus that) and `frontier_excess_kl` (the policy's KL minus the frontier's at the policy's quantile), with their
  standard errors.

  Example:
    >>> ns = np.array(FRONTIER_NS)
    >>> metrics = summarize([{"reward/policy": np.array([0.8, 0.9]), "quantile/policy": np.array([0.9, 0.95]),
    ...     "kl/policy_ref": np.array([1.5, 2.5]), "reward/reference": np.array([0., 0.1]),
    ...     "quantile/reference": np.array([0.5, 0.5]), "reward/bon_4": np.array([0.6, 0.7]),
    ...     "quantile/bon_4": np.array([0.8, 0.8]), "kl/bon_4": np.array([0.6, 0.6]),
    ...     "frontier/kl": np.tile(np.log(ns) - (ns - 1) / ns, (2, 1)),
    ...     "frontier/quantile": np.tile(ns / (ns + 1), (2, 1))}])
    >>> summary = report(metrics, bon_ns=(4,))
    >>> summary["bon_4"]["kl_to_ref"], round(summary["bon_4"]["kl_bound"], 4)
    (0.6, 0.6363)
    >>> round(summary["policy"]["frontier_gap"], 4), round(summary["policy"]["frontier_gap_se"], 4)
    (-0.0242, 0.0005)
  """

  def row(key: str, kl_metric: str | None) -> dict[str, float]:
    fields = {"reward_mean": f"reward/{key}", "reward_quantile": f"quantile/{key}", "kl_to_ref": kl_metric}
    values = {}
    for field, metric in fields.items():
      values[field] = 0.0 if metric is None else eval_metrics[metric]
      values[field + "_se"] = 0.0 if metric is None else eval_metrics[metric + SE_SUFFIX]
    return values

  summary = {"reference": row("reference", None)}
  summary |= {f"bon_{n}": row(f"bon_{n}", f"kl/bon_{n}") | {"kl_bound": quantiles.bon_kl_upper_bound(n)}
              for n in bon_ns}
  summary["policy"] = row("policy", "kl/policy_ref") | {
      "frontier_quantile": eval_metrics["frontier/quantile_at_policy_kl"],
      "frontier_gap": eval_metrics["frontier/gap"],
      "frontier_gap_se": eval_metrics["frontier/gap" + SE_SUFFIX],
      "frontier_excess_kl": eval_metrics["frontier/excess_kl"],
      "frontier_excess_kl_se": eval_metrics["frontier/excess_kl" + SE_SUFFIX]}
  return {name: {field: float(value) for field, value in fields.items()} for name, fields in summary.items()}


def completion_rows(step: int, completions: Completions, texts: Sequence[str], decode: Callable[[list[int]], str],
                    bon_ns: Sequence[int], bon_n: int) -> list[dict]:
  """Rows of `completions.jsonl`: per prompt, its text and a reference, a policy and a Best-of-`bon_n` sample,
  each `{"text", "reward", "quantile"}`.

  Args:
    step: the training step of the evaluation.
    completions: one batch's `Completions` as host arrays (its first `len(texts)` rows are read).
    texts: the prompts' texts.
    decode: token ids -> text.
    bon_ns: `config.eval.bon_ns`, the Ns of the Best-of-N samples of `completions`, in order.
    bon_n: the N (one of `bon_ns`) whose Best-of-N sample to write.

  Example:
    >>> completions = Completions(np.array([[[5], [6], [7]]]), np.ones((1, 3, 1), bool), np.array([[0., .5, .9]]),
    ...                           np.array([[.5, .7, .95]]))
    >>> row = completion_rows(10, completions, ["The plot was"], str, bon_ns=(4,), bon_n=4)[0]
    >>> row["policy"], row["best_of_n"]
    ({'text': '[6]', 'reward': 0.5, 'quantile': 0.7}, {'text': '[7]', 'reward': 0.9, 'quantile': 0.95, 'n': 4})
  """
  column = {"reference": 0, "policy": 1, "best_of_n": 2 + list(bon_ns).index(bon_n)}
  rows = []
  for i, prompt in enumerate(texts):
    row = {"step": int(step), "prompt": prompt}
    for name, j in column.items():
      ids = np.asarray(completions.tokens[i, j])[np.asarray(completions.mask[i, j], bool)]
      row[name] = {"text": decode(ids.tolist()), "reward": float(completions.rewards[i, j]),
                   "quantile": float(completions.quantiles[i, j])}
    row["best_of_n"]["n"] = int(bon_n)
    rows.append(row)
  return rows


def nearest_bon_n(eval_metrics: dict[str, float], bon_ns: Sequence[int]) -> int:
  """The N of `bon_ns` whose Best-of-N KL (`kl/bon_N`) is nearest the policy's (`kl/policy_ref`).

  Example:
    >>> nearest_bon_n({"kl/policy_ref": 0.7, "kl/bon_2": 0.19, "kl/bon_4": 0.63, "kl/bon_8": 1.2}, (2, 4, 8))
    4
  """
  return min(bon_ns, key=lambda n: abs(eval_metrics[f"kl/bon_{n}"] - eval_metrics["kl/policy_ref"]))
