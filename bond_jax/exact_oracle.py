"""Exact Best-of-N quantities on a generation space small enough to enumerate (docs/method.md, "Exact
oracles").

With a vocabulary of V tokens, generations of exactly T tokens (no EOS) and a handful of prompts, every one of
the `V**T` generations can be scored: the policy's, the reference's and Best-of-N's probabilities are then exact,
and so are the KL divergences between them. These are the oracles the trained policy is measured against.

Example:
  >>> from bond_jax.models import config as model_config_lib, transformer
  >>> model_config = model_config_lib.tiny(vocab_size=8)
  >>> params, ref_params = (transformer.init_params(model_config, jax.random.key(seed)) for seed in (0, 1))
  >>> prompts, prompt_mask = jnp.array([[1, 2], [3, 4]]), jnp.ones((2, 2), bool)
  >>> generations = all_generations(vocab_size=8, length=3)                        # [512, 3]
  >>> log_pi = enumerated_log_probs(params, model_config, prompts, prompt_mask, generations)   # [batch, 512]
  >>> log_ref = enumerated_log_probs(ref_params, model_config, prompts, prompt_mask, generations)
  >>> rewards = jnp.broadcast_to(generations.sum(-1).astype(jnp.float32), log_ref.shape)   # a token-sum reward
  >>> log_bon = bon_log_probs(log_ref, rewards, n=4)
  >>> kl_divergence(log_pi, log_bon).shape                                         # [batch], nats
  (2,)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import quantiles
from bond_jax import sampling
from bond_jax.models.config import ModelConfig

MAX_GENERATIONS = 1 << 16  # Beyond this, enumerating every generation is no longer a cheap oracle.


def num_generations(vocab_size: int, length: int) -> int:
  """`vocab_size ** length`, checked against `MAX_GENERATIONS`; ValueError naming the argument otherwise.

  Example:
    >>> num_generations(8, 3)
    512
  """
  for name, value in (("vocab_size", vocab_size), ("length", length)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  count = vocab_size ** length
  if count > MAX_GENERATIONS:
    raise ValueError(f"vocab_size={vocab_size} ** length={length} = {count} generations is too many to enumerate "
                     f"(at most {MAX_GENERATIONS}).")
  return count


def all_generations(vocab_size: int, length: int) -> jax.Array:
  """Every token sequence of `length` tokens over `vocab_size` ids, in lexicographic order.

  Returns:
    `[vocab_size**length, length]` int32; row `i` spells `i` in base `vocab_size`, most significant token first.

  Example:
    >>> all_generations(2, 2).tolist()
    [[0, 0], [0, 1], [1, 0], [1, 1]]
  """
  count = num_generations(vocab_size, length)
  powers = vocab_size ** np.arange(length - 1, -1, -1)
  return jnp.asarray((np.arange(count)[:, None] // powers) % vocab_size, jnp.int32)


def enumerated_log_probs(params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                         generations: jax.Array, sampling_config: sampling.SamplingConfig | None = None,
                         ) -> jax.Array:
  """`log π(y | x)` of every generation `y` for every prompt `x`, by one forward over prompt + generation.

  The generations sum to probability 1 per prompt only when they are the whole space (`all_generations`) and
  the model has no EOS to stop early.

  Args:
    params: the policy's parameters (head "lm").
    model_config: its config.
    prompts: `[batch, prompt_len]` int32, left- or right-padded.
    prompt_mask: `[batch, prompt_len]` bool.
    generations: `[num_generations, time]` int32, every generation (shared by all prompts).
    sampling_config: the sampling distribution to enumerate (its temperature applied; see
      `sampling.generation_log_probs`), or None for the model's own.

  Returns:
    `[batch, num_generations]` float32 sequence log-probabilities.

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> model_config = model_config_lib.tiny(vocab_size=8)
    >>> params = transformer.init_params(model_config, jax.random.key(0))
    >>> log_pi = enumerated_log_probs(params, model_config, jnp.array([[1, 2]]), jnp.ones((1, 2), bool),
    ...                               all_generations(8, 3))
    >>> float(jax.nn.logsumexp(log_pi))   # every generation of 3 tokens: probability 1
    0.0
  """
  chex.assert_rank([prompts, prompt_mask, generations], 2)
  tokens = jnp.broadcast_to(generations, (prompts.shape[0],) + generations.shape)
  token_log_probs = sampling.generation_log_probs(params, model_config, prompts, prompt_mask, tokens,
                                                  jnp.ones(tokens.shape, bool), sampling_config)
  return jnp.sum(token_log_probs, axis=-1)


def _row_quantiles(probs: jax.Array, rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  order = jnp.argsort(rewards)
  sorted_rewards = rewards[order]
  cdf = jnp.concatenate([jnp.zeros((1,), probs.dtype), jnp.cumsum(probs[order])])
  p_lt = cdf[jnp.searchsorted(sorted_rewards, rewards, side="left")]
  p_le = cdf[jnp.searchsorted(sorted_rewards, rewards, side="right")]
  return p_lt, p_le


def exact_quantiles(ref_log_probs: jax.Array, rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact `p_lt(y) = P[r(y') < r(y)]` and `p_le(y) = P[r(y') <= r(y)]` for `y' ~ π_ref`, over a whole space.

  One sort and cumulative sum per row (ties share one block of the CDF), so `p_le - p_lt` is exactly the
  reference mass of `y`'s reward level, which includes `π_ref(y)` itself.

  Args:
    ref_log_probs: `[..., num_generations]` `log π_ref(y)` of every generation (each row sums to 1 in
      probability).
    rewards: `[..., num_generations]` `r(y)`, same shape.

  Returns:
    `(p_lt, p_le)`, each `[..., num_generations]` float32.

  Example:
    >>> p_lt, p_le = exact_quantiles(jnp.log(jnp.array([.5, .25, .25])), jnp.array([1., 0., 1.]))
    >>> p_lt.tolist(), p_le.tolist()
    ([0.25, 0.0, 0.25], [1.0, 0.25, 1.0])
  """
  chex.assert_equal_shape([ref_log_probs, rewards])
  shape = rewards.shape
  probs = jnp.exp(ref_log_probs.astype(jnp.float32)).reshape(-1, shape[-1])
  p_lt, p_le = jax.vmap(_row_quantiles)(probs, rewards.astype(jnp.float32).reshape(-1, shape[-1]))
  return p_lt.reshape(shape), p_le.reshape(shape)


def bon_log_probs(ref_log_probs: jax.Array, rewards: jax.Array, n: int) -> jax.Array:
  """`log π_BoN(y)` of Best-of-`n` of `π_ref` for every generation, by Theorem 1 with exact quantiles.

  Best-of-`n` of Best-of-`m` is Best-of-`n·m` (docs/method.md, Theorem 1), so `n = 2**t` is the target of `t` rounds of
  iterative BOND with `n = 2`.

  Args:
    ref_log_probs: `[..., num_generations]` `log π_ref(y)` over the whole space.
    rewards: `[..., num_generations]` `r(y)`.
    n: the N of Best-of-N, a Python integer >= 1.

  Returns:
    `[..., num_generations]` float32 log-probabilities (each row sums to 1 in probability).

  Example:
    >>> jnp.exp(bon_log_probs(jnp.log(jnp.array([.5, .5])), jnp.array([0., 1.]), n=2)).tolist()
    [0.25, 0.75]
  """
  p_lt, p_le = exact_quantiles(ref_log_probs, rewards)
  return quantiles.bon_log_prob(ref_log_probs.astype(jnp.float32), p_lt, p_le, n)


def kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Exact `KL(p || q) = Σ_y p(y) (log p(y) - log q(y))` over the last axis; `0 · log 0 = 0`.

  Args:
    log_p: `[..., num_generations]` log-probabilities of p over the whole space.
    log_q: `[..., num_generations]` log-probabilities of q (`+inf` KL where q = 0 < p).

  Returns:
    `[...]` KL in nats.

  Example:
    >>> round(float(kl_divergence(jnp.log(jnp.array([.5, .5])), jnp.log(jnp.array([.25, .75])))), 3)
    0.144
  """
  chex.assert_equal_shape([log_p, log_q])
  p = jnp.exp(log_p)
  # Where p = 0 the difference may be nan (-inf - -inf); the where keeps it out of the sum.
  return jnp.sum(jnp.where(p > 0, p * (log_p - jnp.where(p > 0, log_q, 0.0)), 0.0), axis=-1)


def expectation(log_p: jax.Array, values: jax.Array) -> jax.Array:
  """`E_{y~p}[values(y)]` over the last axis: `[..., num_generations]` twice -> `[...]`.

  Example:
    >>> float(expectation(jnp.log(jnp.array([.5, .5])), jnp.array([0., 1.])))
    0.5
  """
  chex.assert_equal_shape([log_p, values])
  return jnp.sum(jnp.exp(log_p) * values, axis=-1)
