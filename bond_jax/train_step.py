"""One training step of any `algorithms.Algorithm`, as named phases that another trainer or a benchmark can call.

`TrainStep(config, model_config, reward_fn, optimizer)` is `step(state, ref_params, batch) -> (state, metrics)`, a
pure function the trainer jits with shardings and donation, made of these phases (each a pure method), which see
the models' parameters (`fine_tuning`: under LoRA, `ref_params` is the frozen base and the state's parameters are
adapters, merged into the base before the phases):

1. `sample`: the policy's and the anchor's samples of every prompt (`algorithm.sample_counts()`), at the run's
   sampling temperature;
2. `score`: their rewards;
3. `estimate`: the quantiles of the policy samples among the anchor's, the Best-of-n anchor samples
   (`algorithm.num_best_of_n()` per prompt), and `log π_anchor`, `log π_ref` of the policy samples;
4. `loss`: one forward of the policy over its samples and the Best-of-n samples, then `algorithm.loss`, and
   `gradient`, its gradient: in one pass, or (`config.memory.micro_batches` > 1) accumulated over micro-batches of
   the prompts (`gradient`);
5. `update`: the optimizer step;
6. `move_anchor`: `algorithm.anchor.update` (an EMA, a periodic copy, or nothing);
7. `keep_if_finite`: a step whose rewards, loss or gradient are not finite leaves the parameters, anchor and
   optimizer state as they were and reports `nonfinite = 1`.

Sampling, scoring and the log-probabilities of the anchor and the reference run in `config.memory.
inference_micro_batches` parts of the prompts, one after the other (`micro_batching`); with one part each, the
step is the unsplit step, and with more it computes the same values (up to float rounding). Every
log-probability is taken under the sampling distribution (docs/method.md, "Which distributions the
estimates refer to"). `log π_ref` of the samples enters REINFORCE's loss but only a metric (`kl/policy_ref`) of
J-BOND and BOND, which compute it on logged steps only (`is_log_step`) and report NaN on the others.
`reward/nonfinite_prompts` counts the prompts with a non-finite reward and `reward/first_nonfinite_prompt` is the
batch index of the first (-1 if none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bond_jax import algorithms
from bond_jax import fine_tuning as fine_tuning_lib
from bond_jax import kl
from bond_jax import lora
from bond_jax import micro_batching
from bond_jax import quantiles
from bond_jax import sampling
from bond_jax import sharding
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.rewards import RewardFn
from bond_jax.train_state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class Samples(NamedTuple):
  """The samples of one step: `policy` `[batch, policy, time]`, `anchor` `[batch, anchor, time]` (None without an
  anchor)."""

  policy: sampling.SampleOutput
  anchor: sampling.SampleOutput | None


class Rewards(NamedTuple):
  """Their rewards: `policy` `[batch, policy]`, `anchor` `[batch, anchor]` (None without an anchor)."""

  policy: jax.Array
  anchor: jax.Array | None


class Estimates(NamedTuple):
  """What the step estimates from its samples before the loss (no gradient flows through any of it).

  Attributes:
    best: the Best-of-n anchor samples, `[batch, best, time]` (None without an anchor).
    best_rewards: their rewards, `[batch, best]`.
    p_lt: `[batch, policy]` share of the anchor samples of the prompt whose reward is below the policy sample's.
    p_le: `[batch, policy]` share at or below it.
    anchor_log_probs: `[batch, policy]` `log π_anchor(y)` of the policy samples.
    ref_log_probs: `[batch, policy]` `log π_ref(y)` of the policy samples (NaN where not computed).
  """

  best: sampling.SampleOutput | None
  best_rewards: jax.Array | None
  p_lt: jax.Array | None
  p_le: jax.Array | None
  anchor_log_probs: jax.Array | None
  ref_log_probs: jax.Array


def is_log_step(config: ml_collections.ConfigDict, step):
  """Whether the trainer records the metrics of `step` (1-based): every `log_every` steps and the last one.

  Works on Python ints and on traced int arrays alike.

  Example:
    >>> from bond_jax import run_config
    >>> config = run_config.base_config()
    >>> [s for s in range(1, 301) if is_log_step(config, s)][:3]
    [10, 20, 30]
  """
  return (step % config.log_every == 0) | (step == config.num_steps)


def _concat_samples(a: sampling.SampleOutput, b: sampling.SampleOutput) -> sampling.SampleOutput:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def _scored(samples: Samples, estimates: Estimates) -> sampling.SampleOutput:
  """What the loss scores under the policy: its own samples, then the Best-of-n anchor samples (if any)."""
  return samples.policy if estimates.best is None else _concat_samples(samples.policy, estimates.best)


def _best_of_groups(samples: sampling.SampleOutput, rewards: jax.Array, n: int,
                    ) -> tuple[sampling.SampleOutput, jax.Array]:
  """The Best-of-n sample of each disjoint group of n samples, and its reward: `[batch, k, ...]` -> `[batch, k // n,
  ...]` (the last `k % n` samples, if any, belong to no group)."""
  groups = rewards.shape[1] // n
  grouped = lambda x: x[:, :groups * n].reshape(x.shape[0], groups, n, *x.shape[2:])  # noqa: E731
  samples, rewards = jax.tree.map(grouped, samples), grouped(rewards)
  return quantiles.take_samples((samples, rewards), quantiles.best_of_n(rewards))


def _nonfinite_reward_metrics(rewards: Rewards) -> Metrics:
  """Which prompts got a non-finite reward, from every sample of the step."""
  bad = jnp.any(jnp.concatenate([~jnp.isfinite(r) for r in rewards if r is not None], axis=1), axis=1)
  return {"reward/nonfinite_prompts": jnp.sum(bad).astype(jnp.float32),
          "reward/first_nonfinite_prompt": jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.float32)}


# eq=False: hashed by identity (jit keys its caches on the callable), as the config it holds is not hashable.
@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
  """The train step of `algorithms.from_config(config)`, and its phases.

  Attributes:
    config: a validated run config (`run_config.validate`).
    model_config: the policy's model config (static).
    reward_fn: scores generations, `(prompts, prompt_mask, tokens, mask) -> [batch, samples]`.
    optimizer: the policy's optax optimizer (`train_state.make_optimizer`).

  Example:
    >>> from bond_jax import rewards, run_config, train_state
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> config = run_config.base_config()
    >>> config.sampling.max_new_tokens = 3
    >>> model_config = model_config_lib.tiny(vocab_size=8)
    >>> ref_params = transformer.init_params(model_config, jax.random.key(0))
    >>> count_threes = rewards.token_reward(lambda p, pm, g, gm: jnp.sum((g == 3) & gm, -1).astype(jnp.float32))
    >>> optimizer = train_state.make_optimizer(config.optimizer)
    >>> step = jax.jit(TrainStep(config, model_config, count_threes, optimizer), donate_argnums=0)
    >>> state = train_state.create_train_state(ref_params, optimizer, seed=0)
    >>> state, metrics = step(state, ref_params, {"prompts": jnp.array([[1, 2], [3, 4]]),
    ...                                           "prompt_mask": jnp.ones((2, 2), bool)})
    >>> int(state.step), sorted(metrics)[:3]
    (1, ['entropy/sequence', 'grad_norm', 'kl/policy_anchor'])
  """

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  reward_fn: RewardFn
  optimizer: optax.GradientTransformation

  @property
  def algorithm(self) -> algorithms.Algorithm:
    return algorithms.from_config(self.config)

  def _sampling_config(self, num_samples: int) -> sampling.SamplingConfig:
    return sampling.make_sampling_config(self.config.sampling, self.model_config, num_samples)

  @property
  def _inference_parts(self) -> int:
    return self.config.memory.inference_micro_batches

  def log_probs(self, params, batch: Batch, samples: sampling.SampleOutput, micro_batches: int = 1) -> jax.Array:
    """`log π(y)` `[batch, samples]` of `samples` under `params`, in the sampling distribution (the temperature
    applied): what every phase scores samples with."""
    return sampling.sample_log_probs(params, self.model_config, batch["prompts"], batch["prompt_mask"], samples,
                                     self._sampling_config(samples.tokens.shape[1]), micro_batches)

  def sample(self, state: TrainState, batch: Batch, rng: jax.Array) -> Samples:
    """Phase 1: `sample_counts()` samples per prompt from the policy and from the anchor."""
    counts = self.algorithm.sample_counts()
    policy_rng, anchor_rng = jax.random.split(rng)
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    draw = lambda params, rng, n: sampling.sample(  # noqa: E731
        params, prompts, prompt_mask, rng, self._sampling_config(n), self.model_config, self._inference_parts)
    policy = draw(state.params, policy_rng, counts.policy)
    if not counts.anchor:
      return Samples(policy, None)
    # The anchor's weights are prepared for decoding (gathered) once the policy's samples exist: the two models'
    # decoding weights are never held at once.
    return Samples(policy, draw(sharding.params_after(state.anchor_params, policy), anchor_rng, counts.anchor))

  def score(self, batch: Batch, samples: Samples) -> Rewards:
    """Phase 2: the reward of every sample."""
    score = lambda out: micro_batching.map_rows(  # noqa: E731
        self.reward_fn, self._inference_parts, batch["prompts"], batch["prompt_mask"], out.tokens, out.mask)
    return Rewards(score(samples.policy), None if samples.anchor is None else score(samples.anchor))

  def estimate(self, state: TrainState, ref_params, batch: Batch, samples: Samples, rewards: Rewards,
               with_reference) -> Estimates:
    """Phase 3: quantiles, Best-of-n anchor samples, anchor and reference log-probs of the policy samples.

    `with_reference` (a traced bool) says whether `log π_ref` is wanted when only a metric needs it.
    """
    algorithm = self.algorithm
    reference = lambda: self.log_probs(ref_params, batch, samples.policy, self._inference_parts)  # noqa: E731
    if algorithm.reference_in_loss:
      ref_log_probs = reference()
    else:
      nan = jnp.full(rewards.policy.shape, jnp.nan, jnp.float32)
      ref_log_probs = jax.lax.cond(with_reference, reference, lambda: nan)
    if samples.anchor is None:
      return Estimates(None, None, None, None, None, ref_log_probs)
    best, best_rewards = _best_of_groups(samples.anchor, rewards.anchor, algorithm.target_n())
    p_lt, p_le = quantiles.reward_quantiles(rewards.policy, rewards.anchor)
    return Estimates(
        best=best, best_rewards=best_rewards, p_lt=p_lt, p_le=p_le,
        # Forward only: the anchor's weights in the compute dtype (exact), gathered layer by layer at that size.
        anchor_log_probs=self.log_probs(transformer.cast_to_compute_dtype(state.anchor_params, self.model_config),
                                        batch, samples.policy, self._inference_parts),
        ref_log_probs=ref_log_probs)

  def loss(self, params, batch: Batch, samples: Samples, rewards: Rewards, estimates: Estimates,
           ) -> tuple[jax.Array, Metrics]:
    """Phase 4: `algorithm.loss` of `params`, and its metrics with the KL estimates on the policy samples."""
    # One forward over the policy samples and the Best-of-n anchor samples together.
    return self.loss_of_log_probs(self.log_probs(params, batch, _scored(samples, estimates)), samples, rewards,
                                  estimates)

  def loss_of_log_probs(self, joint: jax.Array, samples: Samples, rewards: Rewards, estimates: Estimates,
                        ) -> tuple[jax.Array, Metrics]:
    """`loss` from the policy's log-probs `[batch, policy + best]` of the policy and Best-of-n samples."""
    num_policy = samples.policy.tokens.shape[1]
    policy_log_probs = joint[:, :num_policy]
    loss, metrics = self.algorithm.loss(algorithms.LossInputs(
        policy_log_probs=policy_log_probs, best_log_probs=joint[:, num_policy:],
        anchor_log_probs=estimates.anchor_log_probs, ref_log_probs=estimates.ref_log_probs,
        policy_rewards=rewards.policy, anchor_rewards=rewards.anchor, p_lt=estimates.p_lt, p_le=estimates.p_le))
    metrics = {f"loss/{k}": v for k, v in metrics.items()}
    policy_log_probs = jax.lax.stop_gradient(policy_log_probs)
    metrics["kl/policy_ref"] = jnp.mean(kl.kl_k1(policy_log_probs, estimates.ref_log_probs))
    if estimates.anchor_log_probs is not None:
      metrics["kl/policy_anchor"] = jnp.mean(kl.kl_k1(policy_log_probs, estimates.anchor_log_probs))
    return loss, metrics

  def gradient(self, params, batch: Batch, samples: Samples, rewards: Rewards, estimates: Estimates):
    """Phase 4's `((loss, metrics), gradient)` at `params`.

    With `config.memory.micro_batches` = n > 1, the prompts are split into n micro-batches (`micro_batching`) and
    the gradient accumulated over them, one at a time, so that one micro-batch's activations are live at once.
    The loss couples the whole batch (J-BOND's batch-level baseline, every metric), so it is taken whole: a
    forward-only pass gives the log-probs `l` of every sample, then `loss(l)` and its gradient `g = dloss/dl`
    over the batch, and the parameters' gradient is `sum over micro-batches of d<g, l(params)>/dparams`, the
    same chain rule as the unsplit step's (one forward more, in exchange for the memory).
    """
    n = self.config.memory.micro_batches
    if n == 1:
      return jax.value_and_grad(self.loss, has_aux=True)(params, batch, samples, rewards, estimates)
    scored = _scored(samples, estimates)
    joint = jax.lax.stop_gradient(self.log_probs(params, batch, scored, n))
    (loss, metrics), weights = jax.value_and_grad(self.loss_of_log_probs, has_aux=True)(joint, samples, rewards,
                                                                                        estimates)

    def accumulate(total, part):
      part_batch, part_samples, part_weights = part
      grads = jax.grad(lambda p: jnp.sum(part_weights * self.log_probs(p, part_batch, part_samples)))(params)
      return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, micro_batching.split((batch, scored, weights), n))
    return (loss, metrics), grads

  def update(self, state: TrainState, grads) -> tuple[Any, optax.OptState]:
    """Phase 5: the optimizer's new parameters and state."""
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  def move_anchor(self, state: TrainState, params):
    """Phase 6: the anchor after the update that produced `params`."""
    schedule = self.algorithm.anchor
    return state.anchor_params if schedule is None else schedule.update(state.anchor_params, params, state.step)

  @property
  def fine_tuning(self) -> fine_tuning_lib.FullFineTune | lora.Lora:
    return fine_tuning_lib.from_config(self.config)

  def __call__(self, state: TrainState, ref_params, batch: Batch) -> tuple[TrainState, Metrics]:
    rng, step_rng = jax.random.split(state.rng)
    # The one place where the trained and frozen parameters become the models': under LoRA `ref_params` is the
    # frozen base (`lora.Frozen`) and the state holds adapters, merged here; a full fine-tune changes nothing.
    # The policy is merged once: its vjp takes the loss's gradient from the model's parameters to the trained ones.
    tuning = self.fine_tuning
    policy_params, to_trainable = jax.vjp(lambda trainable: tuning.policy(trainable, ref_params), state.params)
    models = state.replace(params=policy_params, anchor_params=tuning.policy(state.anchor_params, ref_params))
    samples = self.sample(models, batch, step_rng)
    rewards = self.score(batch, samples)
    estimates = self.estimate(models, tuning.reference(ref_params), batch, samples, rewards,
                              with_reference=is_log_step(self.config, state.step + 1))
    (loss, loss_metrics), model_grads = self.gradient(models.params, batch, samples, rewards, estimates)
    (grads,) = to_trainable(model_grads)
    grad_norm = optax.global_norm(grads)
    params, opt_state = self.update(state, grads)
    new_state = TrainState(step=state.step + 1, params=params, anchor_params=self.move_anchor(state, params),
                           opt_state=opt_state, rng=rng)

    metrics = _sample_metrics(samples, rewards, estimates) | _nonfinite_reward_metrics(rewards)
    # NaN rewards need not make the loss NaN (comparisons with NaN are just False), so they are checked apart.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (metrics["reward/nonfinite_prompts"] == 0)
    new_state = keep_if_finite(finite, new_state, state)
    metrics |= loss_metrics | {"loss/total": loss, "grad_norm": grad_norm,
                               "nonfinite": (~finite).astype(jnp.float32)}
    return new_state, metrics


def keep_if_finite(finite: jax.Array, new_state: TrainState, state: TrainState) -> TrainState:
  """Phase 7: `new_state` where `finite`, else `state` with only its step and rng advanced."""
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  return new_state.replace(params=keep(new_state.params, state.params),
                           anchor_params=keep(new_state.anchor_params, state.anchor_params),
                           opt_state=keep(new_state.opt_state, state.opt_state))


def _sample_metrics(samples: Samples, rewards: Rewards, estimates: Estimates) -> Metrics:
  """Rewards, lengths and entropy of the samples; with an anchor, its rewards and the policy's quantile."""
  policy = samples.policy
  generated = jnp.sum(policy.mask).astype(jnp.float32)
  metrics = {
      "reward/policy": jnp.mean(rewards.policy),
      "entropy/sequence": -jnp.mean(jnp.sum(policy.log_probs, axis=-1)),
      "length/policy": jnp.mean(jnp.sum(policy.mask, axis=-1)),
      "tokens/generated": generated,
  }
  if samples.anchor is not None:
    metrics |= {
        "reward/anchor": jnp.mean(rewards.anchor),
        "reward/anchor_best": jnp.mean(estimates.best_rewards),
        "quantile/policy_vs_anchor": jnp.mean(estimates.p_le),
        "tokens/generated": generated + jnp.sum(samples.anchor.mask),
    }
  return metrics


def make_train_step(config: ml_collections.ConfigDict, model_config: ModelConfig, reward_fn: RewardFn,
                    optimizer: optax.GradientTransformation) -> TrainStep:
  """The pure train step of `config.algorithm` (see `TrainStep`); validates the config's algorithm first."""
  algorithms.from_config(config)
  return TrainStep(config, model_config, reward_fn, optimizer)
