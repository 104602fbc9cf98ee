"""The exact-oracle task: 8 tokens, a few short prompts, and a seeded random reward on token ids.

Small enough that every generation can be enumerated (8**3 = 512 of 3 tokens), so `exact_oracle` gives the
exact Best-of-N distribution and KLs (`configs/exact.py`). The reward of a generation `y_1..y_T` after a prompt
ending in token `x` is

    r(x, y) = Σ_t POSITION[t, y_t] + TRANSITION[y_{t-1}, y_t],   y_0 = x,

with standard normal tables drawn from `np.random.default_rng(SEED)`: a first-order Markov score that depends
on the prompt, with no two generations of one prompt tied (continuous values; the position term separates
sequences that reuse the same transitions). `tied_reward` rounds it to integers: about ten levels, many ties.

`configure(config)` points a run config at the task (`configs/exact.py`, `configs/exact_iterative.py`).

Example:
  >>> from bond_jax import rewards
  >>> reward_fn = rewards.token_reward(reward)   # a RewardFn over [batch, samples, time] generations
  >>> reward_fn(jnp.array([[1, 2]]), jnp.ones((1, 2), bool), jnp.array([[[0, 5, 3]]]), jnp.ones((1, 1, 3), bool))
  Array([[-0.44452095]], dtype=float32)
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

VOCAB_SIZE = 8
MAX_LENGTH = 8  # Longest generation the position table covers.
SEED = 0
PROMPTS = ("1 2", "3 4", "5 6", "7 0")  # Distinct last tokens, so every prompt has its own reward landscape.

_TABLES = np.random.default_rng(SEED).normal(size=(MAX_LENGTH + VOCAB_SIZE, VOCAB_SIZE)).astype(np.float32)
POSITION, TRANSITION = _TABLES[:MAX_LENGTH], _TABLES[MAX_LENGTH:]


def configure(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets `config` (from `run_config.base_config()`) to train on this task with exact KLs; returns it.

  The reference is a random 2-layer transformer (seeded by `config.seed`) over `VOCAB_SIZE` tokens without EOS;
  the prompts are `PROMPTS` (inline, trained and measured on alike); generations have 3 tokens (512 per prompt);
  the reward is `reward`. Training-scale settings every exact run shares: 128 prompts per step (each prompt 32
  times), BOND with 4 policy and 8 anchor samples per prompt, the tie-aware rewards of BOND and J-BOND, Adam at
  3e-3, exact KLs every 10 steps; the algorithm, the anchor and the step count are left to the caller.

  Example:
    >>> from bond_jax import run_config
    >>> config = configure(run_config.base_config())
    >>> config.algorithm, config.bond.n = "bond", 4
    >>> config.policy.source, config.policy.model.vocab_size, config.sampling.max_new_tokens
    ('init', 8, 3)
  """
  config.batch_size = 128
  config.log_every = 20
  config.eval_every = 0
  config.eval_batches = 1

  config.policy.source = "init"
  config.policy.model.vocab_size = VOCAB_SIZE
  config.policy.model.num_layers = 2
  config.policy.model.d_model = 64
  config.policy.model.num_heads = 4
  config.policy.model.num_kv_heads = 4
  config.policy.model.head_dim = 16
  config.policy.model.mlp_dim = 128
  config.policy.model.max_seq_len = 8
  config.reward.kind = "python_tokens"
  config.reward.function = f"{__name__}:reward"
  config.data.source = "inline"
  config.data.prompts = PROMPTS
  config.data.prompt_len = 2
  config.sampling.max_new_tokens = 3

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 10
  config.bond.num_anchor_samples = 8
  config.bond.num_policy_samples = 4
  config.bond.reward_form = "tie_aware"
  config.jbond.reward_form = "tie_aware"
  config.eval.num_ref_samples = 16
  config.eval.bon_ns = (2, 4)
  config.exact.every = 10
  return config


def reward(prompts: jax.Array, prompt_mask: jax.Array, generations: jax.Array,
           generation_mask: jax.Array) -> jax.Array:
  """The task's reward, in the form `rewards.token_reward` takes.

  Args:
    prompts: `[n, prompt_len]` token ids in `[0, VOCAB_SIZE)`, left- or right-padded.
    prompt_mask: `[n, prompt_len]` bool, True on real tokens.
    generations: `[n, time]` token ids in `[0, VOCAB_SIZE)`, `time <= MAX_LENGTH`.
    generation_mask: `[n, time]` bool; masked tokens score nothing.

  Returns:
    `[n]` float32 rewards.

  Example:
    >>> reward(jnp.array([[1, 2]]), jnp.ones((1, 2), bool), jnp.array([[0, 5, 3]]), jnp.ones((1, 3), bool))
    Array([-0.44452095], dtype=float32)
  """
  time = generations.shape[1]
  if time > MAX_LENGTH:
    raise ValueError(f"generations have {time} tokens; the enumerable task's reward covers at most {MAX_LENGTH}.")
  last = jnp.argmax(jnp.arange(prompts.shape[1]) * prompt_mask, axis=1)
  previous = jnp.concatenate([jnp.take_along_axis(prompts, last[:, None], axis=1), generations[:, :-1]], axis=1)
  scores = jnp.asarray(POSITION)[jnp.arange(time), generations] + jnp.asarray(TRANSITION)[previous, generations]
  return jnp.sum(jnp.where(generation_mask, scores, 0.0), axis=1)


def tied_reward(prompts: jax.Array, prompt_mask: jax.Array, generations: jax.Array,
                generation_mask: jax.Array) -> jax.Array:
  """`reward` rounded to the nearest integer: the same task with many ties (same arguments and shapes).

  Example:
    >>> tied_reward(jnp.array([[1, 2]]), jnp.ones((1, 2), bool), jnp.array([[0, 5, 3]]), jnp.ones((1, 3), bool))
    Array([-0.], dtype=float32)
  """
  return jnp.round(reward(prompts, prompt_mask, generations, generation_mask))
