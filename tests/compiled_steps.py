"""The trainer's own train and evaluation steps, compiled from abstract shapes (nothing is allocated or read), with
the run's memory estimate for the same inputs: what the memory tests and benchmarks compare the estimate with.

The steps are compiled by `trainer.compile_steps` for `memory_estimate.abstract_step_inputs`, so they are the
programs a run executes (on the mesh, with its activation shardings, the state donated).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bond_jax import fine_tuning
from bond_jax import lora
from bond_jax import memory_estimate
from bond_jax import sharding
from bond_jax import train_state
from bond_jax import trainer


class CompiledSteps(NamedTuple):
  """A run's compiled train and evaluation steps and its estimate, for the same abstract inputs."""

  train: Any  # jax.stages.Compiled
  evaluate: Any
  estimate: memory_estimate.MemoryEstimate
  inputs: memory_estimate.StepInputs

  @property
  def planned_train(self) -> int:
    """XLA's plan per device of the train step (`memory_estimate.planned_bytes`)."""
    return memory_estimate.planned_bytes(self.train)

  @property
  def planned_eval(self) -> int:
    """XLA's plan per device of the evaluation step, with the anchor and the optimizer state, which are not its
    arguments but stay on the devices while it runs."""
    idle = (self.inputs.state.anchor_params, self.inputs.state.opt_state)
    shardings = (self.inputs.state_shardings.anchor_params, self.inputs.state_shardings.opt_state)
    return memory_estimate.planned_bytes(self.evaluate) + memory_estimate.per_device_bytes(idle, shardings)

  @property
  def planned(self) -> int:
    """The run's footprint per device as XLA plans it: the larger of the two steps'."""
    return max(self.planned_train, self.planned_eval)


def abstract_setup(config, ref_params):
  """`fine_tuning.setup` on abstract parameters: `(frozen, initial)` (no fingerprint: nothing to read)."""
  tuning = fine_tuning.from_config(config)
  if isinstance(tuning, fine_tuning.FullFineTune):
    return ref_params, None
  initial = jax.eval_shape(lambda p: lora.init_adapter(p, tuning, jax.random.PRNGKey(0)), ref_params)
  dtype = jnp.dtype(config.policy.dtype) if config.policy.lora.base_in_compute_dtype else None
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if dtype and x.ndim >= 2 else x.dtype), ref_params)
  return lora.Frozen(base), initial


def compile_abstract(config, model_config, ref_params, reward_fn, mesh) -> CompiledSteps:
  """Compiles a run's steps for `ref_params` (the reference's parameters, abstract; under LoRA the base, set up as
  `abstract_setup` does) and `reward_fn` (its leaves may be abstract) on `mesh`, and estimates its memory."""
  frozen, initial = abstract_setup(config, ref_params)
  optimizer = train_state.make_optimizer(config.optimizer)
  estimate = memory_estimate.estimate_train_memory(config, model_config, frozen, optimizer, mesh, reward_fn, initial)
  inputs = memory_estimate.abstract_step_inputs(config, frozen, optimizer, mesh, reward_fn, initial)
  steps = trainer.compile_steps(config, model_config, inputs.reward_fn, optimizer, mesh, inputs.state,
                                inputs.ref_params, inputs.param_shardings, inputs.state_shardings,
                                sharding.batch_sharding(mesh, 2), eval_prompts=None)
  return CompiledSteps(steps.train.func, steps.evaluate.func, estimate, inputs)
