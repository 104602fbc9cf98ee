"""Transformer: a numpy oracle per architecture family, causality, padding invariance, cached decoding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import (ModelConfig, cast_to_compute_dtype, forward, init_cache, init_params, positions_from_mask,
                             tiny)
from bond_jax.models.config import Rotary

CONFIGS = {
    "llama": tiny(),  # GQA (4 query heads share 2 kv heads), SwiGLU, untied head
    "qwen2": tiny(qkv_bias=True, num_kv_heads=1, rotary=Rotary(theta=1000.0)),
    "gemma2": tiny(mlp_activation="gelu_tanh", tie_embeddings=True, norm_plus_one=True, embed_scale=True,
                   post_norms=True, attn_logit_softcap=2.0, final_logit_softcap=3.0,
                   query_pre_attn_scalar=16.0),
    # Gemma 3: per-head q/k norms, a local layer (window 3) and a global one with its own, scaled, rotary embedding.
    "gemma3": tiny(mlp_activation="gelu_tanh", norm_plus_one=True, embed_scale=True, post_norms=True, qk_norm="head",
                   sliding_window=(3, None),
                   rotary=(Rotary(theta=100.0), Rotary(theta=1000.0, kind="linear", factor=4.0))),
    # OLMo 2: norms after attention and MLP only, q/k norms over whole projections; here also a sliding window.
    "olmo2": tiny(pre_norms=False, post_norms=True, qk_norm="projection", sliding_window=3),
    "score": tiny(head="score", num_labels=3, num_kv_heads=4),
}
SEQ = 8

jit_forward = jax.jit(forward, static_argnames=("config", "output_start"))


def random_params(config, seed=0):
  """init_params, then every leaf perturbed, so biases and norm scales (zero/one at init) matter."""
  params = init_params(config, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
  config = CONFIGS[request.param]
  return config, random_params(config)


def numpy_oracle(params, cfg: ModelConfig, tokens):
  """One unpadded sequence `[time]` -> `[time, out]`, written from the HF modelling code's definitions."""
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  time = len(tokens)

  def norm(x, scale):
    w = 1.0 + scale if cfg.norm_plus_one else scale
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * w

  def rope(x, rotary):  # x [time, heads, head_dim]; rotate each pair (i, i + half) by angle pos * theta^(-2i/d)
    assert rotary.kind in ("default", "linear")
    half = cfg.head_dim // 2
    out = x.copy()
    for i in range(half):
      angle = np.arange(time)[:, None] * rotary.theta ** (-2.0 * i / cfg.head_dim) / rotary.factor
      a, b = x[..., i], x[..., i + half]
      out[..., i] = a * np.cos(angle) - b * np.sin(angle)
      out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out

  def cap(x, c):
    return x if c is None else c * np.tanh(x / c)

  x = p["embedder"]["embedding"][tokens]
  if cfg.embed_scale:
    x = x * math.sqrt(cfg.d_model)
  for i in range(cfg.num_layers):
    lp = p[f"layer_{i}"]
    h = norm(x, lp["pre_attn_norm"]["scale"]) if cfg.pre_norms else x
    qkv = {}
    for name in "qkv":
      qkv[name] = np.einsum("td,dhe->the", h, lp["attn"][name]["kernel"])
      if cfg.qkv_bias:
        qkv[name] = qkv[name] + lp["attn"][name]["bias"]
    for name in "qk" if cfg.qk_norm else "":
      scale = lp["attn"][f"{name}_norm"]["scale"]
      if cfg.qk_norm == "head":
        qkv[name] = norm(qkv[name], scale)
      else:  # the whole projection, all heads together
        qkv[name] = norm(qkv[name].reshape(time, -1), scale).reshape(qkv[name].shape)
    q, k, v = rope(qkv["q"], cfg.rotary[i]), rope(qkv["k"], cfg.rotary[i]), qkv["v"]
    repeat = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, repeat, axis=1), np.repeat(v, repeat, axis=1)  # HF repeat_kv
    scores = np.einsum("the,she->hts", q, k) * cfg.attention_scale
    scores = cap(scores, cfg.attn_logit_softcap)
    behind = np.arange(time)[:, None] - np.arange(time)[None, :]
    window = cfg.sliding_window[i] or time
    scores = np.where((behind >= 0) & (behind < window), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = np.einsum("hts,she,hed->td", weights, v, lp["attn"]["o"]["kernel"])
    if cfg.post_norms:
      h = norm(h, lp["post_attn_norm"]["scale"])
    x = x + h
    h = norm(x, lp["pre_mlp_norm"]["scale"]) if cfg.pre_norms else x
    gate = h @ lp["mlp"]["gate"]["kernel"]
    if cfg.mlp_activation == "silu":
      act = gate / (1 + np.exp(-gate))
    else:
      act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    h = (act * (h @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"]["kernel"]
    if cfg.post_norms:
      h = norm(h, lp["post_mlp_norm"]["scale"])
    x = x + h
  x = norm(x, p["final_norm"]["scale"])
  if cfg.head == "score":
    return x @ p["score"]["kernel"]
  head = p["embedder"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return cap(x @ head, cfg.final_logit_softcap)


def run(params, config, tokens, mask):
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
  return np.asarray(jit_forward(params, config, tokens, positions_from_mask(mask), mask)[0])


def test_matches_numpy_oracle(model):
  config, params = model
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, SEQ))
  out = run(params, config, tokens, np.ones_like(tokens, bool))
  for row in range(2):
    np.testing.assert_allclose(out[row], numpy_oracle(params, config, tokens[row]), rtol=2e-4, atol=2e-4)


def test_causal(model):
  config, params = model
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, SEQ))
  changed = tokens.copy()
  changed[:, 5] = (changed[:, 5] + 1) % config.vocab_size
  mask = np.ones_like(tokens, bool)
  out, out_changed = run(params, config, tokens, mask), run(params, config, changed, mask)
  np.testing.assert_allclose(out[:, :5], out_changed[:, :5], rtol=1e-5, atol=1e-5)
  assert np.abs(out[:, 5:] - out_changed[:, 5:]).max() > 1e-3


def test_padding_invariance(model):
  """Left- and right-padded rows give the unpadded logits at their real tokens, whatever the pad ids."""
  config, params = model
  rng = np.random.default_rng(2)
  real = rng.integers(0, config.vocab_size, (5,))
  reference = run(params, config, real[None], np.ones((1, 5), bool))[0]
  pads = rng.integers(0, config.vocab_size, (SEQ - 5,))
  tokens = np.stack([np.concatenate([pads, real]), np.concatenate([real, pads])])
  mask = np.stack([np.arange(SEQ) >= SEQ - 5, np.arange(SEQ) < 5])
  out = run(params, config, tokens, mask)
  np.testing.assert_allclose(out[0, SEQ - 5:], reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1, :5], reference, rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(out))


def test_cached_decode_matches_full_forward(model):
  """Prefill 3 slots of a left-padded batch, then decode one token at a time: same outputs as one forward."""
  config, params = model
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, SEQ)), jnp.int32)
  mask = jnp.asarray([np.arange(SEQ) >= 2, np.ones(SEQ, bool)])
  positions = positions_from_mask(mask)
  full = np.asarray(jit_forward(params, config, tokens, positions, mask)[0])
  out, cache = jit_forward(params, config, tokens[:, :3], positions[:, :3], mask[:, :3],
                           init_cache(config, 2, SEQ))
  steps = [out]
  for t in range(3, SEQ):
    out, cache = jit_forward(params, config, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(out)
  cached = np.concatenate(steps, axis=1)
  real = np.asarray(mask)
  np.testing.assert_allclose(cached[real], full[real], rtol=1e-5, atol=1e-5)
  assert int(cache.index) == SEQ
  np.testing.assert_array_equal(cache.mask, mask)


def test_output_start_slices_outputs(model):
  config, params = model
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, SEQ)), jnp.int32)
  mask = jnp.ones_like(tokens, bool)
  full = jit_forward(params, config, tokens, positions_from_mask(mask), mask)[0]
  tail = jit_forward(params, config, tokens, positions_from_mask(mask), mask, output_start=SEQ - 2)[0]
  np.testing.assert_allclose(tail, full[:, SEQ - 2:], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="output_start"):
    forward(params, config, tokens, positions_from_mask(mask), mask, output_start=SEQ)


def test_param_tree_names():
  config = CONFIGS["gemma3"]
  params = init_params(dataclasses.replace(config, qkv_bias=True, head="score", num_labels=2),
                       jax.random.key(0))
  paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  layer = ["pre_attn_norm/scale", "attn/q/kernel", "attn/q/bias", "attn/k/kernel", "attn/k/bias",
           "attn/v/kernel", "attn/v/bias", "attn/q_norm/scale", "attn/k_norm/scale", "attn/o/kernel",
           "post_attn_norm/scale", "pre_mlp_norm/scale", "mlp/gate/kernel", "mlp/up/kernel", "mlp/down/kernel",
           "post_mlp_norm/scale"]
  expected = {"embedder/embedding", "final_norm/scale", "score/kernel"}
  expected |= {f"layer_{i}/{name}" for i in range(config.num_layers) for name in layer}
  assert paths == expected
  assert params["layer_0"]["attn"]["o"]["kernel"].shape == (4, 8, 32)
  assert params["layer_0"]["attn"]["k"]["kernel"].shape == (32, 2, 8)
  assert params["layer_0"]["attn"]["q_norm"]["scale"].shape == (8,)
  assert "lm_head" in init_params(CONFIGS["llama"], jax.random.key(0))
  olmo = init_params(CONFIGS["olmo2"], jax.random.key(0))["layer_0"]
  assert "pre_attn_norm" not in olmo and olmo["attn"]["k_norm"]["scale"].shape == (2 * 8,)


def test_bfloat16_compute_tracks_float32():
  config = CONFIGS["gemma2"]
  params = random_params(config)
  tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, SEQ))
  mask = np.ones_like(tokens, bool)
  bf16 = run(params, dataclasses.replace(config, dtype="bfloat16"), tokens, mask)
  f32 = run(params, config, tokens, mask)
  assert bf16.dtype == np.float32
  np.testing.assert_allclose(bf16, f32, atol=0.15)
  assert np.abs(bf16 - f32).max() > 0  # it really computed in bfloat16


@pytest.mark.parametrize("overrides, field", [
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(head_dim=7), "head_dim"), (dict(head="value"), "head"),
    (dict(mlp_activation="relu"), "mlp_activation"), (dict(dtype="int8"), "dtype"),
    (dict(attn_logit_softcap=0.0), "attn_logit_softcap"), (dict(stop_token_ids=(1, 64)), "stop_token_ids"),
    (dict(pad_token_id=-1), "pad_token_id"), (dict(sliding_window=(4, 4, 4)), "sliding_window"),
    (dict(sliding_window=0), "sliding_window"), (dict(qk_norm="layer"), "qk_norm"),
    (dict(num_layers=0), "num_layers")])
def test_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    tiny(**overrides)


@pytest.mark.parametrize("fields, field", [
    (dict(kind="longrope"), "kind"), (dict(kind="llama3", factor=8.0), "original_max_len"),
    (dict(theta=0.0), "theta"), (dict(kind="llama3", original_max_len=8, low_freq_factor=4.0), "high_freq_factor")])
def test_rotary_validation(fields, field):
  with pytest.raises(ValueError, match=field):
    Rotary(**fields)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_casting_weights_to_the_compute_dtype_changes_no_output(name):
  config = dataclasses.replace(CONFIGS[name], dtype="bfloat16")
  params = random_params(config)
  cast = cast_to_compute_dtype(params, config)
  for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
    # Matrices (and 2-D biases) in bfloat16; norm scales, read in float32 by the model, untouched.
    assert leaf.dtype == (jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32), jax.tree_util.keystr(path)
  tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, SEQ))
  mask = np.ones_like(tokens, bool)
  mask[1, :3] = False
  np.testing.assert_array_equal(run(cast, config, tokens, mask), run(params, config, tokens, mask))
