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
    >>> from bond_jax import run_config
    >>> optimizer = make_optimizer(run_config.base_config().optimizer)   # 10 warm-up steps to 3e-4
    >>> params = {"w": jnp.zeros(1)}
    >>> opt_state = optimizer.init(params)
    >>> for _ in range(11):   # a constant gradient: each Adam step moves by the learning rate
    ...   updates, opt_state = optimizer.update({"w": jnp.array([10.0])}, opt_state, params)
    >>> round(float(updates["w"][0]), 8)   # step 10, the first after the warm-up
    -0.0003
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
  """A fresh train state whose policy and anchor start at `params` (the reference, for a new run).

  The state owns its buffers: policy and anchor are copies, never `params`' own arrays, so a step that donates
  the state (`jax.jit(step, donate_argnums=0)`) leaves the reference, passed beside it, alive.

  Example:
    >>> from bond_jax import run_config
    >>> ref_params = {"w": jnp.ones((2, 2))}
    >>> state = create_train_state(ref_params, make_optimizer(run_config.base_config().optimizer), seed=0)
    >>> step = jax.jit(lambda s, ref: s.replace(params=jax.tree.map(jnp.add, s.params, ref)), donate_argnums=0)
    >>> state = step(state, ref_params)
    >>> ref_params["w"].is_deleted(), float(state.params["w"][0, 0])
    (False, 2.0)
  """
  params = jax.tree.map(jnp.copy, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      anchor_params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
      rng=jax.random.PRNGKey(seed),
  )
