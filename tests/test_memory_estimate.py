"""The memory estimate against XLA's own accounting of the compiled train step: the state parts equal the step's
arguments byte for byte, and the total bounds the step's whole footprint from above, within a band; the KV cache
against its closed form; and a run that cannot fit stops before compiling, in one line from the run script."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import pytest

from bond_jax import memory_estimate
from bond_jax import rewards
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import train_step as train_step_lib
from bond_jax import trainer
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
import tiny_run


# How far above XLA's plan for the train step (temporaries + arguments + outputs - donated) the estimate may be. It
# must never be below it: a run let through must fit. It is above by design: it adds the sampler's KV cache to the
# update's activations (XLA frees the cache first), counts evaluation's larger forward passes (4 policy samples per
# prompt against a J-BOND update's 2) and keeps as buffers temporaries that XLA may fuse away. Measured with XLA on
# CPU: 2.3x and 1.8x for the tiny J-BOND steps, whose 405-word vocabulary head dominates; 1.2x for the BOND step,
# whose weights dominate (it falls to 0.76x without the update's copies of the state); 1.1x to 1.8x for 2-layer
# models of d_model 128 to 256 and vocabularies of 1000 to 8000 over 4 to 8 devices, with and without fsdp and
# tensor axes, and 320-token sequences. It bounds the evaluation step too, whose KL holds two models' logits at once:
# 3.54x the tiny one-device J-BOND train step, whose head dominates.
MAX_OVERESTIMATE = 3.6


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _prompt_batch_bytes(config, mesh) -> int:
  """Per device: int32 prompts and bool prompt_mask, `[batch / (data x fsdp), prompt_len]` each."""
  prompts_per_device = config.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  return prompts_per_device * config.data.prompt_len * (4 + 1)


EVEN_TOKEN_REWARD = rewards.token_reward(tiny_run.even_token_reward)  # Jittable, no weights: no reward arguments.
STEP_AND_RNG_BYTES = 4 + 8  # TrainState.step, int32 scalar; TrainState.rng, uint32[2]; both replicated.


def compile_train_step(config, model_config, ref_params, reward_fn, mesh):
  """The train step compiled as the trainer jits it (reward first, state donated), from abstract inputs only.

  Returns:
    `(estimate, memory_analysis)` for the same inputs.
  """
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  init = functools.partial(train_state_lib.create_train_state, optimizer=optimizer, seed=config.seed)
  state = jax.eval_shape(init, ref_params)
  state_shardings = sharding.param_shardings(state, mesh)
  param_shardings = sharding.param_shardings(ref_params, mesh)
  reward_shardings = sharding.param_shardings(reward_fn, mesh)
  batch_sharding = sharding.batch_sharding(mesh, 2)
  shape = (config.batch_size, config.data.prompt_len)
  batch = {"prompts": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
           "prompt_mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sharding)}
  step = jax.jit(lambda reward, *args: train_step_lib.make_train_step(config, model_config, reward, optimizer)(*args),
                 in_shardings=(reward_shardings, state_shardings, param_shardings, {k: batch_sharding for k in batch}),
                 out_shardings=(state_shardings, None), donate_argnums=1)
  with jax.set_mesh(mesh):  # As the trainer compiles it: activations sharded by `sharding.ACTIVATION_RULES`.
    analysis = step.lower(_abstract(reward_fn, reward_shardings), _abstract(state, state_shardings),
                          _abstract(ref_params, param_shardings), batch).compile().memory_analysis()
  return memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh, reward_fn), analysis


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
  """The tiny policy's abstract parameters and config (1 layer, vocabulary 405, context 24)."""
  config = tiny_run.tiny_config(tiny_policy_dir)
  ref_params, model_config, _ = run_components.load_policy(config)
  return jax.eval_shape(lambda p: p, ref_params), model_config


@pytest.fixture(scope="module")
def reward_model_fn(policy):
  """A 1-layer reward model over the policy's vocabulary, abstract: its weights are arguments of the step."""
  _, model_config = policy
  rm_config = ModelConfig(vocab_size=model_config.vocab_size, num_layers=1, d_model=8, num_heads=2, num_kv_heads=2,
                          head_dim=4, mlp_dim=16, max_seq_len=model_config.max_seq_len, head="score")
  return rewards.reward_model(jax.eval_shape(lambda: transformer.init_params(rm_config, jax.random.PRNGKey(0))),
                              rm_config)


@pytest.fixture(scope="module", params=["one_device", "data_fsdp_tensor"])
def jbond_step(request, tiny_policy_dir, policy, reward_model_fn):
  """`(config, mesh, estimate, memory_analysis)` of the tiny J-BOND step: on one device with a token reward, and
  on a (2, 2, 2) mesh with a reward model (one compile fewer than both rewards on both meshes)."""
  config = tiny_run.tiny_config(tiny_policy_dir)
  if request.param == "one_device":
    mesh, reward_fn = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), EVEN_TOKEN_REWARD
  else:
    mesh, reward_fn = sharding.make_mesh((2, 2, 2)), reward_model_fn
  ref_params, model_config = policy
  return (config, mesh, *compile_train_step(config, model_config, ref_params, reward_fn, mesh))


@pytest.fixture(scope="module")
def bond_step(tiny_policy_dir):
  """BOND, Best-of-4 from 16 anchor samples, 12 new tokens, 1 prompt per device on an (8, 1, 1) mesh, with a model
  whose weights dominate (2.7M parameters, abstract: nothing is allocated), so the bound is tight there."""
  config = tiny_run.tiny_config(tiny_policy_dir, **{
      "algorithm": "bond", "bond.n": 4, "bond.num_anchor_samples": 16, "sampling.max_new_tokens": 12,
      "mesh_shape": (8, 1, 1)})
  model_config = ModelConfig(vocab_size=4096, num_layers=1, d_model=256, num_heads=4, num_kv_heads=2, head_dim=64,
                             mlp_dim=512, max_seq_len=32, stop_token_ids=(2,))
  ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.PRNGKey(0)))
  mesh = sharding.make_mesh(config.mesh_shape)
  return (config, mesh, *compile_train_step(config, model_config, ref_params, EVEN_TOKEN_REWARD, mesh))


def test_state_parts_are_the_step_arguments_byte_for_byte(jbond_step):
  config, mesh, estimate, analysis = jbond_step
  # The reward model's weights are arguments too (on the sharded mesh; the token reward has none).
  assert (estimate.reward_params > 0) == (mesh.size > 1)
  expected = (estimate.reference_params + estimate.policy_params + estimate.anchor_params + estimate.optimizer_state
              + estimate.reward_params + STEP_AND_RNG_BYTES + _prompt_batch_bytes(config, mesh))
  assert analysis.argument_size_in_bytes == expected
  # The donated state comes back in place: everything but the step's metrics is aliased.
  assert analysis.alias_size_in_bytes == (estimate.policy_params + estimate.anchor_params + estimate.optimizer_state
                                          + STEP_AND_RNG_BYTES)


def test_state_parts_on_one_device_and_sharded(policy, tiny_policy_dir):
  """On one device the parts are the pytrees' plain sizes; AdamW keeps two moments of the policy's shapes."""
  ref_params, model_config = policy
  config = tiny_run.tiny_config(tiny_policy_dir)
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ref_params))
  one = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer,
                                              sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  assert one.reference_params == one.policy_params == one.anchor_params == one.gradients == full
  assert 2 * full < one.optimizer_state < 2 * full + 64  # Two moments, plus a few scalar counters.
  assert one.decoding_params == 2 * full and one.reward_params == 0  # Two models' layers stacked for decoding.
  sharded = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer,
                                                  sharding.make_mesh((1, 4, 2)))
  assert full / 8 <= sharded.policy_params < full / 2
  assert sharded.decoding_params > sharded.policy_params  # Gathered over fsdp, still split over tensor.


def assert_bounds_what_xla_plans(estimate, analysis):
  planned = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes)
  ratio = estimate.total / planned
  assert 1.0 <= ratio <= MAX_OVERESTIMATE, f"estimate {estimate.total} against XLA's {planned}: {ratio:.2f}x"


def test_estimate_bounds_what_xla_plans_for_the_jbond_step(jbond_step):
  assert_bounds_what_xla_plans(*jbond_step[2:])


def test_estimate_bounds_what_xla_plans_for_the_bond_step(bond_step):
  assert_bounds_what_xla_plans(*bond_step[2:])


def test_kv_cache_is_the_largest_sampler_cache(policy, tiny_policy_dir):
  ref_params, model_config = policy  # 1 layer, 2 KV heads of 8 dims, float32.
  mesh = sharding.make_mesh((2, 2, 2))  # 8 prompts over data x fsdp = 4: 2 prompts per device.
  bytes_per_slot = 2 * 1 * 1 * 8 * 4 + 1  # Keys and values of every layer (2 KV heads over tensor 2), the bool mask.
  slots = 8 + 4 - 1  # prompt_len + max_new_tokens - 1.
  optimizer = train_state_lib.make_optimizer(run_config.base_config().optimizer)
  cases = [
      ({"algorithm": "bond", "bond.num_anchor_samples": 16}, 16),  # 16 anchor samples per prompt.
      ({"eval.num_ref_samples": 24}, 24),  # Evaluation draws 24 reference samples per prompt.
      ({}, 8),  # J-BOND's 1 + 2 samples are fewer than evaluation's 8 reference samples.
  ]
  for overrides, samples in cases:
    config = tiny_run.tiny_config(tiny_policy_dir, **overrides)
    estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh)
    assert estimate.kv_cache == 2 * samples * slots * bytes_per_slot, overrides
  # Sampled in 2 micro-batches: one prompt per device at a time.
  config = tiny_run.tiny_config(tiny_policy_dir, **{"memory.inference_micro_batches": 2})
  estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh)
  assert estimate.kv_cache == 1 * 2 * 4 * slots * bytes_per_slot
  bfloat16 = dataclasses.replace(model_config, dtype="bfloat16")
  assert memory_estimate.kv_cache_bytes(bfloat16, rows=3, slots=5) == 3 * 5 * (2 * 1 * 2 * 8 * 2 + 1)


def test_device_memory_limit():
  config = run_config.base_config()
  config.memory_limit_gib = 1.5
  assert memory_estimate.device_memory_limit(config) == (3 * 2 ** 29, "config.memory_limit_gib = 1.5")
  config.memory_limit_gib = 0.0
  limit = memory_estimate.device_memory_limit(config)  # CPU: no device limit; the host's RAM over 8 devices.
  host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert 0 < limit.bytes_per_device <= host_bytes // 8
  assert "8 local cpu device(s)" in limit.source


def test_check_fits_names_the_total_the_limit_and_the_parts():
  estimate = memory_estimate.MemoryEstimate(
      reference_params=2 ** 30, policy_params=2 ** 30, anchor_params=2 ** 30, optimizer_state=2 ** 31,
      reward_params=0, gradients=2 ** 30, optimizer_update=2 ** 32, decoding_params=0, kv_cache=2 ** 29,
      activations=3 * 2 ** 31)
  assert estimate.total == int(16.5 * 2 ** 30)
  memory_estimate.check_fits(estimate, memory_estimate.MemoryLimit(estimate.total, "enough"))
  with pytest.raises(memory_estimate.MemoryBudgetError) as error:
    memory_estimate.check_fits(estimate, memory_estimate.MemoryLimit(16 * 2 ** 30, "the device's own limit (H100)"))
  message = str(error.value)
  assert "16.5 GiB per device" in message and "16 GiB per device available (the device's own limit (H100))" in message
  assert "optimizer state 2, " in message and "KV cache 0.5, activations 6 GiB" in message
  assert "the largest part is activations" in message
  for advice in ("config.batch_size", "config.sampling.max_new_tokens", "bfloat16", "config.mesh_shape",
                 "config.memory_limit_gib"):
    assert advice in message
  assert "\n" not in message


def test_trainer_refuses_a_run_that_cannot_fit_before_compiling(tiny_policy_dir, prompt_data_dir, tmp_path):
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, memory_limit_gib=1e-6)
  workdir = str(tmp_path / "run")
  with pytest.raises(memory_estimate.MemoryBudgetError) as error:
    trainer.train(config, workdir)
  ref_params, model_config, tokenizer = run_components.load_policy(config)
  expected = memory_estimate.estimate_train_memory(
      config, model_config, ref_params, train_state_lib.make_optimizer(config.optimizer),
      sharding.make_mesh(config.mesh_shape), run_components.load_reward(config, tokenizer))
  message = str(error.value)
  assert str(expected) in message and "GiB per device" in message and "activations" in message
  assert "(config.memory_limit_gib = 1e-06)" in message
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # Stopped before the train state existed.


def test_run_script_reports_a_run_that_cannot_fit_in_one_line(tiny_policy_dir, prompt_data_dir, tmp_path):
  flags = tiny_run.command_line_flags(tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir))
  last_line = tiny_run.run_script_error(str(tmp_path / "run"), [*flags, "--config.memory_limit_gib=0.000001"])
  assert last_line.startswith("error: the run needs an estimated "), last_line
  assert "GiB per device" in last_line and "config.memory_limit_gib = 1e-06" in last_line
