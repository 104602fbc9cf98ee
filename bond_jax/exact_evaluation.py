"""Exact KLs of the policy during training, when every generation can be enumerated (docs/method.md, "Exact
oracles").

`make_exact_step` builds `exact_step(params, anchor_params, ref_params, batch) -> metrics`: it scores all
`vocab_size ** max_new_tokens` generations of every prompt of `batch` under the policy, the anchor and the
reference, and with the reward, and returns exact divergences (nats, averaged over the batch's prompts; the
trainer passes the `distinct_prompts` of its first held-out batch, so each prompt counts once):

- `exact/kl_pi_ref`: `KL(π || π_ref)`; `exact/reward_policy`: the expected reward under π;
- for a method with a Best-of-N target (`algorithm.target_n()`: `bond.n`, 2 for J-BOND):
  `exact/kl_pi_bon`, `exact/kl_bon_pi`: `KL(π || π_BoN)` and `KL(π_BoN || π)`, `π_BoN` = Best-of-N of `π_ref`;
  `exact/kl_bon_ref`: `KL(π_BoN || π_ref)`, the value `KL(π || π_ref)` should reach (`log N - (N-1)/N` without
  ties, less with them); `exact/reward_bon`: the expected reward under π_BoN; and, when its anchor moves,
  `exact/kl_pi_anchor_bon`: `KL(π || BoN_N(π_anchor))`, the loss's current target;
- `exact/kl_pi_bon{M}` and `exact/kl_bon{M}_ref` for each M in `config.exact.bon_ns` (Best-of-M of `π_ref`: the
  target of iterative BOND after log_n(M) anchor moves);

Distributions are those the run samples: at its sampling temperature.

Example:
  >>> from bond_jax import rewards, run_config
  >>> from bond_jax.models import config as model_config_lib, transformer
  >>> config = run_config.base_config()
  >>> config.algorithm, config.sampling.max_new_tokens, config.exact.every = "bond", 2, 1
  >>> model_config = model_config_lib.tiny(vocab_size=8)
  >>> ref_params = transformer.init_params(model_config, jax.random.key(0))
  >>> reward_fn = rewards.token_reward(lambda p, pm, g, gm: g.sum(-1).astype(jnp.float32))
  >>> exact_step = jax.jit(make_exact_step(config, model_config, reward_fn))
  >>> batch = distinct_prompts({"prompts": np.array([[1, 2], [1, 2]]), "prompt_mask": np.ones((2, 2), bool)})
  >>> metrics = exact_step(ref_params, ref_params, ref_params, batch)   # the policy is still the reference
  >>> float(metrics["exact/kl_pi_ref"]), bool(metrics["exact/kl_bon_ref"] <= np.log(8) - 7 / 8)
  (0.0, True)
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond_jax import algorithms
from bond_jax import exact_oracle
from bond_jax import run_config
from bond_jax import sampling
from bond_jax.models.config import ModelConfig
from bond_jax.rewards import RewardFn

Batch = dict[str, jax.Array]


def distinct_prompts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The rows of a host batch with distinct (`prompts`, `prompt_mask`), in order of first appearance.

  Args:
    batch: `prompts` `[batch, prompt_len]` int and `prompt_mask` `[batch, prompt_len]` bool (other keys dropped).

  Returns:
    The same keys with `[distinct, prompt_len]` rows.

  Example:
    >>> distinct_prompts({"prompts": np.array([[1, 2], [3, 4], [1, 2]]), "prompt_mask": np.ones((3, 2), bool)})
    {'prompts': array([[1, 2],
           [3, 4]]), 'prompt_mask': array([[ True,  True],
           [ True,  True]])}
  """
  prompts, prompt_mask = np.asarray(batch["prompts"]), np.asarray(batch["prompt_mask"]).astype(bool)
  _, first = np.unique(np.concatenate([prompts, prompt_mask], axis=1), axis=0, return_index=True)
  keep = np.sort(first)
  return {"prompts": prompts[keep], "prompt_mask": prompt_mask[keep]}


def check_enumerable(config: ml_collections.ConfigDict, model_config: ModelConfig) -> int:
  """The number of generations; `ConfigError` if the policy can stop early (EOS) or there are too many."""
  if model_config.stop_token_ids:
    raise run_config.ConfigError(
        f"config.exact.every = {config.exact.every} is not allowed: expected 0 for a policy with an EOS token "
        f"(ids {model_config.stop_token_ids}); the exact oracle enumerates generations of exactly max_new_tokens.")
  try:
    return exact_oracle.num_generations(model_config.vocab_size, config.sampling.max_new_tokens)
  except ValueError as e:
    raise run_config.ConfigError(f"config.exact.every = {config.exact.every} is not allowed: {e}") from e


def make_exact_step(config: ml_collections.ConfigDict, model_config: ModelConfig, reward_fn: RewardFn,
                    ) -> Callable[[object, object, object, Batch], dict[str, jax.Array]]:
  """Builds the pure `exact_step(params, anchor_params, ref_params, batch) -> metrics` (jit it).

  Args:
    config: a validated run config.
    model_config: the policy's config; no EOS, and `vocab_size ** sampling.max_new_tokens` small enough.
    reward_fn: scores generations, `(prompts, prompt_mask, tokens, mask) -> [batch, samples]`.

  Returns:
    The step; `batch` holds `prompts` and `prompt_mask` `[batch, prompt_len]`; metrics are the scalars of the
    module docstring.
  """
  check_enumerable(config, model_config)
  generations = exact_oracle.all_generations(model_config.vocab_size, config.sampling.max_new_tokens)
  algorithm = algorithms.from_config(config)
  n = algorithm.target_n()
  distribution = sampling.make_sampling_config(config.sampling, model_config, 1)

  def exact_step(params, anchor_params, ref_params, batch: Batch) -> dict[str, jax.Array]:
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    log_probs = lambda p: exact_oracle.enumerated_log_probs(  # noqa: E731
        p, model_config, prompts, prompt_mask, generations, distribution)
    log_pi, log_ref = log_probs(params), log_probs(ref_params)
    tokens = jnp.broadcast_to(generations, (prompts.shape[0],) + generations.shape)
    rewards = reward_fn(prompts, prompt_mask, tokens, jnp.ones(tokens.shape, bool))
    kl = lambda log_p, log_q: jnp.mean(exact_oracle.kl_divergence(log_p, log_q))  # noqa: E731
    metrics = {
        "exact/kl_pi_ref": kl(log_pi, log_ref),
        "exact/reward_policy": jnp.mean(exact_oracle.expectation(log_pi, rewards)),
    }
    if n is not None:
      log_bon = exact_oracle.bon_log_probs(log_ref, rewards, n)
      metrics |= {
          "exact/kl_pi_bon": kl(log_pi, log_bon),
          "exact/kl_bon_pi": kl(log_bon, log_pi),
          "exact/kl_bon_ref": kl(log_bon, log_ref),
          "exact/reward_bon": jnp.mean(exact_oracle.expectation(log_bon, rewards)),
      }
    if n is not None and algorithm.anchor_moves:
      metrics["exact/kl_pi_anchor_bon"] = kl(log_pi, exact_oracle.bon_log_probs(log_probs(anchor_params), rewards, n))
    for m in config.exact.bon_ns:
      log_bon_m = exact_oracle.bon_log_probs(log_ref, rewards, m)
      metrics[f"exact/kl_pi_bon{m}"] = kl(log_pi, log_bon_m)
      metrics[f"exact/kl_bon{m}_ref"] = kl(log_bon_m, log_ref)
    return metrics

  return exact_step
