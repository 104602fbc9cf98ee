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

from bond_jax import sharding
from bond_jax.models import rope
from bond_jax.models.config import ModelConfig

Params = Any


class Cache(NamedTuple):
  """Keys/values of every layer at `max_len` slots; a pytree, so it flows through jit and while_loop.

  Attributes:
    k: `[layers, batch, max_len, num_kv_heads, head_dim]` rotated keys, in the compute dtype.
    v: `[layers, batch, max_len, num_kv_heads, head_dim]` values.
    mask: `[batch, max_len]` bool, True where a slot holds a real (attendable) token.
    index: int32 scalar, the next slot to write (shared by all rows).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array


class LayerData(NamedTuple):
  """What differs between layers besides their weights, as arrays (stacked `[layers, ...]` by `layer_data`), so
  one scanned block serves every layer (Gemma 3's interleaved local and global layers included).

  Attributes:
    frequencies: `[head_dim // 2]` float32 rotary frequencies (`rope.inv_freq` of the layer's `Rotary`).
    rotary_scale: float32 scalar, the rotary cos/sin scale (`Rotary.attention_factor`).
    window: int32 scalar, the sliding window in slots (`GLOBAL_WINDOW` for global attention).
  """

  frequencies: jax.Array
  rotary_scale: jax.Array
  window: jax.Array


GLOBAL_WINDOW = jnp.iinfo(jnp.int32).max  # A window no slot distance reaches: global attention.


def layer_data(config: ModelConfig) -> LayerData:
  """Every layer's `LayerData`, stacked along a leading `[layers]` axis, from `config.rotary` and
  `config.sliding_window`.

  Example:
    >>> from bond_jax.models.config import Rotary, tiny
    >>> data = layer_data(tiny(sliding_window=(3, None), rotary=(Rotary(theta=100.0), Rotary())))
    >>> data.frequencies.shape, data.window.tolist()
    ((2, 4), [3, 2147483647])
  """
  return LayerData(
      frequencies=jnp.stack([rope.inv_freq(r, config.head_dim) for r in config.rotary]),
      rotary_scale=jnp.asarray([r.attention_factor for r in config.rotary], jnp.float32),
      window=jnp.asarray([GLOBAL_WINDOW if w is None else w for w in config.sliding_window], jnp.int32))


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


def _norm(cfg: ModelConfig, name: str | None, ndim: int = 1) -> RMSNorm:
  return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, cfg.compute_dtype, cfg.weight_dtype, ndim, name=name)


class Attention(nn.Module):
  """Grouped-query self-attention of one layer (its `LayerData`): rotary embedding, optional qkv bias, q/k norms,
  sliding window and logit soft-capping."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index, data: LayerData):
    cfg = self.config
    dense = lambda features, axis, bias, name: nn.DenseGeneral(  # noqa: E731
        features, axis=axis, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        name=name)
    heads = lambda y: sharding.constrain(y, "batch", None, "heads", None)  # noqa: E731
    q = heads(dense((cfg.num_heads, cfg.head_dim), -1, cfg.qkv_bias, "q")(x))
    k = heads(dense((cfg.num_kv_heads, cfg.head_dim), -1, cfg.qkv_bias, "k")(x))
    v = heads(dense((cfg.num_kv_heads, cfg.head_dim), -1, cfg.qkv_bias, "v")(x))
    if cfg.qk_norm is not None:
      ndim = 1 if cfg.qk_norm == "head" else 2
      q, k = _norm(cfg, "q_norm", ndim)(q), _norm(cfg, "k_norm", ndim)(k)
    q = rope.rotate(q, positions, data.frequencies, data.rotary_scale)
    k = rope.rotate(k, positions, data.frequencies, data.rotary_scale)

    batch, time = x.shape[:2]
    query_slots = jnp.arange(time)
    new_kv = None
    if layer_cache is not None:
      cache_k, cache_v = layer_cache
      new_kv = (k.astype(cache_k.dtype), v.astype(cache_v.dtype))
      k = heads(lax.dynamic_update_slice(cache_k, new_kv[0], (0, cache_index, 0, 0)))
      v = heads(lax.dynamic_update_slice(cache_v, new_kv[1], (0, cache_index, 0, 0)))
      query_slots = query_slots + cache_index
    key_slots = jnp.arange(k.shape[1])
    behind = query_slots[:, None] - key_slots[None, :]  # [time, slots]
    allowed = key_mask[:, None, :] & ((behind >= 0) & (behind < data.window))[None]

    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, time, cfg.num_kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = _softcap(logits * cfg.attention_scale, cfg.attn_logit_softcap)
    # A finite floor (not -inf) keeps fully masked rows (pad queries before any real token) NaN-free.
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    out = heads(jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, time, cfg.num_heads, cfg.head_dim))
    return _residual(dense(cfg.d_model, (-2, -1), False, "o")(out)), new_kv


def _residual(x: jax.Array) -> jax.Array:
  """The residual stream `[batch, time, d_model]`, split over the batch axes only."""
  return sharding.constrain(x, "batch", None, None)


class MLP(nn.Module):
  """Gated MLP: SwiGLU (silu) or GeGLU (tanh-approximate gelu)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)
    hidden = lambda y: sharding.constrain(y, "batch", None, "mlp")  # noqa: E731
    gate = hidden(dense(cfg.mlp_dim, "gate")(x))
    act = jax.nn.silu(gate) if cfg.mlp_activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return _residual(dense(cfg.d_model, "down")(act * hidden(dense(cfg.mlp_dim, "up")(x))))


class Block(nn.Module):
  """One residual block: norms before (`pre_norms`) and/or on the outputs of (`post_norms`) attention and MLP.

  Returns the new residual stream and, with a cache, the new tokens' keys and values `[batch, time, kv_heads,
  head_dim]` (None without).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, key_mask, layer_cache, cache_index, data: LayerData):
    cfg = self.config
    h = _norm(cfg, "pre_attn_norm")(x) if cfg.pre_norms else x
    h, new_kv = Attention(cfg, name="attn")(h, positions, key_mask, layer_cache, cache_index, data)
    if cfg.post_norms:
      h = _norm(cfg, "post_attn_norm")(h)
    x = x + h
    h = MLP(cfg, name="mlp")(_norm(cfg, "pre_mlp_norm")(x) if cfg.pre_norms else x)
    if cfg.post_norms:
      h = _norm(cfg, "post_mlp_norm")(h)
    return _residual(x + h), new_kv


def _embedder(cfg: ModelConfig, name: str | None = None) -> nn.Embed:
  return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)


def _head_name(cfg: ModelConfig) -> str | None:
  """The head's parameter group: "score", "lm_head", or None when the LM head is the (tied) embedding."""
  if cfg.head == "score":
    return "score"
  return None if cfg.tie_embeddings else "lm_head"


def _head_dense(cfg: ModelConfig, name: str | None = None) -> nn.Dense:
  features = cfg.num_labels if cfg.head == "score" else cfg.vocab_size
  return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)


class Transformer(nn.Module):
  """The parameter tree: embedding, `num_layers` blocks (`layer_{i}`), final norm and an LM (tied or not) or score
  head. `init_params` creates it; `forward` applies the same modules, the blocks under one `lax.scan`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    x = _embedder(cfg, "embedder")(tokens)
    positions, mask = jnp.zeros(tokens.shape, jnp.int32), jnp.ones(tokens.shape, bool)
    data = layer_data(cfg)
    for i in range(cfg.num_layers):
      x, _ = Block(cfg, name=f"layer_{i}")(x, positions, mask, None, None, jax.tree.map(lambda d: d[i], data))
    x = _norm(cfg, "final_norm")(x)
    if _head_name(cfg) is not None:
      _head_dense(cfg, _head_name(cfg))(x)


LAYERS = "layers"  # The key of the stacked layers in `stack_layers`' tree.


def _is_layer(key: str) -> bool:
  return key.startswith("layer_")


def stack_layers(params: Params, config: ModelConfig) -> Params:
  """`params` with its `layer_{i}` groups stacked into one tree under `"layers"` (`[layers, ...]` leaves), as
  `forward` scans them.

  `forward` takes either layout and stacks the layers itself when given `init_params`' tree; a loop that calls it
  many times with the same weights (a decoding loop) stacks them once ahead.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> stacked = stack_layers(init_params(tiny(), jax.random.key(0)), tiny())
    >>> stacked["layers"]["attn"]["q"]["kernel"].shape   # [layers, d_model, heads, head_dim]
    (2, 32, 4, 8)
  """
  if LAYERS in params:
    return params
  layers = [params[f"layer_{i}"] for i in range(config.num_layers)]
  outer = {key: value for key, value in params.items() if not _is_layer(key)}
  return outer | {LAYERS: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


# What each remat policy lets a differentiated layer keep for the backward pass (see `config.REMAT_POLICIES`;
# "none" keeps everything, the layer's weights gathered over fsdp included). The others keep no weight: the
# backward pass gathers them again, as ZeRO-3 does.
_REMAT = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_UNROLLED_LAYERS = 2


def _scan_blocks(layers: Params, config: ModelConfig, step, carry: Any, xs: Any) -> tuple[Any, Any]:
  """`step(apply, carry, x) -> (carry, out)` over every layer, one `lax.scan` over the stacked layers (the
  program holds one block whatever the depth): `apply(*args)` runs the layer's `Block` with its weights, gathered
  over `fsdp` once for however many calls the step makes; each step is rematerialised in a backward pass as
  `config.remat` says."""
  block = Block(config, parent=None)

  def body(carry, layer):
    weights, data, x = layer
    variables = {"params": sharding.gather_over_fsdp(weights)}
    return step(lambda *args: block.apply(variables, *args, data), carry, x)

  if config.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT[config.remat], prevent_cse=False)
  # A model of a layer or two is unrolled: XLA compiles that faster than a loop (the tests' models).
  unroll = config.num_layers if config.num_layers <= _UNROLLED_LAYERS else 1
  return lax.scan(body, carry, (layers, layer_data(config), xs), unroll=unroll)


def _layers(layers: Params, config: ModelConfig, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
            cache: Cache | None, cache_index) -> tuple[jax.Array, Any]:
  """Every block over `x`.

  Returns the residual stream and, with a cache, the new tokens' keys and values of every layer `[layers, batch,
  time, kv_heads, head_dim]`.
  """
  step = lambda apply, x, layer_cache: apply(x, positions, key_mask, layer_cache, cache_index)  # noqa: E731
  return _scan_blocks(layers, config, step, x, None if cache is None else (cache.k, cache.v))


def _embed(params: Params, config: ModelConfig, tokens: jax.Array) -> jax.Array:
  """The residual stream's start `[batch, time, d_model]`; the table stays sharded for the lookup, so XLA moves
  the looked-up rows, not the table."""
  x = _residual(_embedder(config).apply({"params": params["embedder"]}, tokens))
  return x * jnp.asarray(math.sqrt(config.d_model), config.compute_dtype) if config.embed_scale else x


def forward(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
            attention_mask: jax.Array, cache: Cache | None = None, output_start: int = 0,
            hidden: bool = False) -> tuple[jax.Array, Cache | None]:
  """Runs the transformer, optionally appending to a KV cache.

  Query `t` attends to key `s` iff `s` holds a real token and `s <= t` in slot order (so causal in the layout
  of `tokens`, with pads anywhere), and, in a layer with a sliding window, `t - s < window` (slot distance, as
  transformers counts it: the distance in tokens wherever a row's real tokens are contiguous, as in every
  sequence `sampling` builds); rotary angles come from `positions`, which should count real tokens only
  (`positions_from_mask`). With a cache, the `time` new tokens are written at slots
  `[cache.index, cache.index + time)`, which must fit in the cache (writes past the end are clamped by XLA).

  The layers run as one `lax.scan` (one block in the program whatever the depth), each rematerialised in a
  backward pass as `config.remat` says. On a mesh set with `jax.set_mesh`, activations are constrained as
  `sharding.ACTIVATION_RULES` says and each layer's weights are all-gathered over `fsdp` where it runs (ZeRO-3).

  Args:
    params: from `init_params`, or with its layers stacked (`stack_layers`).
    config: the model config (static under jit).
    tokens: `[batch, time]` int32.
    positions: `[batch, time]` int32 rotary positions.
    attention_mask: `[batch, time]` bool, True = real token.
    cache: optional, from `init_cache(config, batch, max_len)` or a previous call.
    output_start: static int; outputs are computed for time steps `[output_start, time)` only (the head
      is the costliest layer of a large-vocabulary model at prefill).
    hidden: static; return the final norm's outputs `[batch, time - output_start, d_model]` (compute dtype)
      rather than the head's, for `head_outputs` to take in chunks.

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
  attention_mask = attention_mask.astype(bool)
  stacked = stack_layers(params, config)
  x = _embed(stacked, config, tokens)

  if cache is None:
    key_mask, cache_index = attention_mask, None
  else:
    key_mask = lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
    cache_index = cache.index
  x, new_kv = _layers(stacked[LAYERS], config, x, positions, key_mask, cache, cache_index)
  if cache is not None:
    write = lambda old, new: lax.dynamic_update_slice(old, new, (0, 0, cache.index, 0, 0))  # noqa: E731
    kv = lambda x: sharding.constrain(x, None, "batch", None, "heads", None)  # noqa: E731
    cache = Cache(kv(write(cache.k, new_kv[0])), kv(write(cache.v, new_kv[1])),
                  sharding.constrain(key_mask, "batch", None), cache.index + tokens.shape[1])

  outer = head_params(stacked)
  x = _norm(config, None).apply({"params": outer["final_norm"]}, x[:, output_start:])
  return (x if hidden else head_outputs(outer, config, x)), cache


def forward_after_prompts(params: Params, config: ModelConfig, prompts: jax.Array, prompt_mask: jax.Array,
                          tokens: jax.Array, positions: jax.Array, mask: jax.Array, hidden: bool = False,
                          ) -> tuple[jax.Array, jax.Array]:
  """Runs left-padded prompts and the same number of continuations of each in one pass of the layers: each layer
  runs the prompts, then every continuation attending to its prompt's keys and values and to its own earlier
  tokens, so the layer's weights are read (gathered over `fsdp`) once for both, and no all-layer KV cache exists.

  The same outputs as `forward` over the prompts into a cache, each row's cache repeated for its samples, then
  `forward` over the continuations from it.

  Args:
    params: from `init_params`, or with its layers stacked.
    config: the model config (static under jit).
    prompts: `[batch, prompt_len]` int32, left-padded (each row's real tokens last).
    prompt_mask: `[batch, prompt_len]` bool.
    tokens: `[batch * samples, time]` int32 continuations; row `b * samples + s` continues prompt `b`.
    positions: `[batch * samples, time]` int32 rotary positions of `tokens` (after their prompt's).
    mask: `[batch * samples, time]` bool, True = real token.
    hidden: static; final-norm outputs `[..., d_model]` (compute dtype) in place of the head's.

  Returns:
    `(last, outputs)`: the outputs at each prompt's last token `[batch, outputs]` and at every continuation token
    `[batch * samples, time, outputs]`, float32 logits or scores (`forward`'s).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cfg = tiny()
    >>> params, prompt_mask = init_params(cfg, jax.random.key(0)), jnp.array([[False, True, True]])
    >>> tokens, mask = jnp.array([[7, 8], [9, 10]]), jnp.ones((2, 2), bool)
    >>> last, outputs = forward_after_prompts(params, cfg, jnp.array([[0, 5, 6]]), prompt_mask, tokens,
    ...                                       jnp.array([[2, 3], [2, 3]]), mask)
    >>> whole, _ = forward(params, cfg, jnp.array([[5, 6, 9, 10]]), jnp.arange(4)[None], jnp.ones((1, 4), bool))
    >>> bool(jnp.allclose(outputs[1], whole[0, 2:], atol=1e-5)), bool(jnp.allclose(last[0], whole[0, 1], atol=1e-5))
    (True, True)
  """
  chex.assert_rank([prompts, prompt_mask, tokens, positions, mask], 2)
  chex.assert_equal_shape([prompts, prompt_mask])
  chex.assert_equal_shape([tokens, positions, mask])
  (batch, prompt_len), (rows, time) = prompts.shape, tokens.shape
  if rows % batch:
    raise ValueError(f"tokens has {rows} rows, not a multiple of the {batch} prompts.")
  samples = rows // batch
  prompt_mask, mask = prompt_mask.astype(bool), mask.astype(bool)
  stacked = stack_layers(params, config)
  repeat = lambda x: jnp.repeat(x, samples, axis=0)  # noqa: E731  (row b -> rows b * samples ...)
  key_mask = sharding.constrain(jnp.concatenate([repeat(prompt_mask), mask], axis=1), "batch", None)
  prompt_positions = positions_from_mask(prompt_mask)
  empty = jnp.zeros((batch, prompt_len, config.num_kv_heads, config.head_dim), config.compute_dtype)

  def step(apply, streams, _):
    x_prompts, x_tokens = streams
    x_prompts, (k, v) = apply(x_prompts, prompt_positions, prompt_mask, (empty, empty), 0)
    # Each continuation's slots: its prompt's keys and values, then its own (written at slot `prompt_len`).
    after = lambda y: jnp.pad(repeat(y), [(0, 0), (0, time), (0, 0), (0, 0)])  # noqa: E731
    x_tokens, _ = apply(x_tokens, positions, key_mask, (after(k), after(v)), prompt_len)
    return (x_prompts, x_tokens), None

  streams = (_embed(stacked, config, prompts), _embed(stacked, config, tokens))
  (x_prompts, x_tokens), _ = _scan_blocks(stacked[LAYERS], config, step, streams, None)
  outer = head_params(stacked)
  norm = lambda x: _norm(config, None).apply({"params": outer["final_norm"]}, x)  # noqa: E731
  last, x_tokens = norm(x_prompts[:, -1:]), norm(x_tokens)
  if hidden:
    return last[:, 0], x_tokens
  return head_outputs(outer, config, last)[:, 0], head_outputs(outer, config, x_tokens)


def _outer(params: Params) -> Params:
  return {key: value for key, value in params.items() if not _is_layer(key) and key != LAYERS}


def outer_params_after(params: Params, value: Any) -> Params:
  """`params` whose groups outside the layers (embedding, final norm, head: what a pass gathers whole, as
  `head_params` and `decoding_params` do) are computable only once `value` is (`sharding.params_after`), so that
  XLA gathers them when the pass that reads `value` runs, not at the program's start (where it would hold them
  through every earlier pass).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> params = init_params(tiny(), jax.random.key(0))
    >>> bool(jnp.all(outer_params_after(params, jnp.ones(2))["lm_head"]["kernel"] == params["lm_head"]["kernel"]))
    True
  """
  return params | sharding.params_after(_outer(params), value)


def head_params(params: Params) -> Params:
  """The parameters after the layers (final norm, and the head: the embedding where the model ties them),
  all-gathered over `fsdp` on a mesh: what `head_outputs` reads, gathered once ahead of a loop that calls it many
  times. An untied model's input embedding is left out: a pass's lookup reads it sharded.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> sorted(head_params(init_params(tiny(), jax.random.key(0))))
    ['final_norm', 'lm_head']
    >>> sorted(head_params(init_params(tiny(tie_embeddings=True), jax.random.key(0))))
    ['embedder', 'final_norm']
  """
  outer = _outer(params)
  if set(outer) - {"embedder", "final_norm"}:  # A head of its own.
    outer.pop("embedder", None)
  return sharding.gather_over_fsdp(outer)


def head_outputs(params: Params, config: ModelConfig, hidden_states: jax.Array) -> jax.Array:
  """The head on final-norm outputs (`forward(..., hidden=True)`): `[..., d_model]` -> float32 `[..., vocab]` logits
  (soft-capped as the model says) or `[..., num_labels]` scores.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cfg = tiny()
    >>> params, mask = init_params(cfg, jax.random.key(0)), jnp.ones((1, 3), bool)
    >>> hidden, _ = forward(params, cfg, jnp.array([[4, 5, 6]]), positions_from_mask(mask), mask, hidden=True)
    >>> logits, _ = forward(params, cfg, jnp.array([[4, 5, 6]]), positions_from_mask(mask), mask)
    >>> bool(jnp.all(head_outputs(params, cfg, hidden) == logits))
    True
  """
  name = _head_name(config)
  if name is None:
    out = _embedder(config).apply({"params": params["embedder"]}, hidden_states, method="attend")
  else:
    out = _head_dense(config).apply({"params": params[name]}, hidden_states)
  if config.head == "score":
    return out.astype(jnp.float32)
  return _softcap(sharding.constrain(out, *(["batch"] + [None] * (out.ndim - 2) + ["vocab"])).astype(jnp.float32),
                  config.final_logit_softcap)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters, the `params` collection (`embedder/embedding`, `layer_{i}/attn/q/kernel`, ...).

  Example:
    >>> from bond_jax.models.config import tiny
    >>> params = init_params(tiny(), jax.random.key(0))
    >>> params["layer_0"]["attn"]["q"]["kernel"].shape   # [d_model, heads, head_dim]
    (32, 4, 8)
  """
  return Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


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
  return cast_weights(params, config.compute_dtype)


def cast_weights(params: Params, dtype) -> Params:
  """`params` with every weight matrix in `dtype` and norm scales left as they are (see `cast_to_compute_dtype`):
  frozen weights held in their model's compute dtype.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cast_weights(init_params(tiny(), jax.random.key(0)), "bfloat16")["embedder"]["embedding"].dtype
    dtype(bfloat16)
  """
  def cast(path, x):
    stacked = getattr(path[0], "key", None) == LAYERS  # a leading layer axis (`stack_layers`)
    return x.astype(dtype) if x.ndim - stacked >= 2 else x
  return jax.tree_util.tree_map_with_path(cast, params)


def decoding_params(params: Params, config: ModelConfig) -> Params:
  """The weights a decoding loop reads at every step, prepared once ahead of it: cast to the compute dtype
  (`cast_to_compute_dtype`), layers stacked (`stack_layers`) and, on a mesh set with `jax.set_mesh`, all-gathered
  over `fsdp` (still split over `tensor`), so that the loop runs no collective over the batch axes.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cfg = tiny(dtype="bfloat16")
    >>> decoding_params(init_params(cfg, jax.random.key(0)), cfg)["layers"]["mlp"]["up"]["kernel"].dtype
    dtype(bfloat16)
  """
  stacked = stack_layers(cast_to_compute_dtype(params, config), config)
  return sharding.gather_over_fsdp(_outer(stacked)) | {LAYERS: sharding.gather_over_fsdp(stacked[LAYERS],
                                                                                        layer_axis=True)}


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
  """An empty KV cache of `max_len` slots per row, in the compute dtype.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> cache = init_cache(tiny(), batch=4, max_len=128)
    >>> cache.k.shape, int(cache.index)   # [layers, batch, max_len, kv_heads, head_dim]
    ((2, 4, 128, 2, 8), 0)
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}.")
  zeros = jnp.zeros((config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim), config.compute_dtype)
  return Cache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))
