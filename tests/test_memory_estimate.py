"""The memory estimate against XLA's own accounting of the train and evaluation steps as the trainer compiles them,
on data, fsdp, tensor and mixed meshes at real widths: the state parts equal the train step's arguments byte for
byte, and the estimate bounds each step's whole footprint from above, within a band; the KV cache against its
closed form; and a run that cannot fit stops before compiling, in one line from the run script."""

import dataclasses
import os
from unittest import mock

import jax
import pytest

from bond_jax import memory_estimate
from bond_jax import rewards
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import trainer
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
import compiled_steps
import tiny_run


# The estimate must never be below XLA's plan of either step (a run let through must fit) and, as the issue asks, at
# most 1.3x the larger: measured 1.12x (fsdp), 1.26x (tensor) and 1.16x (mixed) at these 4-layer shapes of real
# widths, and 1.0-1.1x at Gemma-2B's and the Llamas' (benchmarks/RESULTS.md, "Memory estimate"; XLA on CPU,
# 2026-11-30). The data-parallel case is 1.45x: there XLA writes the optimizer update over the donated, replicated
# state in place, while at Gemma-2B's shapes on the same mesh it holds a copy (0.76x without counting one).
MAX_OVERESTIMATE = 1.3
MAX_OVERESTIMATE_OF = {"data": 1.5}

# Real widths (Gemma-2B's d_model, heads of 256), few layers and tokens: weights and their copies dominate, as at
# scale; a tiny width's plan is dominated by small buffers the estimate does not model.
MODEL = ModelConfig(vocab_size=32768, num_layers=4, d_model=2048, num_heads=8, num_kv_heads=2, head_dim=256,
                    mlp_dim=8192, max_seq_len=32, stop_token_ids=(2,))
# Mesh (data, fsdp, tensor) -> what the case exercises besides it: J-BOND unless said, 16 prompts of 8 tokens, 8 new.
MESH_CASES = {
    "data": ((8, 1, 1), {"algorithm": "bond", "memory.remat": "block", "memory.micro_batches": 2}),
    "fsdp": ((1, 8, 1), {"policy.lora.rank": 4, "reward": "model"}),
    "tensor": ((1, 4, 2), {"memory.remat": "matmuls", "chunked_logits": True}),
    "mixed": ((2, 2, 2), {"reward": "model", "memory.inference_micro_batches": 2}),
}
LOGITS_CHUNK_BYTES = 4096  # Small enough to split every pass's logits into several chunks of positions.


def _prompt_batch_bytes(config, mesh) -> int:
  """Per device: int32 prompts and bool prompt_mask, `[batch / (data x fsdp), prompt_len]` each."""
  prompts_per_device = config.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  return prompts_per_device * config.data.prompt_len * (4 + 1)


EVEN_TOKEN_REWARD = rewards.token_reward(tiny_run.even_token_reward)  # Jittable, no weights: no reward arguments.
STEP_AND_RNG_BYTES = 4 + 8  # TrainState.step, int32 scalar; TrainState.rng, uint32[2]; both replicated.


def _reward_model():
  """A 1-layer reward model over `MODEL`'s vocabulary, abstract: its weights are arguments of the steps."""
  rm_config = ModelConfig(vocab_size=MODEL.vocab_size, num_layers=1, d_model=1024, num_heads=4, num_kv_heads=2,
                          head_dim=256, mlp_dim=4096, max_seq_len=MODEL.max_seq_len, head="score")
  return rewards.reward_model(jax.eval_shape(lambda: transformer.init_params(rm_config, jax.random.PRNGKey(1))),
                              rm_config)


@pytest.fixture(scope="module", params=list(MESH_CASES))
def mesh_step(request):
  """`(case, config, mesh, compiled_steps.CompiledSteps)` of a case of `MESH_CASES`, compiled by the trainer."""
  mesh_shape, overrides = MESH_CASES[request.param]
  overrides = dict(overrides)
  reward_fn = _reward_model() if overrides.pop("reward", "") == "model" else EVEN_TOKEN_REWARD
  chunk = LOGITS_CHUNK_BYTES if overrides.pop("chunked_logits", False) else sampling.LOGITS_CHUNK_BYTES
  config = tiny_run.tiny_config("/abstract", **{"batch_size": 16, "sampling.max_new_tokens": 8,
                                                "mesh_shape": mesh_shape, **overrides})
  run_config.validate(config, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape)
  model_config = dataclasses.replace(MODEL, remat=config.memory.remat)
  ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.PRNGKey(0)))
  with mock.patch.object(sampling, "LOGITS_CHUNK_BYTES", chunk):
    return request.param, config, mesh, compiled_steps.compile_abstract(config, model_config, ref_params, reward_fn,
                                                                        mesh)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
  """The tiny policy's abstract parameters and config (1 layer, vocabulary 405, context 24)."""
  config = tiny_run.tiny_config(tiny_policy_dir)
  ref_params, model_config, _ = run_components.load_policy(config)
  return jax.eval_shape(lambda p: p, ref_params), model_config


def test_state_parts_are_the_step_arguments_byte_for_byte(mesh_step):
  _, config, mesh, steps = mesh_step
  estimate, analysis = steps.estimate, steps.train.memory_analysis()
  # The reward model's weights are arguments too (the token reward has none).
  assert (estimate.reward_params > 0) == bool(jax.tree.leaves(steps.inputs.reward_fn))
  expected = (estimate.reference_params + estimate.policy_params + estimate.anchor_params + estimate.optimizer_state
              + estimate.reward_params + STEP_AND_RNG_BYTES + _prompt_batch_bytes(config, mesh))
  assert analysis.argument_size_in_bytes == expected
  # The donated state comes back in place: everything but the step's metrics is aliased.
  assert analysis.alias_size_in_bytes == (estimate.policy_params + estimate.anchor_params + estimate.optimizer_state
                                          + STEP_AND_RNG_BYTES)


def test_estimate_bounds_what_xla_plans_for_the_train_and_evaluation_steps(mesh_step):
  case, _, _, steps = mesh_step
  estimate = steps.estimate
  train = estimate.total_at(memory_estimate.TRAIN_STEP)
  evaluation = estimate.total_at(*memory_estimate.EVAL_PHASES)
  assert train >= steps.planned_train and evaluation >= steps.planned_eval, (
      f"{case}: train {train} B against XLA's {steps.planned_train} B, evaluation {evaluation} B against "
      f"{steps.planned_eval} B")
  ratio = estimate.total / steps.planned
  assert 1.0 <= ratio <= MAX_OVERESTIMATE_OF.get(case, MAX_OVERESTIMATE), (
      f"{case}: estimate {estimate.total} B against XLA's {steps.planned} B: {ratio:.2f}x")


def test_state_parts_on_one_device_and_sharded(policy, tiny_policy_dir):
  """On one device the parts are the pytrees' plain sizes; AdamW keeps two moments of the policy's shapes."""
  ref_params, model_config = policy
  config = tiny_run.tiny_config(tiny_policy_dir)
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ref_params))
  one = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer,
                                              sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  train = one.steps[memory_estimate.TRAIN_STEP]
  assert one.reference_params == one.policy_params == one.anchor_params == train.gradients == full
  assert 2 * full < one.optimizer_state < 2 * full + 64  # Two moments, plus a few scalar counters.
  assert train.decoding_params == 2 * full and one.reward_params == 0  # Two models' layers stacked for decoding.
  sharded = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer,
                                                  sharding.make_mesh((1, 4, 2)))
  assert full / 8 <= sharded.policy_params < full / 2
  # Gathered over fsdp, still split over tensor.
  assert 2 * sharded.policy_params < sharded.steps[memory_estimate.EVAL_SAMPLING].decoding_params < 2 * full


def test_kv_cache_is_each_steps_sampler_cache(policy, tiny_policy_dir):
  ref_params, model_config = policy  # 1 layer, 2 KV heads of 8 dims, float32.
  mesh = sharding.make_mesh((2, 2, 2))  # 8 prompts over data x fsdp = 4: 2 prompts per device.
  bytes_per_slot = 2 * 1 * 1 * 8 * 4 + 1  # Keys and values of every layer (2 KV heads over tensor 2), the bool mask.
  slots = 8 + 4 - 1  # prompt_len + max_new_tokens - 1.
  optimizer = train_state_lib.make_optimizer(run_config.base_config().optimizer)
  kv_cache = lambda estimate, step: estimate.steps[step].kv_cache  # noqa: E731
  cases = [  # Samples per prompt of the train step's and the evaluation's sampler.
      ({"algorithm": "bond", "bond.num_anchor_samples": 16}, 16, 8),  # 16 anchor samples; 8 reference samples.
      ({"eval.num_ref_samples": 24}, 2, 24),  # J-BOND: 1 policy and 2 anchor samples; 24 reference samples.
  ]
  for overrides, train_samples, eval_samples in cases:
    config = tiny_run.tiny_config(tiny_policy_dir, **overrides)
    estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh)
    assert kv_cache(estimate, memory_estimate.TRAIN_STEP) == 2 * train_samples * slots * bytes_per_slot, overrides
    assert kv_cache(estimate, memory_estimate.EVAL_SAMPLING) == 2 * eval_samples * slots * bytes_per_slot, overrides
  # Sampled in 2 micro-batches: one prompt per device at a time.
  config = tiny_run.tiny_config(tiny_policy_dir, **{"memory.inference_micro_batches": 2})
  estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh)
  assert kv_cache(estimate, memory_estimate.EVAL_SAMPLING) == 1 * 8 * slots * bytes_per_slot
  # Evaluated in batches of 16 held-out prompts: 4 per device; the train step keeps its 2.
  config = tiny_run.tiny_config(tiny_policy_dir, **{"eval.batch_size": 16})
  estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh)
  assert kv_cache(estimate, memory_estimate.EVAL_SAMPLING) == 4 * 8 * slots * bytes_per_slot
  assert kv_cache(estimate, memory_estimate.TRAIN_STEP) == 2 * 2 * slots * bytes_per_slot
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
  train = memory_estimate.StepMemory(gradients=2 ** 30, optimizer_update=2 ** 32, kv_cache=2 ** 29,
                                     activations=3 * 2 ** 31)
  evaluation = memory_estimate.StepMemory(decoding_params=2 ** 31, activations=2 ** 33)  # 10 GiB, below 11.5.
  estimate = memory_estimate.MemoryEstimate(
      reference_params=2 ** 30, policy_params=2 ** 30, anchor_params=2 ** 30, optimizer_state=2 ** 31,
      reward_params=0, steps={memory_estimate.TRAIN_STEP: train, memory_estimate.EVAL_KL: evaluation})
  assert estimate.total == int(16.5 * 2 ** 30) and estimate.peak_step == memory_estimate.TRAIN_STEP
  memory_estimate.check_fits(estimate, memory_estimate.MemoryLimit(estimate.total, "enough"))
  with pytest.raises(memory_estimate.MemoryBudgetError) as error:
    memory_estimate.check_fits(estimate, memory_estimate.MemoryLimit(16 * 2 ** 30, "the device's own limit (H100)"))
  message = str(error.value)
  assert "16.5 GiB per device at the train step" in message
  assert "16 GiB per device available (the device's own limit (H100))" in message
  assert "optimizer state 2, " in message and "KV cache 0.5, activations 6 GiB" in message
  assert "the largest part is activations" in message
  for advice in ("config.memory.micro_batches", "config.batch_size", "config.sampling.max_new_tokens", "bfloat16",
                 "config.mesh_shape", "config.memory_limit_gib"):
    assert advice in message
  assert "\n" not in message
  # Where an evaluation phase is the peak, the message names it and what shrinks it.
  evaluation = memory_estimate.StepMemory(decoding_params=2 ** 31, activations=2 ** 34)  # 18 GiB, above 11.5.
  estimate = dataclasses.replace(estimate, steps={memory_estimate.TRAIN_STEP: train,
                                                  memory_estimate.EVAL_KL: evaluation})
  with pytest.raises(memory_estimate.MemoryBudgetError) as error:
    memory_estimate.check_fits(estimate, memory_estimate.MemoryLimit(16 * 2 ** 30, "16 GiB"))
  message = str(error.value)
  assert "23 GiB per device at the evaluation's KL (" in message
  assert "decoding parameters 2, activations 16 GiB" in message
  assert "gradients" not in message and "config.memory.inference_micro_batches" in message
  assert "config.eval.batch_size" in message


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


def test_reward_pass_bounds_xla_for_a_retokenized_reward_model():
  """A re-tokenized reward model scores every sample as a full row of its own `max_len` tokens, not a shared prompt
  and a generation: the estimate's reward pass bounds XLA's temporaries for it even where `max_len` is far longer
  than the policy's prompt and generation."""
  from bond_jax.data import id_tokenizer  # pylint: disable=g-import-not-at-top
  from bond_jax.tasks import default_assets  # pylint: disable=g-import-not-at-top
  reward_tokenizer = default_assets.load_tokenizer()
  config = ModelConfig(vocab_size=len(reward_tokenizer), num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       head_dim=16, mlp_dim=128, max_seq_len=128, head="score")
  reward_fn = rewards.retokenized_reward_model(transformer.init_params(config, jax.random.key(0)), config,
                                               reward_tokenizer, id_tokenizer.IdTokenizer(8), max_len=128)
  prompts, samples, prompt_len, new_tokens = 4, 4, 4, 4
  batch = (jax.numpy.ones((prompts, prompt_len), "int32"), jax.numpy.ones((prompts, prompt_len), bool),
           jax.numpy.ones((prompts, samples, new_tokens), "int32"),
           jax.numpy.ones((prompts, samples, new_tokens), bool))
  planned = jax.jit(lambda fn, *b: fn(*b)).lower(reward_fn, *batch).compile().memory_analysis().temp_size_in_bytes
  reward_pass_bytes = memory_estimate._reward_pass_bytes  # pylint: disable=protected-access
  estimated = reward_pass_bytes(reward_fn, prompts, samples, prompt_len, new_tokens, tensor=1)
  assert planned <= estimated <= 3 * planned  # Laid out as a shared prompt and generations: 30x below.
