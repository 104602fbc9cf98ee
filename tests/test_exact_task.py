"""The exact-oracle task's wiring: its reward, the id tokenizer, the "init" policy, inline prompts, token rewards,
the decaying learning rate, and the shipped exact configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shipped_configs
from bond_jax import exact_oracle
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import train_state
from bond_jax.data import id_tokenizer
from bond_jax.tasks import enumerable


def test_reward_matches_its_definition_written_as_loops():
  rng = np.random.default_rng(0)
  prompts = np.array([[0, 3, 5], [2, 6, 1]])
  prompt_mask = np.array([[False, True, True], [True, True, False]])  # Left- and right-padded.
  generations = rng.integers(0, enumerable.VOCAB_SIZE, (2, 4))
  generation_mask = np.array([[True] * 4, [True, True, False, False]])
  got = enumerable.reward(jnp.asarray(prompts), jnp.asarray(prompt_mask), jnp.asarray(generations),
                          jnp.asarray(generation_mask))
  for row in range(2):
    previous = prompts[row][prompt_mask[row]][-1]
    expected = 0.0
    for t in range(4):
      if generation_mask[row, t]:
        token = generations[row, t]
        expected += enumerable.POSITION[t, token] + enumerable.TRANSITION[previous, token]
        previous = token
    np.testing.assert_allclose(float(got[row]), expected, rtol=1e-6)


def test_reward_separates_every_generation_and_the_tied_variant_does_not():
  generations = exact_oracle.all_generations(enumerable.VOCAB_SIZE, 3)
  ones = jnp.ones(generations.shape, bool)
  for prompt in enumerable.PROMPTS:
    prompts = jnp.tile(jnp.array([[int(t) for t in prompt.split()]]), (len(generations), 1))
    args = (prompts, jnp.ones(prompts.shape, bool), generations, ones)
    assert len(np.unique(np.asarray(enumerable.reward(*args)))) == len(generations)
    assert len(np.unique(np.asarray(enumerable.tied_reward(*args)))) < len(generations) // 10
  with pytest.raises(ValueError, match="at most"):
    enumerable.reward(prompts[:1], jnp.ones((1, 2), bool), jnp.zeros((1, 9), jnp.int32), jnp.ones((1, 9), bool))


def test_id_tokenizer_round_trips_and_names_bad_input():
  tokenizer = id_tokenizer.IdTokenizer(8)
  assert tokenizer.encode(" 3 1  4 ") == [3, 1, 4]
  assert tokenizer.batch_decode([[3, 1, 4], [0]], skip_special_tokens=True) == ["3 1 4", "0"]
  with pytest.raises(ValueError, match="integers"):
    tokenizer.encode("3 x")
  with pytest.raises(ValueError, match="vocab_size=8"):
    tokenizer.encode("3 8")


def test_components_of_the_exact_config(tmp_path):
  config = shipped_configs.load("exact")
  params, model_config, tokenizer = run_components.load_policy(config)
  assert isinstance(tokenizer.tokenizer, id_tokenizer.IdTokenizer) and model_config.stop_token_ids == ()
  assert model_config.vocab_size == enumerable.VOCAB_SIZE == params["embedder"]["embedding"].shape[0]
  train, held_out = run_components.load_prompts(config, tokenizer, model_config, str(tmp_path))
  for prompts in (train, held_out):
    batch = next(prompts)
    assert set(batch["text"]) == set(enumerable.PROMPTS)
    np.testing.assert_array_equal(batch["prompts"], [[int(t) for t in text.split()] for text in batch["text"]])
  reward_fn = jax.jit(run_components.load_reward(config, tokenizer))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8, (len(batch["text"]), 2, 3)), jnp.int32)
  rewards = reward_fn(jnp.asarray(batch["prompts"]), jnp.asarray(batch["prompt_mask"]), tokens,
                      jnp.ones(tokens.shape, bool))
  expected = enumerable.reward(jnp.repeat(jnp.asarray(batch["prompts"]), 2, axis=0), jnp.ones((2 * 128, 2), bool),
                               tokens.reshape(-1, 3), jnp.ones((2 * 128, 3), bool))
  np.testing.assert_allclose(rewards, expected.reshape(-1, 2), rtol=1e-6)


@pytest.mark.parametrize("name", ["exact", "exact_iterative"])
def test_exact_configs_are_valid(name):
  for num_devices in (1, 8):
    run_config.validate(shipped_configs.load(name), num_devices)


@pytest.mark.parametrize("field,value,named", [
    ("data.prompts", (), "data.prompts"),
    ("sampling.top_k", 4, "sampling.top_k"),
    ("reward.function", "no_colon", "reward.function"),
    ("optimizer.decay_steps", -1, "optimizer.decay_steps"),
    ("policy.model.d_model", 0, "policy.model.d_model"),
    ("exact.bon_ns", (2, 0), "exact.bon_ns"),
])
def test_bad_exact_fields_are_named(field, value, named):
  config = shipped_configs.load("exact")
  group, _, leaf = field.rpartition(".")
  node = config
  for part in group.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(run_config.ConfigError, match=f"^config.{named} "):
    run_config.validate(config, 1)


def _learning_rates(config, steps: int) -> list[float]:
  """The optimizer's step sizes: with b1 = b2 = 0 Adam moves by lr * sign(gradient) (up to eps)."""
  config.b1 = config.b2 = 0.0
  optimizer = train_state.make_optimizer(config)
  param = jnp.zeros(())
  opt_state = optimizer.init(param)
  rates = []
  for _ in range(steps):
    updates, opt_state = optimizer.update(jnp.ones(()), opt_state, param)
    rates.append(-float(updates))
  return rates


def test_decay_steps_give_warmup_then_cosine_to_zero():
  config = run_config.base_config().optimizer
  config.learning_rate, config.warmup_steps, config.decay_steps, config.grad_clip = 0.1, 4, 8, 0.0
  warmup = [0.1 * t / 4 for t in range(4)]
  cosine = [0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(9)]
  np.testing.assert_allclose(_learning_rates(config, 14), warmup + cosine + [0.0], atol=1e-6)
  config.decay_steps = 0
  np.testing.assert_allclose(_learning_rates(config, 14), warmup + [0.1] * 10, atol=1e-6)
