"""Reward functions with injected faults, named by tests as `config.reward.function = "faulty_rewards:<name>"`.

Texts (`reward.kind = "python"`) take `(prompts, generations)` lists; tokens (`"python_tokens"`) take
`(prompts [n, P], prompt_mask, generations [n, T], generation_mask)`.
"""

import jax.numpy as jnp

# Prompt text -> the reward every generation of that prompt gets; set by the test before training.
POISONED_PROMPTS: dict[str, float] = {}


def one_value(prompts, generations):
  """One reward for the whole batch instead of one per generation."""
  del prompts, generations
  return [0.5]


def words(prompts, generations):
  """Text where numbers belong."""
  del prompts
  return ["good"] * len(generations)


def poisoned(prompts, generations):
  """0 for every generation, except `POISONED_PROMPTS[prompt]` for the prompts listed there (NaN, inf, ...)."""
  del generations
  return [POISONED_PROMPTS.get(p, 0.0) for p in prompts]


def two_per_generation(prompts, prompt_mask, generations, generation_mask):
  """A token reward of shape `[n, 2]` instead of `[n]`."""
  del prompts, prompt_mask, generation_mask
  return jnp.zeros((generations.shape[0], 2))


# Every prompt text `recording` was called with, in order.
SEEN_PROMPTS: list[str] = []


def recording(prompts, generations):
  """0 for every generation; keeps the prompts it scores in `SEEN_PROMPTS`."""
  SEEN_PROMPTS.extend(prompts)
  return [0.0] * len(generations)
