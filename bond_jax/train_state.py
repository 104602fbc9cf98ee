"""The train state (step, policy, EMA anchor, optimizer state, rng) and the optimizer that updates it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything a run checkpoints; the reference policy's params are kept apart (they never change).

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the policy's parameters.
    anchor_params: the anchor's parameters (EMA of the policy, the reference, or the last swap).
    opt_state: the optax state of `params`.
    rng: a raw `uint32[2]` PRNG key, split once per step.
  """

  step: jax.Array
  params: Params
  anchor_params: Params
  opt_state: optax.OptState
  rng: jax.Array


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up, then a constant or cosine-decaying learning rate, and optional global-norm clipping.

  Args:
    config: the `optimizer` group of the run config (`learning_rate`, `warmup_steps`, `decay_steps`,
      `weight_decay`, `b1`, `b2`, `grad_clip`).

  Example:
    >>> opt = make_optimizer(base_config().optimizer)
    >>> opt_state = opt.init(params)
  """
  after_warmup = (optax.cosine_decay_schedule(config.learning_rate, config.decay_steps) if config.decay_steps
                  else optax.constant_schedule(config.learning_rate))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)), after_warmup],
      boundaries=[config.warmup_steps])
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def create_train_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh train state whose anchor starts at the policy (both at the reference for a new run).

  Example:
    >>> state = create_train_state(ref_params, make_optimizer(config.optimizer), seed=0)
  """
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      anchor_params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
      rng=jax.random.PRNGKey(seed),
  )
