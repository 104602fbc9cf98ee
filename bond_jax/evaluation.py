"""Evaluation on held-out prompts: the policy against the reference and against Best-of-N of the reference.

Per prompt, the reference draws two pools of `num_ref_samples`: the first picks the Best-of-N samples, the second
is a fresh reference against which every quantile is measured (so Best-of-N is never ranked against its own
candidates). Every sample is drawn at the run's sampling temperature, and `KL(π || π_ref)` is that of the tempered
distributions (docs/method.md, "Which distributions the estimates refer to"), estimated on the policy's samples
by the sum of the exact KLs of the next-token distributions along each sample (`sampling.generation_kl`), an
unbiased estimate of far lower variance than the k1 estimate `log π(y) - log π_ref(y)`. Quantiles are mid-ranks, `(p_lt + p_le) / 2`: a reference sample scores 1/2 in expectation even
when rewards tie, and Best-of-N scores `N/(N+1)` in expectation when they don't (`bon_expected_quantile`).
"""

from collections.abc import Callable, Sequence

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

NUM_POLICY_SAMPLES = 4


def mid_quantile(rewards: jax.Array, ref_rewards: jax.Array) -> jax.Array:
  """`(p_lt + p_le) / 2` of each sample against the reference samples of its row, `[batch, samples]`."""
  p_lt, p_le = quantiles.reward_quantiles(rewards, ref_rewards)
  return (p_lt + p_le) / 2


def win_rate(rewards: jax.Array, other_rewards: jax.Array) -> jax.Array:
  """P[r(y) > r(y')] + P[r(y) = r(y')] / 2 over all pairs of a row, averaged: `[batch, s]`, `[batch, t]` -> []."""
  return jnp.mean(mid_quantile(rewards, other_rewards))


def make_eval_step(config: ml_collections.ConfigDict, model_config: ModelConfig, reward_fn: RewardFn,
                   ) -> Callable[[object, object, Batch, jax.Array], dict[str, jax.Array]]:
  """Builds `eval_step(params, ref_params, batch, rng) -> metrics` (pure; jit it).

  Metrics (scalars): `reward/{policy,reference,bon_N}`, `quantile/{policy,reference,bon_N}` (against the fresh
  reference pool), `win_rate/vs_reference`, `win_rate/vs_bon_N`, `kl/policy_ref` (`sampling.generation_kl` on
  policy samples), for
  each N in `config.eval.bon_ns`.

  Example:
    >>> eval_step = jax.jit(make_eval_step(config, model_config, reward_fn))
    >>> metrics = eval_step(state.params, ref_params, batch, jax.random.PRNGKey(0))
  """
  k = config.eval.num_ref_samples
  policy_sampling = sampling.make_sampling_config(config.sampling, model_config, NUM_POLICY_SAMPLES)
  ref_sampling = sampling.make_sampling_config(config.sampling, model_config, 2 * k)
  bon_ns: Sequence[int] = tuple(config.eval.bon_ns)

  parts = config.memory.inference_micro_batches  # Each pass over the prompts runs in this many parts.

  def eval_step(params, ref_params, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    policy_rng, ref_rng = jax.random.split(rng)
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    policy_out = sampling.sample(params, prompts, prompt_mask, policy_rng, policy_sampling, model_config, parts)
    # The reference's decoding weights are gathered once the policy's samples exist: one model's at a time.
    ref_out = sampling.sample(sharding.params_after(ref_params, policy_out), prompts, prompt_mask, ref_rng,
                              ref_sampling, model_config, parts)
    policy_rewards, ref_rewards = (micro_batching.map_rows(reward_fn, parts, prompts, prompt_mask, out.tokens, out.mask)
                                   for out in (policy_out, ref_out))
    pool, fresh = ref_rewards[:, :k], ref_rewards[:, k:]
    kl_to_ref = sampling.generation_kl(params, ref_params, model_config, prompts, prompt_mask, policy_out.tokens,
                                       policy_out.mask, policy_sampling, parts)
    metrics = {
        "reward/policy": jnp.mean(policy_rewards),
        "reward/reference": jnp.mean(pool),
        "quantile/policy": jnp.mean(mid_quantile(policy_rewards, fresh)),
        "quantile/reference": jnp.mean(mid_quantile(pool, fresh)),
        "win_rate/vs_reference": win_rate(policy_rewards, fresh),
        "kl/policy_ref": jnp.mean(kl_to_ref),
    }
    for n in bon_ns:
      best = jnp.max(pool[:, :n], axis=-1, keepdims=True)
      metrics |= {
          f"reward/bon_{n}": jnp.mean(best),
          f"quantile/bon_{n}": jnp.mean(mid_quantile(best, fresh)),
          f"win_rate/vs_bon_{n}": win_rate(policy_rewards, best),
      }
    return metrics

  return eval_step


def report(eval_metrics: dict[str, float], bon_ns: Sequence[int]) -> dict[str, dict[str, float]]:
  """The end-of-run summary: `{reference, bon_N..., policy} -> {reward_mean, reward_quantile, kl_to_ref}`.

  `kl_to_ref` is 0 for the reference, the analytic `log N - (N-1)/N` for Best-of-N (exact without ties, an upper
  bound with them) and the k1 estimate for the policy.

  Example:
    >>> report({"reward/policy": 0.4, ...}, bon_ns=(2, 4))["bon_4"]["kl_to_ref"]   # 0.636...
  """
  rows = {"reference": ("reference", 0.0)}
  rows |= {f"bon_{n}": (f"bon_{n}", quantiles.bon_kl_upper_bound(n)) for n in bon_ns}
  rows["policy"] = ("policy", eval_metrics["kl/policy_ref"])
  return {
      name: {"reward_mean": float(eval_metrics[f"reward/{key}"]),
             "reward_quantile": float(eval_metrics[f"quantile/{key}"]),
             "kl_to_ref": float(np.asarray(kl_value))}
      for name, (key, kl_value) in rows.items()
  }
