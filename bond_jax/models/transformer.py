"""A decoder-only transformer with a static-shape KV cache: one `Block` whose feature flags and per-layer data
(`ModelConfig`) cover the Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3 and OLMo 2 families.

The flax.linen modules are internal; the public functions take the parameter pytree explicitly:

  >>> from bond_jax.models.config import tiny
  >>> config = tiny()
  >>> params = init_params(config, jax.random.key(0))
  >>> mask = jnp.array([[False, True, True]])
  >>> logits, _ = forward(params, config, jnp.array([[0, 5, 6]]), positions_from_mask(mask), mask)
  >>> logits.shape
  (1, 3, 64)

Cached decoding writes `T` new tokens of every row at the cache's shared write slot `index` (one
`dynamic_update_slice`, static shapes); each row's validity lives in `Cache.mask`, so rows with different
prompt lengths share one slot counter while their rotary positions (given by the caller) differ.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from bond_jax.models import rope
from bond_jax.models.config import ModelConfig

Params = Any


class Cache(NamedTuple):
  """Keys/values of every layer at `max_len` slots; a pytree, so it flows through jit and while_loop.

  Attributes:
    k: per layer `[batch, max_len, num_kv_heads, head_dim]` rotated keys, in the compute dtype.
    v: per layer `[batch, max_len, num_kv_heads, head_dim]` values.
    mask: `[batch, max_len]` bool, True where a slot holds a real (attendable) token.
    index: int32 scalar, the next slot to write (shared by all rows).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Rotary positions that count only real tokens: `[batch, time]` bool -> `[batch, time]` int32.

  Pads get the position of the previous real token (0 before the first), which is harmless: they are never
  attended to.

  Example:
    >>> positions_from_mask(jnp.array([[False, True, True]]))
    Array([[0, 0, 1]], dtype=int32)
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class RMSNorm(nn.Module):
  """RMSNorm in float32 over the last `len(shape)` axes; Gemma stores `w` and scales by `1 + w`.

  The scale is stored flat (`[prod(shape)]`, 1-D like every norm scale, so `cast_to_compute_dtype` leaves it in
  float32): OLMo 2 normalises the queries of all heads together, `shape = (heads, head_dim)`.
  """

  eps: float
  plus_one: bool
  dtype: Any
  param_dtype: Any
  ndim: int = 1

  @nn.compact
  def __call__(self, x):
    shape = x.shape[-self.ndim:]
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", init, (math.prod(shape),), self.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32).reshape(x.shape[:-self.ndim] + (-1,))
    normed = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale if self.plus_one else scale)).reshape(x.shape).astype(self.dtype)


def _norm(cfg: ModelConfig, name: str, ndim: int = 1) -> RMSNorm:
  return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.compute_dtype, cfg.weight_dtype, ndim, name=name)


class Attention(nn.Module):
  """Grouped-query self-attention of layer `layer`: rotary embedding, optional qkv bias, q/k norms, sliding
  window and logit soft-capping."""

  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index):
    cfg = self.config
    dense = lambda features, axis, bias, name: nn.DenseGeneral(  # noqa: E731
        features, axis=axis, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        name=name)
    q = dense((cfg.num_heads, cfg.head_dim), -1, cfg.qkv_bias, "q")(x)
    k = dense((cfg.num_kv_heads, cfg.head_dim), -1, cfg.qkv_bias, "k")(x)
    v = dense((cfg.num_kv_heads, cfg.head_dim), -1, cfg.qkv_bias, "v")(x)
    if cfg.qk_norm is not None:
      ndim = 1 if cfg.qk_norm == "head" else 2
      q, k = _norm(cfg, "q_norm", ndim)(q), _norm(cfg, "k_norm", ndim)(k)
    rotary = cfg.rotary[self.layer]
    q, k = rope.apply_rope(q, positions, rotary), rope.apply_rope(k, positions, rotary)

    batch, time = x.shape[:2]
    query_slots = jnp.arange(time)
    if layer_cache is not None:
      cache_k, cache_v = layer_cache
      k = lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
      v = lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
      query_slots = query_slots + cache_index
      layer_cache = (k, v)
    key_slots = jnp.arange(k.shape[1])
    behind = query_slots[:, None] - key_slots[None, :]  # [time, slots]
    allowed = behind >= 0
    window = cfg.sliding_window[self.layer]
    if window is not None:
      allowed &= behind < window
    allowed = key_mask[:, None, :] & allowed[None]

    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, time, cfg.num_kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = _softcap(logits * cfg.attention_scale, cfg.attn_logit_softcap)
    # A finite floor (not -inf) keeps fully masked rows (pad queries before any real token) NaN-free.
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, time, cfg.num_heads, cfg.head_dim)
    return dense(cfg.d_model, (-2, -1), False, "o")(out), layer_cache


class MLP(nn.Module):
  """Gated MLP: SwiGLU (silu) or GeGLU (tanh-approximate gelu)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)
    gate = dense(cfg.mlp_dim, "gate")(x)
    act = jax.nn.silu(gate) if cfg.mlp_activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return dense(cfg.d_model, "down")(act * dense(cfg.mlp_dim, "up")(x))


class Block(nn.Module):
  """Residual block `layer`: norms before (`pre_norms`) and/or on the outputs of (`post_norms`) attention and MLP."""

  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index):
    cfg = self.config
    h = _norm(cfg, "pre_attn_norm")(x) if cfg.pre_norms else x
    h, layer_cache = Attention(cfg, self.layer, name="attn")(h, positions, key_mask, layer_cache, cache_index)
    if cfg.post_norms:
      h = _norm(cfg, "post_attn_norm")(h)
    x = x + h
    h = MLP(cfg, name="mlp")(_norm(cfg, "pre_mlp_norm")(x) if cfg.pre_norms else x)
    if cfg.post_norms:
      h = _norm(cfg, "post_mlp_norm")(h)
    return x + h, layer_cache


class Transformer(nn.Module):
  """Embedding, `num_layers` blocks, final norm and an LM (tied or not) or score head."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, attention_mask, cache, output_start):
    cfg = self.config
    embedder = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                        param_dtype=cfg.weight_dtype, name="embedder")
    x = embedder(tokens)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), cfg.compute_dtype)

    if cache is None:
      key_mask, cache_index = attention_mask, None
    else:
      key_mask = lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
      cache_index = cache.index
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_cache = Block(cfg, i, name=f"layer_{i}")(x, positions, key_mask, layer_cache, cache_index)
      if cache is not None:
        new_k.append(layer_cache[0])
        new_v.append(layer_cache[1])

    # The head (vocab-sized for "lm") runs only where outputs are wanted, e.g. the last prompt token.
    x = x[:, output_start:]
    x = _norm(cfg, "final_norm")(x)
    if cfg.head == "score":
      out = nn.Dense(cfg.num_labels, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                     name="score")(x).astype(jnp.float32)
    else:
      if cfg.tie_embeddings:
        out = embedder.attend(x)
      else:
        out = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                       name="lm_head")(x)
      out = _softcap(out.astype(jnp.float32), cfg.final_logit_softcap)
    if cache is None:
      return out, None
    return out, Cache(tuple(new_k), tuple(new_v), key_mask, cache.index + tokens.shape[1])


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters, the `params` collection (`embedder/embedding`, `layer_{i}/attn/q/kernel`, ...).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> params = init_params(tiny(), jax.random.key(0))
    >>> params["layer_0"]["attn"]["q"]["kernel"].shape   # [d_model, heads, head_dim]
    (32, 4, 8)
  """
  dummy = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(config).init(rng, dummy, dummy, jnp.ones((1, 1), bool), None, 0)
  return variables["params"]


def cast_to_compute_dtype(params: Params, config: ModelConfig) -> Params:
  """`params` with every weight matrix (`ndim >= 2`) in the compute dtype: the model's outputs do not change.

  Each layer casts its matrices and biases to the compute dtype before using them, and reads its norm scales
  (1-D) in float32, so casting once ahead is exact. A decoding loop given float32 parameters and a bfloat16
  compute dtype would otherwise read the float32 matrices and cast them again at every step (XLA does not hoist
  the casts out of the loop): 4 bytes per weight read plus 2 written and read again, rather than 2 (decoding a
  1B model on an H200 ran 1.86x faster cast once: benchmarks/RESULTS.md).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cfg = tiny(dtype="bfloat16")
    >>> decode_params = cast_to_compute_dtype(init_params(cfg, jax.random.key(0)), cfg)
    >>> decode_params["layer_0"]["attn"]["q"]["kernel"].dtype, decode_params["final_norm"]["scale"].dtype
    (dtype(bfloat16), dtype('float32'))
  """
  return jax.tree.map(lambda x: x.astype(config.compute_dtype) if x.ndim >= 2 else x, params)


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
            attention_mask: jax.Array, cache: Cache | None = None,
            output_start: int = 0) -> tuple[jax.Array, Cache | None]:
  """Runs the transformer, optionally appending to a KV cache.

  Query `t` attends to key `s` iff `s` holds a real token and `s <= t` in slot order (so causal in the layout
  of `tokens`, with pads anywhere), and, in a layer with a sliding window, `t - s < window` (slot distance, as
  transformers counts it: the distance in tokens wherever a row's real tokens are contiguous, as in every
  sequence `sampling` builds); rotary angles come from `positions`, which should count real tokens only
  (`positions_from_mask`). With a cache, the `time` new tokens are written at slots
  `[cache.index, cache.index + time)`, which must fit in the cache (writes past the end are clamped by XLA).

  Args:
    params: from `init_params`.
    config: the model config (static under jit).
    tokens: `[batch, time]` int32.
    positions: `[batch, time]` int32 rotary positions.
    attention_mask: `[batch, time]` bool, True = real token.
    cache: optional, from `init_cache(config, batch, max_len)` or a previous call.
    output_start: static int; outputs are computed for time steps `[output_start, time)` only (the head
      is the costliest layer of a large-vocabulary model at prefill).

  Returns:
    `(outputs, cache)`: float32 `[batch, time - output_start, vocab]` logits (head "lm") or
    `[batch, time - output_start, num_labels]` scores (head "score"), and the updated cache (None when none
    was given).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cfg = tiny(head="score", num_labels=2)
    >>> mask = jnp.array([[True, True, False]])
    >>> scores, _ = forward(init_params(cfg, jax.random.key(0)), cfg, jnp.array([[4, 5, 0]]),
    ...                     positions_from_mask(mask), mask)
    >>> scores.shape
    (1, 3, 2)
  """
  chex.assert_rank([tokens, positions, attention_mask], 2)
  chex.assert_equal_shape([tokens, positions, attention_mask])
  if not 0 <= output_start < tokens.shape[1]:
    raise ValueError(f"output_start={output_start} must lie in [0, time={tokens.shape[1]}).")
  return Transformer(config).apply({"params": params}, tokens, positions, attention_mask.astype(bool), cache,
                                   output_start)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty KV cache of `max_len` slots per row, in the compute dtype.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cache = init_cache(tiny(), batch=4, max_len=128)
    >>> len(cache.k), cache.k[0].shape, int(cache.index)
    (2, (4, 128, 2, 8), 0)
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}.")
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
  return Cache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))
