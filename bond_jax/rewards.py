"""Rewards of generations: a reward model, programmatic token or text rewards, and a host-side check.

Every reward is a ``RewardFn``::

  rewards = reward_fn(prompts, prompt_mask, tokens, mask)   # [batch, samples] float32

with ``prompts``/``prompt_mask`` ``[batch, prompt_len]`` (left- or right-padded) and ``tokens``/``mask``
``[batch, samples, time]`` as returned by ``sampling.sample`` (mask True for generated tokens up to and
including EOS). All of them are jittable; padding is told by the masks alone, never by token ids. A reward
model reads the policy's ids (``reward_model``) or, with a tokenizer of its own, the prompts and generations
re-tokenized on the host (``retokenized_reward_model``); ``run_components.load_reward`` picks one by comparing
the two tokenizers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from bond_jax import sampling
from bond_jax.data import prompt_encoding
from bond_jax.models import transformer
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


def _last_pooled(ids: jax.Array, mask: jax.Array, pad_token_id: int | None) -> jax.Array:
  """Where Hugging Face ``*ForSequenceClassification`` pools: the index of the last real token (``mask`` True)
  whose id is not ``pad_token_id`` (of the last real token when it is None); -1 when there is none.

  Only the mask tells padding here; the id test is the classifier's own rule (with pad id = EOS id, a trailing
  EOS is skipped). ``[..., time]`` -> ``[...]`` int32.
  """
  pooled = mask if pad_token_id is None else mask & (ids != pad_token_id)
  return jnp.max(jnp.where(pooled, jnp.arange(ids.shape[-1], dtype=jnp.int32), -1), axis=-1)


@functools.cache
def _reward_model_scores(model_config: ModelConfig) -> Callable[..., jax.Array]:
  """The scoring function of one config; cached so that equal configs give one function (one jit cache entry)."""
  pad_token_id = model_config.pad_token_id

  def scores(params, prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    batch, samples, _ = tokens.shape
    prompt_mask, mask = prompt_mask.astype(bool), mask.astype(bool)
    # Position 0 is the output at the prompt's last real token, position t + 1 at generated token t.
    outputs = sampling.outputs_after_prompts(params, model_config, prompts, prompt_mask, tokens, mask)[..., 0]
    in_generation = _last_pooled(tokens, mask, pad_token_id).reshape(-1)
    pooled = jnp.take_along_axis(outputs, (in_generation + 1)[:, None], axis=1)[:, 0]
    # With no generated token to pool at, the classifier reads the prompt at its last token it pools at, or at
    # its first token when there is none. That is position 0 unless the prompt ends in pad-id tokens; then the
    # prompt, cut after that token, runs again (only in a step that needs it).
    in_prompt = _last_pooled(prompts, prompt_mask, pad_token_id)
    target = jnp.where(in_prompt >= 0, in_prompt, jnp.argmax(prompt_mask, axis=-1))
    elsewhere = target != _last_pooled(prompts, prompt_mask, None)
    needs_prompt = ((in_generation < 0).reshape(batch, samples) & elsewhere[:, None]).reshape(-1)

    def read_prompts():
      cut = prompt_mask & (jnp.arange(prompts.shape[1]) <= target[:, None])
      return sampling.outputs_after_prompts(params, model_config, prompts, cut, tokens[:, :1, :0],
                                            mask[:, :1, :0])[:, 0, 0]

    prompt_scores = lax.cond(jnp.any(needs_prompt), read_prompts, lambda: jnp.zeros((batch,), outputs.dtype))
    pooled = jnp.where(needs_prompt, jnp.repeat(prompt_scores, samples), pooled)
    return pooled.reshape(batch, samples)

  return scores


def _check_reward_model(model_config: ModelConfig) -> None:
  if model_config.head != "score" or model_config.num_labels != 1:
    raise ValueError(
        f"reward_model needs a model_config with head='score' and num_labels=1, got "
        f"head={model_config.head!r}, num_labels={model_config.num_labels}."
    )


def reward_model(params, model_config: ModelConfig) -> RewardFn:
  """A learned reward on the policy's own token ids: the score head read where Hugging Face classifiers read it.

  Each prompt runs once, shared by its samples (``sampling.outputs_after_prompts``: the prompt packed left, then
  the generation; rotary positions count real tokens only). The score is pooled as transformers'
  ``*ForSequenceClassification`` pools prompt + generation (real tokens only, no padding): at the last token
  whose id is not ``model_config.pad_token_id`` (the checkpoint's declared pad id; at the last token when it is
  None). So with pad id = EOS id a trailing EOS is skipped; a sample whose generation is empty, or holds only
  pad-id tokens, is read in its prompt (at its first token if the whole sequence is pad-id tokens). The ids must
  be the reward model's own: for a reward model with another tokenizer, see ``retokenized_reward_model``.

  The RewardFn is a ``jax.tree_util.Partial`` whose pytree leaves are ``params``: pass it to a jitted function
  as an argument, and the weights are traced inputs; call it from a closure, and they are baked into the
  compiled program as constants (slow to compile and a second copy in memory for a large reward model).

  Args:
    params: parameters of a model with ``head == "score"`` and ``num_labels == 1``.
    model_config: its config.

  Returns:
    A RewardFn: ``(prompts [batch, prompt_len], prompt_mask, tokens [batch, samples, time], mask)`` ->
    ``[batch, samples]`` float32.

  Raises:
    ValueError: the model is not a one-label ``score`` model.

  Example:
    >>> from bond_jax.models import config, transformer
    >>> rm_config = config.tiny(head="score", pad_token_id=2, stop_token_ids=(2,))
    >>> reward_fn = reward_model(transformer.init_params(rm_config, jax.random.PRNGKey(0)), rm_config)
    >>> score = jax.jit(lambda reward_fn, *batch: reward_fn(*batch))
    >>> prompts, prompt_mask = jnp.array([[1, 5, 6]]), jnp.ones((1, 3), bool)
    >>> ended = score(reward_fn, prompts, prompt_mask, jnp.array([[[7, 2]]]), jnp.ones((1, 1, 2), bool))
    >>> cut = score(reward_fn, prompts, prompt_mask, jnp.array([[[7, 0]]]), jnp.array([[[True, False]]]))
    >>> bool(ended == cut)   # the trailing EOS (= pad id) is not read, as transformers does
    True
  """
  _check_reward_model(model_config)
  return jax.tree_util.Partial(_reward_model_scores(model_config), params)


@functools.partial(jax.jit, static_argnames=("model_config",))
def _pooled_scores(params, model_config: ModelConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Scores of whole right-padded sequences ``[n, len]``, pooled as ``_last_pooled`` says (first token if none)."""
  outputs, _ = transformer.forward(params, model_config, ids, transformer.positions_from_mask(mask), mask)
  index = jnp.maximum(_last_pooled(ids, mask, model_config.pad_token_id), 0)
  return jnp.take_along_axis(outputs[..., 0], index[:, None], axis=1)[:, 0]


def _response(policy: prompt_encoding.PromptTokenizer, prompt_ids: list[int], prompt_text: str,
              generated: list[int]) -> str:
  """The text a generation adds to its prompt: decoded together, less the prompt's text (so that a tokenizer
  that drops a leading space when decoding a sequence's first token keeps it), or decoded alone."""
  whole = policy.decode(prompt_ids + generated, skip_special_tokens=True)
  if whole.startswith(prompt_text):
    return whole[len(prompt_text):]
  return policy.decode(generated, skip_special_tokens=True)


def reward_model_ids(reward_tokenizer, prompt: prompt_encoding.Prompt, response: str) -> list[int]:
  """The ids a reward model reads for a prompt and a response, by its own tokenizer: with a chat template, the
  conversation (a text prompt is one user turn) with the response as the assistant's turn; without one, the
  prompt's text followed by the response, with the tokenizer's special tokens (``prompt_encoding.encode_text``).

  Raises:
    RewardError: a conversation for a tokenizer without a chat template.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> tokenizer = default_assets.load_tokenizer()
    >>> reward_model_ids(tokenizer, "The plot", " was great") == tokenizer.encode("The plot was great")
    True
  """
  if prompt_encoding.has_chat_template(reward_tokenizer):
    turns = prompt_encoding.conversation(prompt) + [{"role": "assistant", "content": response}]
    return list(reward_tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))
  if not isinstance(prompt, str):
    raise RewardError("the prompt is a conversation, but the reward model's tokenizer has no chat template to "
                      "render it.")
  return prompt_encoding.encode_text(reward_tokenizer, prompt + response)


def retokenized_reward_model(params, model_config: ModelConfig, reward_tokenizer, policy_tokenizer,
                             max_len: int) -> RewardFn:
  """A learned reward with its own tokenizer: each prompt + generation is re-tokenized for it, then scored.

  On the host (``jax.pure_callback`` under jit), each prompt is read back as written (``PromptTokenizer.
  prompt_of``: the conversation of a templated prompt, not its markup) and each generation decoded (by its
  mask); ``reward_model_ids`` encodes them with the reward model's tokenizer and chat template. The reward
  model then runs on the device on ``[batch * samples, max_len]`` right-padded ids and is pooled as
  ``reward_model`` pools (Hugging Face's classifiers). A sequence longer than ``max_len`` keeps its last
  ``max_len`` tokens (the response and the context nearest to it), with a warning.

  Args:
    params: parameters of a model with ``head == "score"`` and ``num_labels == 1``.
    model_config: its config.
    reward_tokenizer: the reward model's tokenizer (``transformers``).
    policy_tokenizer: the policy's ``prompt_encoding.PromptTokenizer`` (the one that encoded the prompts), or a
      tokenizer, read as one without a chat template.
    max_len: reward-model tokens per (prompt, generation), at most ``model_config.max_seq_len``.

  Returns:
    A RewardFn giving ``[batch, samples]`` float32; a ``jax.tree_util.Partial`` whose leaves are ``params``.

  Raises:
    ValueError: the model is not a one-label ``score`` model, or ``max_len`` does not fit it.

  Example:
    >>> from bond_jax.data import id_tokenizer
    >>> from bond_jax.models import config, transformer
    >>> from bond_jax.tasks import default_assets
    >>> reward_tokenizer = default_assets.load_tokenizer()
    >>> rm_config = config.tiny(head="score", vocab_size=len(reward_tokenizer))
    >>> rm_params = transformer.init_params(rm_config, jax.random.PRNGKey(0))
    >>> reward_fn = retokenized_reward_model(rm_params, rm_config, reward_tokenizer, id_tokenizer.IdTokenizer(8),
    ...                                      max_len=16)
    >>> prompts, prompt_mask = jnp.array([[3, 1]]), jnp.ones((1, 2), bool)
    >>> tokens, mask = jnp.array([[[4, 0], [4, 7]]]), jnp.array([[[True, False], [True, True]]])
    >>> rewards = jax.jit(lambda fn, *batch: fn(*batch))(reward_fn, prompts, prompt_mask, tokens, mask)
    >>> direct = reward_model(rm_params, rm_config)   # the texts "3 1 4" and "3 1 4 7", encoded by hand:
    >>> ids = [reward_tokenizer.encode(text) for text in ("3 1 4", "3 1 4 7")]
    >>> want = [direct(jnp.array([i[:1]]), jnp.ones((1, 1), bool), jnp.array([[i[1:]]]),
    ...                jnp.ones((1, 1, len(i) - 1), bool))[0, 0] for i in ids]
    >>> np.allclose(rewards[0], want, atol=1e-5)
    True
  """
  _check_reward_model(model_config)
  if not 0 < max_len <= model_config.max_seq_len:
    raise ValueError(f"max_len={max_len} must lie in [1, the reward model's max_seq_len={model_config.max_seq_len}].")
  policy = prompt_encoding.as_prompt_tokenizer(policy_tokenizer)

  def host_inputs(prompts, prompt_mask, tokens, mask):
    batch, samples, time = tokens.shape
    generated = _real_rows(np.asarray(tokens).reshape(-1, time), np.asarray(mask).reshape(-1, time))
    rows = []
    for b, prompt_ids in enumerate(_real_rows(prompts, prompt_mask)):
      prompt, prompt_text = policy.prompt_of(prompt_ids), policy.decode(prompt_ids, skip_special_tokens=True)
      for s in range(samples):
        rows.append(reward_model_ids(reward_tokenizer, prompt,
                                     _response(policy, prompt_ids, prompt_text, generated[b * samples + s])))
    longest = max(map(len, rows))
    if longest > max_len:
      # As reward pipelines truncate: keep the end, the response and the context nearest to it.
      logging.log_every_n_seconds(
          logging.WARNING, "A prompt and generation re-tokenized for the reward model take %d tokens, more than "
          "max_len=%d (config.reward.max_len): the reward model reads their last %d.", 60, longest, max_len, max_len)
      rows = [row[-max_len:] for row in rows]
    ids = np.zeros((len(rows), max_len), np.int32)  # Right-padded; the mask, not the filler id, tells padding.
    real = np.arange(max_len) < np.array([len(r) for r in rows])[:, None]
    ids[real] = np.concatenate(rows)
    return ids, real

  def rewards(params, prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    batch, samples, _ = tokens.shape
    shapes = (jax.ShapeDtypeStruct((batch * samples, max_len), jnp.int32),
              jax.ShapeDtypeStruct((batch * samples, max_len), jnp.bool_))
    ids, real = _on_host(host_inputs, shapes, prompts, prompt_mask, tokens, mask)
    return _pooled_scores(params, model_config, ids, real).reshape(batch, samples)

  rewards.row_len = max_len  # Each sample is a full row of its own: the memory estimate's layout of this pass.
  return jax.tree_util.Partial(rewards, params)


def token_reward(fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> RewardFn:
  """A programmatic reward on token ids, given as a jittable function of flat (prompt, generation) pairs.

  Args:
    fn: ``fn(prompt_tokens [n, prompt_len], prompt_mask [n, prompt_len], generation_tokens [n, time],
      generation_mask [n, time]) -> [n]``, where ``n = batch * samples`` and row ``b * samples + s`` is sample
      ``s`` of prompt ``b``.

  Returns:
    A RewardFn giving ``[batch, samples]`` float32.

  Example:
    >>> count_sevens = token_reward(lambda p, pm, g, gm: jnp.sum((g == 7) & gm, axis=-1))
    >>> tokens, mask = jnp.array([[[7, 7, 3], [7, 7, 7]]]), jnp.array([[[True, True, True], [True, False, False]]])
    >>> jax.jit(count_sevens)(jnp.array([[1, 2]]), jnp.ones((1, 2), bool), tokens, mask)
    Array([[2., 1.]], dtype=float32)
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


def _real_rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Each row's real tokens (where ``mask`` is True; the mask alone tells padding, whatever the ids)."""
  return [row[keep].tolist() for row, keep in zip(np.asarray(ids), np.asarray(mask, bool))]


def _on_host(host_fn: Callable[..., Any], result_shapes: Any, *args: jax.Array) -> Any:
  """``host_fn`` on numpy arrays: called directly outside jit (e.g. by ``check_reward_fn``), so that its errors
  are raised as themselves, and through ``jax.pure_callback`` under jit ("sequential" under vmap: each call still
  sees the un-batched shapes ``host_fn`` expects)."""
  if not any(isinstance(a, jax.core.Tracer) for a in args):
    return jax.tree.map(jnp.asarray, host_fn(*args))
  return jax.pure_callback(host_fn, result_shapes, *args, vmap_method="sequential")


def text_reward(fn: Callable[[list[str], list[str]], Sequence[float]], tokenizer) -> RewardFn:
  """A programmatic reward on text, run on the host through ``jax.pure_callback``.

  Generations are decoded with ``batch_decode(..., skip_special_tokens=True)`` from their real tokens (by the
  mask: EOS and padding never reach ``fn``, a real token with the pad id does). Prompts are given as written:
  the text of ``PromptTokenizer.prompt_of`` (without a chat template, the decoded prompt; with one, the prompt the
  ids were encoded from, a conversation giving its last turn's content, ``prompt_encoding.prompt_text``).

  Args:
    fn: ``fn(prompts: list[str], generations: list[str]) -> n floats``, ``n = batch * samples``, entry
      ``b * samples + s`` for sample ``s`` of prompt ``b`` (each prompt string is repeated for its samples).
    tokenizer: the policy's ``prompt_encoding.PromptTokenizer`` (the one that encoded the prompts), or a
      tokenizer (e.g. from ``hf.load_tokenizer``), read as one without a chat template.

  Returns:
    A RewardFn giving ``[batch, samples]`` float32; jittable (the callback runs on the host).

  Example:
    >>> from bond_jax.data import id_tokenizer
    >>> zeros = text_reward(lambda ps, gs: [g.split().count("0") for g in gs], id_tokenizer.IdTokenizer(8))
    >>> tokens, mask = jnp.array([[[0, 7, 0], [0, 0, 0]]]), jnp.array([[[True, True, True], [True, False, False]]])
    >>> jax.jit(zeros)(jnp.array([[3, 1]]), jnp.ones((1, 2), bool), tokens, mask)
    Array([[2., 1.]], dtype=float32)
  """
  tokenizer = prompt_encoding.as_prompt_tokenizer(tokenizer)

  def host_rewards(prompts, prompt_mask, tokens, mask):
    batch, samples, time = tokens.shape
    prompt_texts = [prompt_encoding.prompt_text(tokenizer.prompt_of(ids))
                    for ids in _real_rows(prompts, prompt_mask)]
    generations = tokenizer.batch_decode(_real_rows(np.asarray(tokens).reshape(-1, time),
                                                    np.asarray(mask).reshape(-1, time)), skip_special_tokens=True)
    values = np.asarray(fn([p for p in prompt_texts for _ in range(samples)], generations))
    if values.dtype.kind not in "biuf":
      raise RewardError(f"the text reward returned values of dtype {values.dtype}; expected numbers.")
    if values.shape != (batch * samples,):
      raise RewardError(f"the text reward returned values of shape {values.shape}; expected one per generation, "
                        f"({batch * samples},).")
    return values.astype(np.float32).reshape(batch, samples)

  def rewards(prompts, prompt_mask, tokens, mask):
    _check_inputs(prompts, prompt_mask, tokens, mask)
    return _on_host(host_rewards, jax.ShapeDtypeStruct(tokens.shape[:2], jnp.float32),
                    prompts, prompt_mask, tokens, mask)

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

  Example:
    >>> check_rewards(jnp.array([[0.5, np.nan]]), batch=1, samples=2)
    Traceback (most recent call last):
    ...
    bond_jax.rewards.RewardError: rewards are not finite at batch indices [0] (e.g. batch index 0: [0.5, nan]).
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

  Example:
    >>> from bond_jax.data import id_tokenizer
    >>> same = text_reward(lambda ps, gs: [float(p == g) for p, g in zip(ps, gs)], id_tokenizer.IdTokenizer(8))
    >>> check_reward_fn(same, np.array([[0, 3, 1], [2, 5, 6]]), np.array([[False, True, True], [True, True, True]]))
    array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  prompt_mask = np.asarray(prompt_mask, bool)
  # Real tokens first: a generation's mask is a prefix of its row.
  order = np.argsort(~prompt_mask, axis=1, kind="stable")
  tokens = np.take_along_axis(np.asarray(prompts), order, axis=1)
  mask = np.take_along_axis(prompt_mask, order, axis=1)
  repeat = lambda x: np.repeat(x[:, None], samples, axis=1)  # noqa: E731
  values = reward_fn(np.asarray(prompts), prompt_mask, repeat(tokens), repeat(mask))
  return check_rewards(values, prompts.shape[0], samples)
