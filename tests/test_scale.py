"""Scale: the ZeRO-3 step on fsdp=8 against one device, its decoding loops free of collectives, micro-batches and
chunked logits against the unsplit computation, rematerialisation against none (all float32, a 2-layer model)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import hlo_collectives
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import train_step as train_step_lib
from bond_jax import trainer
from bond_jax.models import forward, init_params, positions_from_mask, tiny
from bond_jax.models import transformer

MODEL = tiny(stop_token_ids=(3,), pad_token_id=0)  # 2 layers, d_model 32, 4 query / 2 KV heads, vocabulary 64
REWARD_MODEL = tiny(head="score", num_kv_heads=4)
BATCH, PROMPT_LEN = 8, 6


def tiny_config(**memory):
  config = run_config.base_config()
  config.batch_size = BATCH
  config.data.prompt_len = PROMPT_LEN
  config.sampling.max_new_tokens = 5
  config.log_every = 1  # Every step computes the reference's log-probs too.
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 0
  config.anchor.eta = 0.5
  config.eval.num_ref_samples = 2
  config.eval.bon_ns = (2,)
  for field, value in memory.items():
    config.memory[field] = value
  return config


@pytest.fixture(scope="module")
def components():
  """Reference parameters (perturbed, so no weight is at its initial constant), a reward model and a batch of
  left- and right-padded prompts."""
  params = init_params(MODEL, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), params)
  reward_fn = rewards.reward_model(init_params(REWARD_MODEL, jax.random.key(2)), REWARD_MODEL)
  rng = np.random.default_rng(0)
  prompts = rng.integers(4, MODEL.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
  lengths = rng.integers(2, PROMPT_LEN + 1, BATCH)
  mask = np.arange(PROMPT_LEN) < lengths[:, None]
  mask[::2] = mask[::2, ::-1]  # Every other row left-padded.
  return params, reward_fn, {"prompts": jnp.asarray(prompts), "prompt_mask": jnp.asarray(mask)}


def one_device_steps(config, components, num_steps=2):
  """`num_steps` steps jitted on one device without a mesh: host copies of (state, metrics) after each."""
  params, reward_fn, batch = components
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  step = jax.jit(train_step_lib.make_train_step(config, MODEL, reward_fn, optimizer))
  state = train_state_lib.create_train_state(params, optimizer, seed=0)
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, params, batch)
    history.append(jax.device_get((state, metrics)))
  return history


@pytest.fixture(scope="module")
def one_device(components):
  return one_device_steps(tiny_config(), components)


@pytest.fixture(scope="module")
def fsdp8(components):
  """Two steps of the trainer's own compiled train step on an fsdp=8 mesh (the reward model sharded once, as
  `trainer.train` does), the second under `jax.transfer_guard("disallow")`; and the compiled programs."""
  params, reward_fn, batch = components
  config = tiny_config()
  mesh = sharding.make_mesh((1, 8, 1))
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  ref_params, param_shardings, state, state_shardings = trainer.sharded_train_state(config, params, optimizer, mesh)
  reward_fn = jax.device_put(reward_fn, sharding.param_shardings(reward_fn, mesh))
  batch_sharding = sharding.batch_sharding(mesh, 2)
  steps = trainer.compile_steps(config, MODEL, reward_fn, optimizer, mesh, state, ref_params, param_shardings,
                                state_shardings, batch_sharding, eval_prompts=None)
  batch = jax.device_put(batch, batch_sharding)
  history = []
  for step in range(2):
    with jax.transfer_guard("disallow" if step else "allow"):
      state, metrics = steps.train(state, ref_params, batch)
    history.append(jax.device_get((state, metrics)))
  return history, steps


def assert_trees_close(actual, expected, rtol, atol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), actual, expected)


def test_fsdp8_step_equals_one_device_and_copies_nothing_per_call(fsdp8, one_device):
  history, _ = fsdp8
  for (state, metrics), (expected_state, expected_metrics) in zip(history, one_device):
    assert_trees_close(metrics, expected_metrics, rtol=1e-4, atol=1e-5)
    assert_trees_close(state.params, expected_state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(state.anchor_params, expected_state.anchor_params, rtol=1e-4, atol=1e-5)
  assert history[1][1]["kl/policy_anchor"] != 0  # The second step's models differ: the comparison is not vacuous.


def test_decoding_loops_run_no_collectives_under_fsdp(fsdp8):
  _, steps = fsdp8
  for compiled, loops in ((steps.train.func, 2), (steps.evaluate.func, 2)):  # policy + anchor; policy + reference
    summary = hlo_collectives.summarize(compiled.as_text())
    assert summary.bytes_by_kind["all-gather"] > 0  # The weights are gathered (ZeRO-3), outside the loops.
    assert summary.data_dependent_loop_bytes == (0,) * loops


def test_fsdp8_sample_equals_one_device(components):
  params, _, batch = components
  config = sampling.SamplingConfig(max_new_tokens=6, num_samples=3, stop_token_ids=(3, 5, 7, 9, 11))
  draw = jax.jit(lambda p, b: sampling.sample(p, b["prompts"], b["prompt_mask"], jax.random.key(5), config, MODEL))
  expected = draw(params, batch)
  mesh = sharding.make_mesh((1, 8, 1))
  with jax.set_mesh(mesh):
    sharded = draw(jax.device_put(params, sharding.param_shardings(params, mesh)),
                   jax.device_put(batch, sharding.batch_sharding(mesh, 2)))
  np.testing.assert_array_equal(sharded.tokens, expected.tokens)
  np.testing.assert_array_equal(sharded.mask, expected.mask)
  np.testing.assert_allclose(sharded.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)
  assert not expected.mask.all()  # Some samples stopped early: the loops' stopping is exercised.


def phases_through_gradient(config, components):
  """Phases 1-4 of the first step, jitted: `(samples, rewards, estimates, ((loss, metrics), gradient))`."""
  params, reward_fn, batch = components
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  step = train_step_lib.make_train_step(config, MODEL, reward_fn, optimizer)

  @jax.jit
  def run(state, batch):
    samples = step.sample(state, batch, state.rng)
    scores = step.score(batch, samples)
    estimates = step.estimate(state, params, batch, samples, scores, with_reference=True)
    return samples, scores, estimates, step.gradient(state.params, batch, samples, scores, estimates)

  state = train_state_lib.create_train_state(params, optimizer, seed=0)
  state = state.replace(anchor_params=jax.tree.map(lambda x: 0.9 * x, state.anchor_params))  # An anchor apart.
  return run(state, batch)


def test_micro_batched_step_equals_the_unsplit_step(components):
  """Sampling, rewards, log-probs and the gradient accumulated over 4 micro-batches: J-BOND's batch baseline and
  every metric over the whole batch, as in one pass."""
  unsplit = phases_through_gradient(tiny_config(), components)
  split = phases_through_gradient(tiny_config(micro_batches=4, inference_micro_batches=2), components)
  jax.tree.map(np.testing.assert_array_equal, split[0].policy.tokens, unsplit[0].policy.tokens)
  jax.tree.map(np.testing.assert_array_equal, split[0].anchor.tokens, unsplit[0].anchor.tokens)
  assert_trees_close(split[1:3], unsplit[1:3], rtol=1e-5, atol=1e-5)
  (loss, metrics), grads = split[3]
  (expected_loss, expected_metrics), expected_grads = unsplit[3]
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert_trees_close(metrics, expected_metrics, rtol=1e-5, atol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected_grads))
  assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("remat", ["block", "matmuls"])
def test_remat_changes_no_gradient(components, remat):
  params, _, batch = components
  tokens, mask = batch["prompts"], batch["prompt_mask"]

  def loss(params, config):  # The mean log-likelihood of the next tokens.
    logits, _ = forward(params, config, tokens, positions_from_mask(mask), mask)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jnp.where(mask[:, 1:], log_probs, 0.0))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  expected = grad(params, MODEL)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
  assert_trees_close(grad(params, dataclasses.replace(MODEL, remat=remat)), expected, rtol=1e-4, atol=1e-6 * scale)


def test_logits_in_chunks_equal_whole(components, monkeypatch):
  """Log-probs, their gradient and the KL computed over chunks of positions equal those of the whole logits."""
  params, _, batch = components
  other = jax.tree.map(lambda x: 0.9 * x, params)
  out = sampling.sample(params, batch["prompts"], batch["prompt_mask"], jax.random.key(3),
                        sampling.SamplingConfig(max_new_tokens=7, num_samples=2), MODEL)
  args = (batch["prompts"], batch["prompt_mask"], out.tokens, out.mask)

  def computed():
    log_probs = lambda p: sampling.generation_log_probs(p, MODEL, *args)  # noqa: E731
    total, vjp = jax.vjp(lambda p: jnp.sum(log_probs(p)), params)
    return log_probs(params), vjp(jnp.float32(1))[0], sampling.generation_kl(params, other, MODEL, *args)

  whole = computed()
  position_bytes = BATCH * 2 * MODEL.vocab_size * 4  # One position's float32 logits of every sample.
  # Chunks of 3 positions for the log-probs (7 = 3 + 3 + 1), of 1 for the KL (two models' logits).
  monkeypatch.setattr(sampling, "LOGITS_CHUNK_BYTES", 3 * position_bytes)
  for fn in (sampling.generation_log_probs, sampling.generation_kl):
    fn.clear_cache()
  assert "length=3" in str(jax.make_jaxpr(lambda p: sampling.generation_log_probs(p, MODEL, *args))(params))
  log_probs, grads, kl = computed()
  assert_trees_close((log_probs, kl), (whole[0], whole[2]), rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(whole[1]))
  assert_trees_close(grads, whole[1], rtol=1e-4, atol=1e-5 * scale)  # Sums over chunks round differently.
  for fn in (sampling.generation_log_probs, sampling.generation_kl):
    fn.clear_cache()


@pytest.mark.parametrize("held_dtype", ["float32", "bfloat16"])
def test_chunked_log_prob_gradient_reduces_the_head_once_under_fsdp(components, monkeypatch, held_dtype):
  """Under fsdp=8 the gradient of log-probs computed over chunks of positions equals the unsplit one, and moves no
  more collective bytes: the gathered head's gradient is reduced once after the chunks' loop, not at every chunk.
  Weights held in bfloat16 (a frozen base's) take XLA's loop, which XLA's CPU compiler can compile."""
  params, _, batch = components
  params = transformer.cast_weights(params, held_dtype)
  out = sampling.sample(params, batch["prompts"], batch["prompt_mask"], jax.random.key(3),
                        sampling.SamplingConfig(max_new_tokens=7, num_samples=2), MODEL)
  mesh = sharding.make_mesh((1, 8, 1))
  params = jax.device_put(params, sharding.param_shardings(params, mesh))
  args = jax.device_put((batch["prompts"], batch["prompt_mask"], out.tokens, out.mask),
                        (sharding.batch_sharding(mesh, 2),) * 2 + (sharding.batch_sharding(mesh, 3),) * 2)

  def gradient_and_collective_bytes():
    sampling.generation_log_probs.clear_cache()
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.grad(lambda p: jnp.sum(sampling.generation_log_probs(p, MODEL, *args)))).lower(
          params).compile()
      return compiled(params), hlo_collectives.summarize(compiled.as_text()).total_bytes

  whole, whole_bytes = gradient_and_collective_bytes()
  monkeypatch.setattr(sampling, "LOGITS_CHUNK_BYTES", 1)  # One position per chunk: 7 chunks.
  chunked, chunked_bytes = gradient_and_collective_bytes()
  sampling.generation_log_probs.clear_cache()
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(whole))
  if held_dtype == "bfloat16":  # Sums over chunks round differently in bfloat16.
    assert_trees_close(chunked, whole, rtol=0.05, atol=0.02 * scale)
    return
  assert_trees_close(chunked, whole, rtol=1e-4, atol=1e-5 * scale)
  head_bytes = MODEL.vocab_size * MODEL.d_model * 4
  assert whole_bytes > head_bytes  # The weights are gathered and their gradients reduced.
  assert chunked_bytes <= whole_bytes + head_bytes  # Not 7 reductions of the head's gradient.


def test_log_prob_pass_gathers_each_weight_once_under_fsdp(components):
  """A forward-only log-prob pass (prompts, then their samples' tokens) all-gathers each fsdp-sharded weight at
  most once: its prompts and samples run through each layer together, and the embedding lookup reads the table
  sharded. A 3-layer model, so that the layers run as a scan."""
  _, _, batch = components
  model = tiny(num_layers=3, stop_token_ids=(3,), pad_token_id=0)
  params = init_params(model, jax.random.key(0))
  out = sampling.sample(params, batch["prompts"], batch["prompt_mask"], jax.random.key(3),
                        sampling.SamplingConfig(max_new_tokens=7, num_samples=2), model)
  mesh = sharding.make_mesh((1, 8, 1))
  shardings = sharding.param_shardings(params, mesh)
  args = jax.device_put((batch["prompts"], batch["prompt_mask"], out.tokens, out.mask),
                        (sharding.batch_sharding(mesh, 2),) * 2 + (sharding.batch_sharding(mesh, 3),) * 2)
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda p: sampling.generation_log_probs(p, model, *args)).lower(
        jax.device_put(params, shardings)).compile()
  gathered = hlo_collectives.summarize(compiled.as_text()).bytes_by_kind["all-gather"]
  sharded_weights = sum(x.nbytes for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings))
                        if "fsdp" in str(s.spec))
  assert 0.5 * sharded_weights < gathered <= sharded_weights
