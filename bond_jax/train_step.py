"""One training step (sample, score, estimate, loss, update, anchor) for J-BOND, BOND and REINFORCE.

`make_train_step` composes the pure pieces (`sampling`, a `RewardFn`, `quantiles`, `losses`, `anchor`) into
`train_step(state, ref_params, batch) -> (state, metrics)`, a pure function the trainer jits with shardings.

Per prompt and algorithm:
- `jbond`: 1 policy sample, 2 anchor samples; Best-of-2 forward term, J-BOND backward term (the paper's reward or,
  with `bond.reward_form = "tie_aware"`, the estimated exact Best-of-2 log ratio), γ·KL(π || anchor).
- `bond`: `num_policy_samples` policy samples, `num_anchor_samples` (k) anchor samples; quantiles of the policy
  samples against the anchor's, Jeffreys loss towards Best-of-n of the anchor (each of the k // n disjoint groups
  of n anchor samples gives one Best-of-n sample of the forward term).
- `reinforce`: `num_policy_samples` policy samples, raw reward with leave-one-out baseline, KL to the reference.
The anchor then moves by its mode: `ema` (every step, rate η), `periodic` (copied every `anchor_period` steps)
or `fixed` (stays at the reference). A step whose rewards, loss or gradient are not finite leaves params, anchor
and optimizer state untouched and reports `nonfinite = 1`; `reward/nonfinite_prompts` counts the prompts with a
non-finite reward and `reward/first_nonfinite_prompt` is the batch index of the first (-1 if none).

`log π_ref` of the samples is needed by REINFORCE's loss but only by a metric (`kl/policy_ref`) of J-BOND and
BOND, so those compute it on logged steps only (`is_log_step`) and report NaN for it on the others.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bond_jax import anchor as anchor_lib
from bond_jax import kl
from bond_jax import losses
from bond_jax import quantiles
from bond_jax import sampling
from bond_jax.models.config import ModelConfig
from bond_jax.rewards import RewardFn
from bond_jax.train_state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def samples_per_prompt(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(policy samples, anchor samples) drawn per prompt by `config.algorithm`."""
  if config.algorithm == "jbond":
    return 1, 2
  if config.algorithm == "bond":
    return config.bond.num_policy_samples, config.bond.num_anchor_samples
  return config.bond.num_policy_samples, 0


def is_log_step(config: ml_collections.ConfigDict, step):
  """Whether the trainer records the metrics of `step` (1-based): every `log_every` steps and the last one.

  Works on Python ints and on traced int arrays alike.
  """
  return (step % config.log_every == 0) | (step == config.num_steps)


def sampling_config(config: ml_collections.ConfigDict, model_config: ModelConfig, num_samples: int,
                    ) -> sampling.SamplingConfig:
  """The sampler settings of `config.sampling` for `num_samples` samples per prompt."""
  return sampling.SamplingConfig(
      max_new_tokens=config.sampling.max_new_tokens,
      num_samples=num_samples,
      temperature=config.sampling.temperature,
      top_k=config.sampling.top_k,
      top_p=config.sampling.top_p,
      stop_token_ids=model_config.stop_token_ids,
      pad_token_id=sampling.fill_token_id(model_config),
  )


def sequence_log_probs(params, model_config: ModelConfig, batch: Batch, out: sampling.SampleOutput) -> jax.Array:
  """`log π(y)` per sample, `[batch, samples]`, by one full forward over prompt + generation."""
  token_log_probs = sampling.generation_log_probs(
      params, model_config, batch["prompts"], batch["prompt_mask"], out.tokens, out.mask)
  return jnp.sum(token_log_probs, axis=-1)


def _concat_samples(a: sampling.SampleOutput, b: sampling.SampleOutput) -> sampling.SampleOutput:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def _take_samples(out: sampling.SampleOutput, index: jax.Array) -> sampling.SampleOutput:
  """Samples `index[b, g]` of each row b: a samples axis of size `groups`, from `index` `[batch, groups]`."""
  return jax.tree.map(lambda x: jnp.take_along_axis(x, index[..., None], axis=1), out)


def _best_of_groups(rewards: jax.Array, n: int) -> jax.Array:
  """Index of the Best-of-n sample of each disjoint group of n samples: `[batch, k]` -> `[batch, k // n]`."""
  groups = rewards.shape[1] // n
  best = quantiles.best_of_n(rewards[:, :groups * n].reshape(-1, n)).reshape(-1, groups)
  return best + n * jnp.arange(groups)


def _reward_metrics(*rewards: jax.Array) -> Metrics:
  """Which prompts got a non-finite reward, from `[batch, samples_i]` rewards of the same prompts."""
  bad = jnp.any(jnp.concatenate([~jnp.isfinite(r) for r in rewards], axis=1), axis=1)
  return {"reward/nonfinite_prompts": jnp.sum(bad).astype(jnp.float32),
          "reward/first_nonfinite_prompt": jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.float32)}


def _kl_metrics(policy_log_probs: jax.Array, ref_log_probs: jax.Array,
                anchor_log_probs: jax.Array | None = None) -> Metrics:
  """k1 estimates of KL(π || π_ref) and KL(π || π_anchor) on the policy's own samples."""
  policy_log_probs = jax.lax.stop_gradient(policy_log_probs)
  metrics = {"kl/policy_ref": jnp.mean(kl.kl_k1(policy_log_probs, ref_log_probs))}
  if anchor_log_probs is not None:
    metrics["kl/policy_anchor"] = jnp.mean(kl.kl_k1(policy_log_probs, anchor_log_probs))
  return metrics


def _move_anchor(config: ml_collections.ConfigDict, anchor_params, params, step: jax.Array):
  if config.algorithm == "reinforce":  # REINFORCE has no anchor; keep it where it started.
    return anchor_params
  if config.bond.anchor == "ema":
    return anchor_lib.ema_update(anchor_params, params, config.bond.eta)
  if config.bond.anchor == "periodic":
    swap = (step + 1) % config.bond.anchor_period == 0
    return jax.tree.map(lambda a, p: jnp.where(swap, p, a), anchor_params, params)
  return anchor_params


def make_train_step(config: ml_collections.ConfigDict, model_config: ModelConfig, reward_fn: RewardFn,
                    optimizer: optax.GradientTransformation,
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, Metrics]]:
  """Builds the pure train step for `config.algorithm`.

  Args:
    config: a validated run config (`run_config.validate`).
    model_config: the policy's model config (static).
    reward_fn: scores generations, `(prompts, prompt_mask, tokens, mask) -> [batch, samples]`.
    optimizer: the policy's optax optimizer (`train_state.make_optimizer`).

  Returns:
    `train_step(state, ref_params, batch) -> (state, metrics)`, where `batch` holds `prompts` and `prompt_mask`
    `[batch, prompt_len]` and `metrics` maps names to scalars.

  Example:
    >>> step = jax.jit(make_train_step(config, model_config, reward_fn, optimizer), donate_argnums=0)
    >>> state, metrics = step(state, ref_params, {"prompts": p, "prompt_mask": m})
  """
  num_policy, num_anchor = samples_per_prompt(config)
  policy_sampling = sampling_config(config, model_config, num_policy)
  anchor_sampling = sampling_config(config, model_config, max(num_anchor, 1))
  log_probs = functools.partial(sequence_log_probs, model_config=model_config)
  bond = config.bond

  def losses_and_metrics(state: TrainState, ref_params, batch: Batch, rng: jax.Array):
    """Everything up to the loss; returns `loss_fn(params) -> (loss, metrics)` and sample-side metrics."""
    policy_rng, anchor_rng = jax.random.split(rng)
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    policy_out = sampling.sample(state.params, prompts, prompt_mask, policy_rng, policy_sampling, model_config)
    policy_rewards = reward_fn(prompts, prompt_mask, policy_out.tokens, policy_out.mask)
    metrics = {
        "reward/policy": jnp.mean(policy_rewards),
        "entropy/sequence": -jnp.mean(jnp.sum(policy_out.log_probs, axis=-1)),
        "length/policy": jnp.mean(jnp.sum(policy_out.mask, axis=-1)),
        "tokens/generated": jnp.sum(policy_out.mask).astype(jnp.float32),
    }

    if config.algorithm == "reinforce":
      ref_log_probs = log_probs(ref_params, batch=batch, out=policy_out)
      metrics |= _reward_metrics(policy_rewards)

      def loss_fn(p):
        policy_log_probs = log_probs(p, batch=batch, out=policy_out)
        loss, loss_metrics = losses.reinforce_loss(policy_log_probs, ref_log_probs, policy_rewards,
                                                   kl_coef=bond.kl_coef)
        return loss, (loss_metrics, _kl_metrics(policy_log_probs, ref_log_probs))
      return loss_fn, metrics

    anchor_out = sampling.sample(state.anchor_params, prompts, prompt_mask, anchor_rng, anchor_sampling,
                                 model_config)
    anchor_rewards = reward_fn(prompts, prompt_mask, anchor_out.tokens, anchor_out.mask)
    n = 2 if config.algorithm == "jbond" else bond.n
    best_index = _best_of_groups(anchor_rewards, n)
    best = _take_samples(anchor_out, best_index)
    anchor_log_probs = log_probs(state.anchor_params, batch=batch, out=policy_out)
    ref_log_probs = jax.lax.cond(is_log_step(config, state.step + 1),
                                 lambda: log_probs(ref_params, batch=batch, out=policy_out),
                                 lambda: jnp.full(anchor_log_probs.shape, jnp.nan, anchor_log_probs.dtype))
    p_lt, p_le = quantiles.reward_quantiles(policy_rewards, anchor_rewards)
    metrics |= {
        "reward/anchor": jnp.mean(anchor_rewards),
        "reward/anchor_best": jnp.mean(jnp.take_along_axis(anchor_rewards, best_index, axis=1)),
        "quantile/policy_vs_anchor": jnp.mean(p_le),
        "tokens/generated": metrics["tokens/generated"] + jnp.sum(anchor_out.mask),
    } | _reward_metrics(policy_rewards, anchor_rewards)

    def loss_fn(p):
      # One forward over the policy samples and the Best-of-n anchor samples together.
      joint = log_probs(p, batch=batch, out=_concat_samples(policy_out, best))
      policy_log_probs, best_log_probs = joint[:, :num_policy], joint[:, num_policy:]
      if config.algorithm == "jbond":
        loss, loss_metrics = losses.jbond_loss(
            policy_log_probs, anchor_log_probs, policy_rewards, anchor_rewards, best_log_probs,
            beta=bond.beta, gamma=bond.gamma, penalty=bond.jbond_penalty, ties_lose=bond.ties_lose,
            reward_form=bond.reward_form)
      else:
        loss, loss_metrics = losses.jeffreys_loss(
            losses.forward_kl_loss(best_log_probs),
            losses.backward_kl_loss(policy_log_probs, anchor_log_probs, p_lt, p_le, bond.n,
                                    floor=losses.quantile_floor(num_anchor), reward_form=bond.reward_form),
            beta=bond.beta)
      return loss, (loss_metrics, _kl_metrics(policy_log_probs, ref_log_probs, anchor_log_probs))
    return loss_fn, metrics

  def train_step(state: TrainState, ref_params, batch: Batch) -> tuple[TrainState, Metrics]:
    rng, step_rng = jax.random.split(state.rng)
    loss_fn, metrics = losses_and_metrics(state, ref_params, batch, step_rng)
    (loss, (loss_metrics, kl_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    anchor_params = _move_anchor(config, state.anchor_params, params, state.step)

    # NaN rewards need not make the loss NaN (comparisons with NaN are just False), so they are checked apart.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (metrics["reward/nonfinite_prompts"] == 0)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        anchor_params=keep_if_finite(anchor_params, state.anchor_params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        rng=rng,
    )
    metrics |= kl_metrics | {f"loss/{k}": v for k, v in loss_metrics.items()}
    metrics |= {"loss/total": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32)}
    return new_state, metrics

  return train_step
