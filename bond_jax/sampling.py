"""Batched autoregressive sampling with a KV cache, and the differentiable log-probs of its generations.

`sample` pre-fills the cache once per prompt, copies it `num_samples` times, then decodes one token of every
sequence per step in a `lax.while_loop` that stops when every sequence has emitted a stop id. Prompts may be left-
or right-padded (any mix): they are moved to left padding internally (`to_left_padding`), so generation always
starts right after a row's last real token.

Randomness: `rng` is one key for the whole batch, split into one key per prompt row, or already per-row keys
`[batch]` (typed) / `[batch, 2]` (raw). Row `b`'s key alone decides its samples (sample `s` of row `b` uses
`split(row_key, num_samples)[s]`, folded with the step), so a prompt sampled alone with its row key gives the
same tokens as inside the batch.

`outputs_after_prompts` runs given samples alike (each prompt once, its keys and values shared by its samples), with
gradients: `generation_log_probs` (for the losses) and reward models score through it. Given the sampler's
`SamplingConfig`, `generation_log_probs` scores the samples under the distribution they were drawn from (the
temperature, top-k and top-p applied), as every score-function estimate needs (docs/method.md, "Which
distributions the estimates refer to").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
from jax import lax
import jax.numpy as jnp

from bond_jax import micro_batching
from bond_jax import sharding
from bond_jax.models.config import ModelConfig
from bond_jax.models.transformer import (Cache, Params, decoding_params, forward, forward_after_prompts,
                                         head_outputs, head_params, init_cache, outer_params_after,
                                         positions_from_mask)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample; frozen, so it is a valid jit static argument.

  Attributes:
    max_new_tokens: generated tokens per sequence (the `time` of the outputs).
    num_samples: samples per prompt, sharing the prompt's prefill.
    temperature: logits are divided by it (> 0).
    top_k: keep the k most likely tokens (0 = off); ties at the k-th logit are all kept.
    top_p: keep the smallest most-likely set whose probability reaches top_p (1.0 = off), after top-k.
    greedy: take the argmax of the raw logits (temperature, top-k and top-p are then ignored).
    stop_token_ids: a sequence stops after any of these tokens, emitted included (empty = never stop early); as
      `generate` stops on every `eos_token_id`, pass the model's `ModelConfig.stop_token_ids`.
    pad_token_id: fills the positions after a stop.

  Example:
    >>> SamplingConfig(max_new_tokens=64, num_samples=4, temperature=0.7, stop_token_ids=(1, 107)).stop_token_ids
    (1, 107)
  """

  max_new_tokens: int
  num_samples: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    for name in ("max_new_tokens", "num_samples"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"SamplingConfig.{name} must be a positive int, got {value!r}.")
    if not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature must be > 0 (use greedy=True for argmax), "
                       f"got {self.temperature!r}.")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must lie in (0, 1] (1 = off), got {self.top_p!r}.")
    if not (isinstance(self.stop_token_ids, tuple) and all(isinstance(i, int) for i in self.stop_token_ids)):
      raise ValueError(f"SamplingConfig.stop_token_ids must be a tuple of ints, got {self.stop_token_ids!r}.")


def fill_token_id(model_config: ModelConfig) -> int:
  """The id to fill a sequence with after its stop: as `generate` fills finished sequences, the model's declared
  pad id, else its first stop id (else 0: a model that never stops leaves nothing to fill).

  Example:
    >>> from bond_jax.models import tiny
    >>> fill_token_id(tiny(stop_token_ids=(2, 7))), fill_token_id(tiny(stop_token_ids=(2, 7), pad_token_id=0))
    (2, 0)
  """
  if model_config.pad_token_id is not None:
    return model_config.pad_token_id
  return model_config.stop_token_ids[0] if model_config.stop_token_ids else 0


class SampleOutput(NamedTuple):
  """Generations of `sample`.

  Attributes:
    tokens: `[batch, samples, time]` int32, `pad_token_id` after a stop.
    log_probs: `[batch, samples, time]` float32, log-prob of each token under the sampling distribution
      (after temperature / top-k / top-p; 0 for greedy, whose distribution is a point mass; 0 where masked).
    mask: `[batch, samples, time]` bool, True for generated tokens up to and including the stop token.
  """

  tokens: jax.Array
  log_probs: jax.Array
  mask: jax.Array


def to_left_padding(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens to the right end, in order, the padding before them: `[batch, len]` -> same.

  Example:
    >>> tokens, mask = to_left_padding(jnp.array([[5, 6, 0]]), jnp.array([[True, True, False]]))
    >>> tokens.tolist(), mask.tolist()
    ([[0, 5, 6]], [[False, True, True]])
  """
  order = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)
  return jnp.take_along_axis(tokens, order, axis=-1), jnp.take_along_axis(mask, order, axis=-1)


def sampling_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """The logits of the sampling distribution, unnormalised: divided by the temperature, then -inf outside the
  top-k, then outside the top-p: `[..., vocab]` -> same, float32.

  At temperature 1 without truncation they are the logits themselves.

  Example:
    >>> z = sampling_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), SamplingConfig(max_new_tokens=1, top_k=2))
    >>> np.asarray(jax.nn.softmax(z), np.float64).round(3).tolist()
    [0.625, 0.375, 0.0]
  """
  logits = logits.astype(jnp.float32) / config.temperature
  if config.top_k:
    kth = lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # A token is kept when the mass strictly before it is below top_p; the top token always is.
    keep = jnp.cumsum(probs, axis=-1) - probs < config.top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sampling_log_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Log-probs of the sampling distribution (temperature, then top-k, then top-p): `[..., vocab]` -> same.

  Example:
    >>> log_probs = sampling_log_probs(jnp.array([[2.0, 0.0]]), SamplingConfig(max_new_tokens=1, temperature=2.0))
    >>> np.asarray(jnp.exp(log_probs), np.float64).round(3).tolist()   # softmax([1, 0])
    [[0.731, 0.269]]
  """
  return jax.nn.log_softmax(sampling_logits(logits, config), axis=-1)


def _row_keys(rng: jax.Array, batch: int) -> jax.Array:
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (1 if typed else 2):
    chex.assert_axis_dimension(rng, 0, batch)
    return rng
  return jax.random.split(rng, batch)


class _DecodeState(NamedTuple):
  step: jax.Array  # int32, the next column to choose
  tokens: jax.Array  # [n, time]
  log_probs: jax.Array  # [n, time]
  mask: jax.Array  # [n, time]
  done: jax.Array  # [n] bool, a stop id already emitted
  logits: jax.Array  # [n, vocab], next-token logits
  positions: jax.Array  # [n], rotary position of the next token
  cache: Cache


def _prefill(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array, samples: int,
             time: int, hidden: bool = False) -> tuple[jax.Array, jax.Array, Cache]:
  """Runs each prompt once into a KV cache, then gives every one of its `samples` rows a copy.

  Prompts are moved to left padding (`to_left_padding`), so slot `prompt_len` is the first generated token of
  every row. The
  cache has room for the prompt and `time - 1` more tokens (`sample` never feeds back its last token).

  Returns:
    `(outputs, positions, cache)`: `[batch * samples, vocab]` logits of each row's first generated token (with
    `hidden`, the final norm's `[batch * samples, d_model]` outputs there), `[batch * samples]` int32 rotary
    position of that token, and the cache with `batch * samples` rows, row `b * samples + s` being sample `s` of
    prompt `b`.
  """
  prompt_len = prompts.shape[1]
  prompts, prompt_mask = to_left_padding(prompts, prompt_mask.astype(bool))
  cache = init_cache(model_config, prompts.shape[0], prompt_len + time - 1)
  outputs, cache = forward(params, model_config, prompts, positions_from_mask(prompt_mask), prompt_mask, cache,
                           output_start=prompt_len - 1, hidden=hidden)
  repeat = lambda x, axis=0: jnp.repeat(x, samples, axis=axis)  # noqa: E731  (row b -> rows b*samples ..)
  cache = cache._replace(k=repeat(cache.k, 1), v=repeat(cache.v, 1), mask=repeat(cache.mask))
  return repeat(outputs[:, 0]), repeat(prompt_mask.sum(axis=-1).astype(jnp.int32)), cache


@functools.partial(jax.jit, static_argnames=("config", "model_config", "micro_batches"))
def sample(params: Params, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           config: SamplingConfig, model_config: ModelConfig, micro_batches: int = 1) -> SampleOutput:
  """Samples `num_samples` continuations of every prompt with a KV cache.

  Every prompt row needs at least one real token (e.g. BOS). The weights are prepared once for the decoding loop
  (`transformer.decoding_params`: on a mesh set with `jax.set_mesh`, all-gathered over `fsdp`), and each device
  decodes its own rows (`sharding.over_batch_shards`), so the loop runs no collective over the batch axes and
  stops when the device's rows are done. With `micro_batches` > 1 the prompts are sampled in that many parts one
  after the other (`micro_batching`), each row with the same key, so the same tokens, as in one part.

  Args:
    params: the policy's parameters (`init_params` tree, head "lm").
    prompts: `[batch, prompt_len]` int32, left- or right-padded.
    prompt_mask: `[batch, prompt_len]` bool, True = real token.
    rng: one PRNG key, or per-row keys `[batch]` (see the module docstring).
    config: the sampling config (static).
    model_config: the model config (static).
    micro_batches: static; it must divide `batch` (and, on a mesh, the prompts per device).

  Returns:
    `SampleOutput` with `[batch, num_samples, max_new_tokens]` tokens, log-probs and mask.

  Example:
    >>> from bond_jax.models import init_params, tiny
    >>> model_config = tiny()
    >>> params = init_params(model_config, jax.random.key(0))
    >>> prompts, prompt_mask = jnp.array([[0, 4, 5], [6, 7, 8]]), jnp.array([[False, True, True], [True, True, True]])
    >>> out = sample(params, prompts, prompt_mask, jax.random.key(0),
    ...              SamplingConfig(max_new_tokens=5, num_samples=2, stop_token_ids=(1, 2)), model_config)
    >>> out.tokens.shape, bool(out.mask[..., 0].all())
    ((2, 2, 5), True)
  """
  chex.assert_rank([prompts, prompt_mask], 2)
  chex.assert_equal_shape([prompts, prompt_mask])
  if model_config.head != "lm":
    raise ValueError(f"sample needs model_config.head='lm', got {model_config.head!r}.")
  if config.top_k > model_config.vocab_size:
    raise ValueError(f"SamplingConfig.top_k={config.top_k} exceeds vocab_size={model_config.vocab_size}.")
  batch, prompt_len = prompts.shape
  time = config.max_new_tokens
  if prompt_len + time > model_config.max_seq_len:
    raise ValueError(f"prompt_len={prompt_len} + max_new_tokens={time} exceeds model_config.max_seq_len="
                     f"{model_config.max_seq_len}.")
  # Once, rather than at every decoding step; from a copy that XLA cannot merge with another pass's gather of the
  # same weights (which would keep these gathered weights alive until that pass).
  params = decoding_params(sharding.params_after(params, prompts), model_config)
  sample_rows = lambda params, rows: _sample_rows(params, *rows, config, model_config)  # noqa: E731
  return micro_batching.map_rows(lambda *rows: sharding.over_batch_shards(sample_rows, params, rows), micro_batches,
                                 prompts, prompt_mask, _row_keys(rng, batch))


def _sample_rows(params: Params, prompts: jax.Array, prompt_mask: jax.Array, row_keys: jax.Array,
                 config: SamplingConfig, model_config: ModelConfig) -> SampleOutput:
  """`sample` of `[batch, prompt_len]` prompts with their row keys, given `decoding_params`."""
  batch = prompts.shape[0]
  samples, time = config.num_samples, config.max_new_tokens
  n = batch * samples
  logits, positions, cache = _prefill(params, model_config, prompts, prompt_mask, samples, time)
  keys = jax.vmap(lambda key: jax.random.split(key, samples))(row_keys)
  keys = keys.reshape((n,) + keys.shape[2:])

  def choose(state: _DecodeState) -> _DecodeState:
    if config.greedy:
      token = jnp.argmax(state.logits, axis=-1).astype(jnp.int32)
      log_prob = jnp.zeros((n,), jnp.float32)
    else:
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, state.step)
      log_probs = sampling_log_probs(state.logits, config)
      token = jax.vmap(jax.random.categorical)(step_keys, log_probs).astype(jnp.int32)
      log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    live = ~state.done
    token = jnp.where(live, token, config.pad_token_id)
    done = state.done
    if config.stop_token_ids:
      done = done | jnp.isin(token, jnp.asarray(config.stop_token_ids, jnp.int32))
    return state._replace(
        step=state.step + 1, done=done,
        tokens=state.tokens.at[:, state.step].set(token),
        log_probs=state.log_probs.at[:, state.step].set(jnp.where(live, log_prob, 0.0)),
        mask=state.mask.at[:, state.step].set(live))

  def advance(state: _DecodeState) -> _DecodeState:
    token = state.tokens[:, state.step - 1]
    logits, cache = forward(params, model_config, token[:, None], state.positions[:, None],
                            jnp.ones((n, 1), bool), state.cache)
    return state._replace(logits=logits[:, 0], positions=state.positions + 1, cache=cache)

  rows = lambda x: sharding.constrain(x, "batch", *([None] * (x.ndim - 1)))  # noqa: E731
  state = _DecodeState(
      step=jnp.zeros((), jnp.int32),
      tokens=rows(jnp.full((n, time), config.pad_token_id, jnp.int32)),
      log_probs=rows(jnp.zeros((n, time), jnp.float32)),
      mask=rows(jnp.zeros((n, time), bool)),
      done=rows(jnp.zeros((n,), bool)),
      logits=sharding.constrain(logits, "batch", "vocab"),
      positions=rows(positions),
      cache=cache)
  state = lax.while_loop(lambda s: (s.step < time) & ~jnp.all(s.done), lambda s: choose(advance(s)),
                         choose(state))
  unflatten = lambda x: x.reshape(batch, samples, time)  # noqa: E731
  return SampleOutput(unflatten(state.tokens), unflatten(state.log_probs), unflatten(state.mask))


def outputs_after_prompts(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                          tokens: jax.Array, mask: jax.Array, hidden: bool = False) -> jax.Array:
  """The model's outputs after each prompt and at each of its samples' tokens, every prompt run only once.

  Each prompt (packed left, as in `sample`) and its samples' tokens run in one pass of the layers
  (`transformer.forward_after_prompts`): in each layer the prompt runs once and its keys and values are shared by
  its samples, whose tokens thus attend to their prompt and to their own earlier tokens, exactly as if prompt and
  sample were one sequence (`batch * prompt_len + batch * samples * time` tokens through the layers rather than
  `batch * samples * (prompt_len + time)`), each layer's weights gathered once.

  Args:
    params: the model's parameters (head "lm" or "score").
    model_config: its config.
    prompts: `[batch, prompt_len]` int32, left- or right-padded.
    prompt_mask: `[batch, prompt_len]` bool.
    tokens: `[batch, samples, time]` int32, the tokens to feed after each prompt.
    mask: `[batch, samples, time]` bool, True for real tokens (a prefix of each row).
    hidden: static; the final norm's outputs `[..., d_model]` (compute dtype) in place of the head's
    (`transformer.head_outputs` turns them into outputs).

  Returns:
    `[batch * samples, time + 1, outputs]` float32 (logits or scores): position 0 is the output at the prompt's
    last token, position `t + 1` the output at token `t`; row `b * samples + s` is sample `s` of prompt `b`.

  Example:
    >>> from bond_jax.models import init_params, tiny
    >>> model_config = tiny(head="score")
    >>> params = init_params(model_config, jax.random.key(0))
    >>> prompts, prompt_mask = jnp.array([[0, 4, 5]]), jnp.array([[False, True, True]])
    >>> tokens, mask = jnp.array([[[9, 10], [11, 12]]]), jnp.array([[[True, True], [True, False]]])
    >>> outputs_after_prompts(params, model_config, prompts, prompt_mask, tokens, mask).shape
    (2, 3, 1)
  """
  batch, prompt_len = prompts.shape
  samples, time = tokens.shape[1:]
  if prompt_len + time > model_config.max_seq_len:
    raise ValueError(f"prompt_len={prompt_len} + time={time} exceeds model_config.max_seq_len="
                     f"{model_config.max_seq_len}.")
  # What the pass gathers of the weights outside the layers is gathered when it runs, after the tokens it reads.
  params = outer_params_after(params, tokens if tokens.size else prompts)
  if time == 0:
    return _prefill(params, model_config, prompts, prompt_mask, samples, 1, hidden)[0][:, None]
  prompts, prompt_mask = to_left_padding(prompts, prompt_mask.astype(bool))
  positions = jnp.repeat(prompt_mask.sum(axis=-1, dtype=jnp.int32), samples)[:, None] + jnp.arange(time)
  last, rest = forward_after_prompts(params, model_config, prompts, prompt_mask, tokens.reshape(-1, time),
                                     positions, mask.reshape(-1, time), hidden)
  return jnp.concatenate([jnp.repeat(last, samples, axis=0)[:, None], rest], axis=1)


# The float32 logits one chunk of positions may take per device (`_over_position_chunks`).
LOGITS_CHUNK_BYTES = 2 ** 28


def _position_chunk(rows: int, time: int, vocab: int, models: int = 1) -> int:
  """Positions per chunk so that `models` models' float32 logits of one chunk take at most `LOGITS_CHUNK_BYTES`
  per device (rows split over the mesh's batch axes, vocabulary over `tensor`)."""
  per_position = models * rows * vocab * 4 // (sharding.context_axis_size(sharding.BATCH_AXES)
                                               * sharding.context_axis_size(("tensor",)))
  return max(1, min(time, LOGITS_CHUNK_BYTES // max(per_position, 1)))


def _over_position_chunks(fn, chunk: int, heads: Any, *arrays: jax.Array) -> jax.Array:
  """`fn(heads, *arrays)` for `fn` position-wise along axis 1 of `arrays` (`[rows, time, ...]` -> `[rows, time]`),
  run over chunks of `chunk` positions one after the other, each rematerialised in a backward pass: the
  vocabulary-sized logits inside `fn` exist for one chunk at a time, never for the whole `[rows, time, vocab]`.

  With float32 `heads` (a trained policy's), each device loops over its own rows (`sharding.over_batch_shards`),
  so in a backward pass their gradient accumulates on the device over the chunks and is reduced over the batch
  axes once, after the loop; under XLA's partitioning it is all-reduced whole at every chunk. Other heads (frozen
  models' in the compute dtype) stay in XLA's loop: XLA's CPU compiler fails on the bfloat16 reduction that a
  shard_map's backward pass would add (`AllReducePromotion`: "Invalid binary instruction opcode copy")."""
  time = arrays[0].shape[1]
  if chunk >= time:
    return fn(heads, *arrays)
  chunks = -(-time // chunk)

  def loop(heads, arrays):
    rows = arrays[0].shape[0]
    parts = [jnp.pad(a, [(0, 0), (0, chunks * chunk - time)] + [(0, 0)] * (a.ndim - 2))
             .reshape((rows, chunks, chunk) + a.shape[2:]).swapaxes(0, 1) for a in arrays]
    out = lax.map(jax.checkpoint(lambda xs: fn(heads, *xs), prevent_cse=False), parts)
    return out.swapaxes(0, 1).reshape(rows, chunks * chunk)[:, :time]

  if all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(heads)):
    return sharding.over_batch_shards(loop, heads, arrays)
  return loop(heads, arrays)


def _predicting_hidden(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                       tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """`[batch * samples, time, d_model]` final-norm outputs at the positions predicting each token of `tokens`."""
  # Every generated token but the last is fed back: the prompt's last token predicts the first, and so on.
  return outputs_after_prompts(params, model_config, prompts, prompt_mask, tokens[..., :-1], mask[..., :-1],
                               hidden=True)


def _distribution_logits(params: Params, model_config: ModelConfig, hidden: jax.Array,
                         sampling_config: SamplingConfig | None) -> jax.Array:
  """The logits of the sampling distribution (the model's own without `sampling_config`) at `hidden`."""
  logits = head_outputs(params, model_config, hidden)
  return logits if sampling_config is None else sampling_logits(logits, sampling_config)


@functools.partial(jax.jit, static_argnames=("model_config", "sampling_config", "micro_batches"))
def generation_log_probs(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                         tokens: jax.Array, mask: jax.Array, sampling_config: SamplingConfig | None = None,
                         micro_batches: int = 1) -> jax.Array:
  """Per-token log-probs of generations under `params`, differentiable, under the distribution they were sampled
  from.

  With `sampling_config`, the log-probs are those of the sampling distribution `sample` draws from with it (the
  temperature, top-k and top-p applied, `sampling_logits`); without, those of the model itself (temperature 1).
  Each prompt runs once, shared by its samples (`outputs_after_prompts`); the vocab-sized head runs only over the
  predicting positions, in chunks of positions whose float32 logits take at most `LOGITS_CHUNK_BYTES` per device
  (rematerialised in a backward pass), so the whole `[rows, time, vocab]` logits never exist at once. With
  `micro_batches` > 1, the prompts run in that many parts one after the other (`micro_batching`).

  Args:
    params: the policy's parameters.
    model_config: the model config (static).
    prompts: `[batch, prompt_len]` int32, left- or right-padded.
    prompt_mask: `[batch, prompt_len]` bool.
    tokens: `[batch, samples, time]` int32 generations.
    mask: `[batch, samples, time]` bool, True for generated tokens (a prefix of each row).
    sampling_config: the sampler's config (static), or None for the model's own distribution.
    micro_batches: static; it must divide `batch`.

  Returns:
    `[batch, samples, time]` float32 log-probs, 0 where `mask` is False (-inf for a token that the sampling
    distribution's top-k or top-p excludes).

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> cfg = model_config_lib.tiny(vocab_size=8)
    >>> params = transformer.init_params(cfg, jax.random.key(0))
    >>> prompts, prompt_mask = jnp.array([[1, 2, 3]]), jnp.ones((1, 3), bool)
    >>> tempered = SamplingConfig(max_new_tokens=4, num_samples=2, temperature=0.5)
    >>> out = sample(params, prompts, prompt_mask, jax.random.key(1), tempered, cfg)
    >>> log_probs = generation_log_probs(params, cfg, prompts, prompt_mask, out.tokens, out.mask, tempered)
    >>> bool(jnp.allclose(log_probs, out.log_probs, atol=1e-5))   # the sampler's own log-probs
    True
  """
  chex.assert_rank([prompts, prompt_mask, tokens, mask], [2, 2, 3, 3])
  chex.assert_equal_shape([prompts, prompt_mask])
  chex.assert_equal_shape([tokens, mask])
  chex.assert_equal_shape_prefix([prompts, tokens], 1)
  return micro_batching.map_rows(
      lambda *rows: _generation_log_probs(params, model_config, *rows, sampling_config), micro_batches, prompts,
      prompt_mask, tokens, mask)


def _generation_log_probs(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                          tokens: jax.Array, mask: jax.Array, sampling_config: SamplingConfig | None) -> jax.Array:
  batch, samples, time = tokens.shape
  hidden = _predicting_hidden(params, model_config, prompts, prompt_mask, tokens, mask)
  head = head_params(outer_params_after(params, hidden))  # gathered once the layers ran, outside the chunks' loop

  def log_probs_of(head, hidden, tokens):
    logits = _distribution_logits(head, model_config, hidden, sampling_config)
    return jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

  chunk = _position_chunk(batch * samples, time, model_config.vocab_size)
  log_probs = _over_position_chunks(log_probs_of, chunk, head, hidden, tokens.reshape(-1, time))
  return jnp.where(mask.reshape(-1, time).astype(bool), log_probs, 0.0).reshape(batch, samples, time)


@functools.partial(jax.jit, static_argnames=("model_config", "sampling_config", "micro_batches"))
def generation_kl(params: Params, other_params: Params, model_config: ModelConfig, prompts: jax.Array,
                  prompt_mask: jax.Array, tokens: jax.Array, mask: jax.Array,
                  sampling_config: SamplingConfig | None = None, micro_batches: int = 1) -> jax.Array:
  """`Σ_t KL(π(·|x, y_<t) || π'(·|x, y_<t))` over each sample's positions: a Rao-Blackwellised estimate of the
  sequence `KL(π || π')` from samples `y ~ π`.

  By the chain rule of KL its expectation over `y ~ π` is the KL between the two distributions over whole
  generations (up to a stop token or the length limit), as for the k1 estimate `log π(y) - log π'(y)`
  (`kl.kl_k1`); but each position contributes the exact KL of its next-token distributions rather than one
  sample of it, so its variance is far smaller (zero for a one-token generation). Both models score under the
  same sampling distribution (`sampling_config`: its temperature; see `generation_log_probs`, whose chunks of
  positions and micro-batches it shares).

  Args:
    params: π's parameters (the distribution the samples were drawn from).
    other_params: π''s parameters, same model config.
    model_config: the model config (static).
    prompts: `[batch, prompt_len]` int32, left- or right-padded.
    prompt_mask: `[batch, prompt_len]` bool.
    tokens: `[batch, samples, time]` int32 samples of π.
    mask: `[batch, samples, time]` bool, True for generated tokens up to and including the stop token.
    sampling_config: the sampler's config (static), or None for the models' own distributions.
    micro_batches: static; it must divide `batch`.

  Returns:
    `[batch, samples]` float32, in nats; +inf where π' gives probability 0 to a token π can draw.

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> cfg = model_config_lib.tiny(vocab_size=8)
    >>> p, q = (transformer.init_params(cfg, jax.random.key(seed)) for seed in (0, 1))
    >>> prompts, prompt_mask = jnp.array([[1, 2]]), jnp.ones((1, 2), bool)
    >>> one_token = SamplingConfig(max_new_tokens=1, num_samples=3)
    >>> out = sample(p, prompts, prompt_mask, jax.random.key(2), one_token, cfg)
    >>> kl = generation_kl(p, q, cfg, prompts, prompt_mask, out.tokens, out.mask, one_token)
    >>> bool(jnp.all(kl == kl[0, 0]))   # one token: the exact KL of the first-token distributions, every sample
    True
  """
  chex.assert_rank([prompts, prompt_mask, tokens, mask], [2, 2, 3, 3])
  chex.assert_equal_shape([tokens, mask])
  return micro_batching.map_rows(
      lambda *rows: _generation_kl(params, other_params, model_config, *rows, sampling_config), micro_batches,
      prompts, prompt_mask, tokens, mask)


def _generation_kl(params: Params, other_params: Params, model_config: ModelConfig, prompts: jax.Array,
                   prompt_mask: jax.Array, tokens: jax.Array, mask: jax.Array,
                   sampling_config: SamplingConfig | None) -> jax.Array:
  batch, samples, time = tokens.shape
  hidden = [_predicting_hidden(p, model_config, prompts, prompt_mask, tokens, mask) for p in (params, other_params)]
  heads = [head_params(outer_params_after(p, hidden)) for p in (params, other_params)]

  def kl_of(heads, hidden_p, hidden_q):
    log_p, log_q = (jax.nn.log_softmax(_distribution_logits(head, model_config, h, sampling_config), axis=-1)
                    for head, h in zip(heads, (hidden_p, hidden_q)))
    probs = jnp.exp(log_p)
    # Tokens π never draws add nothing, whatever π' gives them (0 * -inf would be NaN).
    return jnp.sum(jnp.where(probs > 0, probs * (log_p - log_q), 0.0), axis=-1)

  chunk = _position_chunk(batch * samples, time, model_config.vocab_size, models=2)
  per_position = _over_position_chunks(kl_of, chunk, heads, *hidden)
  per_position = jnp.where(mask.reshape(-1, time).astype(bool), per_position, 0.0)
  return jnp.sum(per_position, axis=-1).reshape(batch, samples)


def make_sampling_config(settings, model_config: ModelConfig, num_samples: int) -> SamplingConfig:
  """The sampler's config for a run: `settings` is the run config's `sampling` group (`max_new_tokens`,
  `temperature`, `top_k`, `top_p`); stop and pad ids come from `model_config`.

  Example:
    >>> from bond_jax import run_config
    >>> from bond_jax.models import config as model_config_lib
    >>> make_sampling_config(run_config.base_config().sampling, model_config_lib.tiny(), 4).num_samples
    4
  """
  return SamplingConfig(
      max_new_tokens=settings.max_new_tokens,
      num_samples=num_samples,
      temperature=settings.temperature,
      top_k=settings.top_k,
      top_p=settings.top_p,
      stop_token_ids=model_config.stop_token_ids,
      pad_token_id=fill_token_id(model_config),
  )


def sample_log_probs(params: Params, model_config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                     samples: SampleOutput, sampling_config: SamplingConfig | None = None,
                     micro_batches: int = 1) -> jax.Array:
  """`log π(y)` of each whole sample `y` under `params`: `generation_log_probs` summed over time.

  Args:
    params: the model's parameters.
    model_config: its config.
    prompts: `[batch, prompt_len]` int32.
    prompt_mask: `[batch, prompt_len]` bool.
    samples: `SampleOutput` of `[batch, samples, time]` generations.
    sampling_config: the distribution to score them under (see `generation_log_probs`).
    micro_batches: parts of the prompts run one after the other (see `generation_log_probs`).

  Returns:
    `[batch, samples]` float32 sequence log-probabilities, differentiable.

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> cfg = model_config_lib.tiny(vocab_size=8)
    >>> params = transformer.init_params(cfg, jax.random.key(0))
    >>> prompts, prompt_mask = jnp.array([[1, 2]]), jnp.ones((1, 2), bool)
    >>> settings = SamplingConfig(max_new_tokens=3, num_samples=2)
    >>> out = sample(params, prompts, prompt_mask, jax.random.key(1), settings, cfg)
    >>> bool(jnp.allclose(sample_log_probs(params, cfg, prompts, prompt_mask, out, settings),
    ...                   out.log_probs.sum(-1), atol=1e-5))
    True
  """
  return jnp.sum(generation_log_probs(params, model_config, prompts, prompt_mask, samples.tokens, samples.mask,
                                      sampling_config, micro_batches), axis=-1)
