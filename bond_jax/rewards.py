"""Rewards of generations: a reward model, programmatic token or text rewards, and a host-side check.

Every reward is a ``RewardFn``::

  rewards = reward_fn(prompts, prompt_mask, tokens, mask)   # [batch, samples] float32

with ``prompts``/``prompt_mask`` ``[batch, prompt_len]`` (left- or right-padded) and ``tokens``/``mask``
``[batch, samples, time]`` as returned by ``sampling.sample`` (mask True for generated tokens up to and
including EOS). All of them are batched (no Python loop over batch or samples) and jittable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import sampling
from bond_jax.models.config import ModelConfig

RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class RewardError(ValueError):
  """A reward function returned values of the wrong shape or type, or values that are not finite."""


def _check_inputs(prompts, prompt_mask, tokens, mask) -> None:
  chex.assert_rank([prompts, prompt_mask, tokens, mask], [2, 2, 3, 3])
  chex.assert_equal_shape([prompts, prompt_mask])
  chex.assert_equal_shape([tokens, mask])
  chex.assert_equal_shape_prefix([prompts, tokens], 1)


def _per_sample_prompts(prompts: jax.Array, samples: int) -> jax.Array:
  """``[batch, prompt_len]`` -> ``[batch * samples, prompt_len]``, each prompt repeated for its samples."""
  return jnp.repeat(prompts, samples, axis=0)


@functools.cache
def _reward_model_scores(model_config: ModelConfig) -> Callable[..., jax.Array]:
  """The scoring function of one config; cached so that equal configs give one function (one jit cache entry)."""

  def scores(params, prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    batch, samples, _ = tokens.shape
    outputs = sampling.outputs_after_prompts(params, model_config, prompts, prompt_mask, tokens, mask)
    # The score at the last real token, as Hugging Face classifiers pool: position 0 is the prompt's last token,
    # position t + 1 generated token t, and a generation's real tokens are a prefix of its row.
    last = jnp.sum(mask, axis=-1).reshape(-1)
    pooled = jnp.take_along_axis(outputs[..., 0], last[:, None], axis=1)[:, 0]
    return pooled.reshape(batch, samples)

  return scores


def reward_model(params, model_config: ModelConfig) -> RewardFn:
  """A learned reward: the score head read at the last real token of prompt + generation.

  Each prompt runs once, shared by its samples (``sampling.outputs_after_prompts``: the prompt packed left, then
  the generation; rotary positions count real tokens only), and the score is taken at the last real token, as
  Hugging Face ``*ForSequenceClassification`` models pool. A sample with an empty generation is scored on its
  prompt.

  The RewardFn is a ``jax.tree_util.Partial`` whose pytree leaves are ``params``: pass it to a jitted function
  as an argument, and the weights are traced inputs; call it from a closure, and they are baked into the
  compiled program as constants (slow to compile and a second copy in memory for a large reward model).

  Args:
    params: parameters of a model with ``head == "score"`` and ``num_labels == 1``.
    model_config: its config.

  Returns:
    A RewardFn: ``(prompts [batch, prompt_len], prompt_mask, tokens [batch, samples, time], mask)`` ->
    ``[batch, samples]`` float32.

  Example::

    rm_params, rm_config = hf.load_checkpoint("/ckpt/reward_model")
    score = jax.jit(lambda reward_fn, *batch: reward_fn(*batch))
    rewards = score(reward_model(rm_params, rm_config), prompts, prompt_mask, out.tokens, out.mask)
  """
  if model_config.head != "score" or model_config.num_labels != 1:
    raise ValueError(
        f"reward_model needs a model_config with head='score' and num_labels=1, got "
        f"head={model_config.head!r}, num_labels={model_config.num_labels}."
    )
  return jax.tree_util.Partial(_reward_model_scores(model_config), params)


def token_reward(fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> RewardFn:
  """A programmatic reward on token ids, given as a jittable function of flat (prompt, generation) pairs.

  Args:
    fn: ``fn(prompt_tokens [n, prompt_len], prompt_mask [n, prompt_len], generation_tokens [n, time],
      generation_mask [n, time]) -> [n]``, where ``n = batch * samples`` and row ``b * samples + s`` is sample
      ``s`` of prompt ``b``.

  Returns:
    A RewardFn giving ``[batch, samples]`` float32.

  Example::

    # Reward: number of generated tokens equal to 7.
    count_sevens = token_reward(lambda p, pm, g, gm: jnp.sum((g == 7) & gm, axis=-1))
  """

  def rewards(prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    batch, samples, time = tokens.shape
    out = fn(_per_sample_prompts(prompts, samples), _per_sample_prompts(prompt_mask, samples),
             tokens.reshape(batch * samples, time), mask.reshape(batch * samples, time))
    if jnp.shape(out) != (batch * samples,):
      raise RewardError(f"the token reward returned an array of shape {jnp.shape(out)}; expected one reward per "
                        f"(prompt, generation) pair, shape ({batch * samples},).")
    return jnp.asarray(out).astype(jnp.float32).reshape(batch, samples)

  return jax.tree_util.Partial(rewards)  # A pytree (with no leaves), like every RewardFn here.


def _decode(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
  """Decodes each row's real tokens (mask True and not the pad id) to text."""
  keep = mask & (ids != tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else mask
  return tokenizer.batch_decode([row[k].tolist() for row, k in zip(ids, keep)], skip_special_tokens=True)


def text_reward(fn: Callable[[list[str], list[str]], Sequence[float]], tokenizer) -> RewardFn:
  """A programmatic reward on decoded text, run on the host through ``jax.pure_callback``.

  Prompts and generations are decoded with ``tokenizer.batch_decode(..., skip_special_tokens=True)``, keeping
  only masked-in, non-pad tokens (so EOS and padding never reach ``fn``).

  Args:
    fn: ``fn(prompts: list[str], generations: list[str]) -> n floats``, ``n = batch * samples``, entry
      ``b * samples + s`` for sample ``s`` of prompt ``b`` (each prompt string is repeated for its samples).
    tokenizer: a Hugging Face tokenizer (e.g. from ``hf.load_tokenizer``).

  Returns:
    A RewardFn giving ``[batch, samples]`` float32; jittable (the callback runs on the host).

  Example::

    length_reward = text_reward(lambda ps, gs: [len(g) for g in gs], tokenizer)
  """

  def host_rewards(prompts, prompt_mask, tokens, mask):
    batch, samples, time = tokens.shape
    prompt_texts = _decode(tokenizer, np.asarray(prompts), np.asarray(prompt_mask).astype(bool))
    generations = _decode(tokenizer, np.asarray(tokens).reshape(-1, time),
                          np.asarray(mask).astype(bool).reshape(-1, time))
    values = np.asarray(fn([p for p in prompt_texts for _ in range(samples)], generations))
    if values.dtype.kind not in "biuf":
      raise RewardError(f"the text reward returned values of dtype {values.dtype}; expected numbers.")
    if values.shape != (batch * samples,):
      raise RewardError(f"the text reward returned values of shape {values.shape}; expected one per generation, "
                        f"({batch * samples},).")
    return values.astype(np.float32).reshape(batch, samples)

  def rewards(prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    if not isinstance(tokens, jax.core.Tracer):
      # Called outside jit (e.g. by `check_reward_fn`): run on the host directly, so that an error in `fn` is
      # raised as itself rather than wrapped by the callback machinery.
      return jnp.asarray(host_rewards(prompts, prompt_mask, tokens, mask))
    out_shape = jax.ShapeDtypeStruct(tokens.shape[:2], jnp.float32)
    # "sequential": under vmap, each call still sees the un-batched shapes host_rewards expects.
    return jax.pure_callback(host_rewards, out_shape, prompts, prompt_mask, tokens, mask,
                             vmap_method="sequential")

  return jax.tree_util.Partial(rewards)  # A pytree (with no leaves), like every RewardFn here.


def check_rewards(rewards, batch: int, samples: int) -> np.ndarray:
  """Host-side validation of a reward batch before it enters the BOND estimators.

  Args:
    rewards: expected ``[batch, samples]`` float32, all finite.
    batch: expected number of prompts.
    samples: expected samples per prompt.

  Returns:
    ``rewards`` as a numpy array.

  Raises:
    RewardError: naming the expected and actual shape or dtype, or the batch indices holding NaN/inf.

  Example::

    rewards = check_rewards(reward_fn(prompts, prompt_mask, out.tokens, out.mask), batch=8, samples=4)
  """
  values = np.asarray(rewards)
  if values.shape != (batch, samples):
    raise RewardError(f"rewards have shape {values.shape}; expected (batch, samples) = {(batch, samples)}.")
  if values.dtype != np.float32:
    raise RewardError(f"rewards have dtype {values.dtype}; expected float32.")
  bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
  if bad_rows.size:
    first = bad_rows[0]
    raise RewardError(
        f"rewards are not finite at batch indices {bad_rows.tolist()} (e.g. batch index {first}: "
        f"{values[first].tolist()})."
    )
  return values


def check_reward_fn(reward_fn: RewardFn, prompts: np.ndarray, prompt_mask: np.ndarray, samples: int = 2,
                    ) -> np.ndarray:
  """Calls ``reward_fn`` once, outside jit, and checks what it returns (``check_rewards``).

  A trainer runs this before compiling, so that a reward function of the wrong shape, type or values fails with
  a message instead of deep inside a compiled step. The generations scored are the prompts' own tokens, each
  given ``samples`` times: real text from the task, with no sampling needed.

  Args:
    reward_fn: the reward to check.
    prompts: ``[batch, prompt_len]`` int32, left- or right-padded.
    prompt_mask: ``[batch, prompt_len]`` bool.
    samples: generations per prompt.

  Returns:
    The ``[batch, samples]`` float32 rewards.

  Raises:
    RewardError: see ``check_rewards``; also raised by the reward wrappers of this module for outputs of the
      wrong shape or type.

  Example::

    check_reward_fn(text_reward(my_fn, tokenizer), batch["prompts"], batch["prompt_mask"])
  """
  prompt_mask = np.asarray(prompt_mask, bool)
  # Real tokens first: a generation's mask is a prefix of its row.
  order = np.argsort(~prompt_mask, axis=1, kind="stable")
  tokens = np.take_along_axis(np.asarray(prompts), order, axis=1)
  mask = np.take_along_axis(prompt_mask, order, axis=1)
  repeat = lambda x: np.repeat(x[:, None], samples, axis=1)  # noqa: E731
  values = reward_fn(np.asarray(prompts), prompt_mask, repeat(tokens), repeat(mask))
  return check_rewards(values, prompts.shape[0], samples)
