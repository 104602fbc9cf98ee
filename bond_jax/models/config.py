"""Decoder-only transformer hyper-parameters: one config for the Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3 and
OLMo 2 families, with each family's differences as feature flags and per-layer data (rotary embedding, window)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_ACTIVATIONS = ("silu", "gelu_tanh")
_HEADS = ("lm", "score")
_DTYPES = ("float32", "bfloat16", "float16")
_QK_NORMS = (None, "head", "projection")
# What a differentiated pass keeps of each layer for the backward pass: everything ("none"), only the layer's input
# ("block": the layer runs again in the backward pass), or the outputs of its weight matmuls ("matmuls").
REMAT_POLICIES = ("none", "block", "matmuls")
ROTARY_KINDS = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rotary:
  """The rotary embedding of one layer, as transformers' `modeling_rope_utils` computes it from `rope_parameters`.

  `kind` is the `rope_type`: "default" (plain), "linear" (frequencies / factor), "dynamic" (NTK scaling that
  transformers only applies past `max_position_embeddings`, which `ModelConfig.max_seq_len` never exceeds: plain
  here), "llama3" (Llama 3.1 band-wise scaling) or "yarn" (YaRN ramp, cos/sin scaled by `attention_factor`).
  `bond_jax.models.rope.inv_freq` turns it into frequencies.

  Attributes:
    theta: the base wavelength (`rope_theta`).
    kind: one of `ROTARY_KINDS`.
    factor: the scaling factor (kinds other than "default").
    low_freq_factor: "llama3" only.
    high_freq_factor: "llama3" only.
    original_max_len: the pretraining context (`original_max_position_embeddings`), "llama3" and "yarn".
    beta_fast: "yarn": the ramp's high-rotation bound.
    beta_slow: "yarn": the ramp's low-rotation bound.
    truncate: "yarn": whether the ramp's bounds are rounded outwards to whole dimensions.
    attention_factor: "yarn": the scale of cos and sin (1.0 for every other kind).

  Example:
    >>> Rotary(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    ...        original_max_len=8192).kind
    'llama3'
  """

  theta: float = 10_000.0
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float = 1.0

  def __post_init__(self):
    if self.kind not in ROTARY_KINDS:
      raise ValueError(f"Rotary.kind={self.kind!r}; allowed: {ROTARY_KINDS}.")
    for name in ("theta", "factor", "attention_factor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"Rotary.{name} must be > 0, got {getattr(self, name)!r}.")
    if self.kind in ("llama3", "yarn") and self.original_max_len < 1:
      raise ValueError(f"Rotary.original_max_len must be a positive int for kind {self.kind!r}, "
                       f"got {self.original_max_len!r}.")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(f"Rotary needs high_freq_factor > low_freq_factor > 0 for kind 'llama3', got "
                       f"{self.high_freq_factor!r} and {self.low_freq_factor!r}.")


def _per_layer(config: ModelConfig, name: str, value, single: type | tuple[type, ...]) -> tuple:
  """`value` as a `num_layers`-tuple: a single value is repeated; ValueError for a tuple of another length."""
  values = (value,) * config.num_layers if isinstance(value, single) else tuple(value)
  if len(values) != config.num_layers:
    raise ValueError(f"ModelConfig.{name} has {len(values)} entries; expected one per layer "
                     f"(num_layers={config.num_layers}).")
  return values


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; frozen, so it is hashable and a valid jit static argument.

  `rotary` and `sliding_window` hold one entry per layer (a single value given is repeated for every layer).

  Attributes:
    rotary: per layer, its `Rotary` embedding (Gemma 3 uses two: local and global layers).
    sliding_window: per layer, the attention window in tokens (a query attends to keys fewer than `window`
      slots back, itself included, as transformers' sliding-window masks do), or None for global attention.
    qk_norm: RMSNorm of queries and keys before the rotary embedding: None, "head" (over each head, Qwen3 and
      Gemma 3) or "projection" (over all heads of the projection at once, OLMo 2).
    pre_norms: norms before attention and before the MLP (every family but OLMo 2).
    post_norms: norms on the attention and MLP outputs (Gemma 2 and 3 on top of pre-norms; OLMo 2 instead).
    pad_token_id: the checkpoint's declared pad id (`config.json`), None if it declares none. Only
      sequence-classification pooling reads it (the model itself reads padding from masks).
    stop_token_ids: the ids that end a generation (all of them; `hf.load_checkpoint` reads what `generate`
      stops on); empty: generation never stops early.
    family: the Hugging Face model family whose checkpoint layout the weights follow (`hf.save_checkpoint`
      writes that architecture; e.g. Phi-3 fuses q/k/v and gate/up on disk).
    remat: one of `REMAT_POLICIES`: how a differentiated pass trades memory for recomputation (a run choice, like
      `dtype`; it changes no output).

  Example:
    >>> cfg = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
    ...                   head_dim=8, mlp_dim=64, max_seq_len=64, sliding_window=(16, None))
    >>> cfg.sliding_window, cfg.rotary[1].theta
    ((16, None), 10000.0)
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int  # grouped-query attention: num_heads % num_kv_heads == 0
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rotary: Rotary | tuple[Rotary, ...] = Rotary()
  sliding_window: int | None | tuple[int | None, ...] = None
  norm_eps: float = 1e-6
  mlp_activation: str = "silu"  # "silu" (SwiGLU, Llama/Qwen2) | "gelu_tanh" (GeGLU, Gemma)
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  qk_norm: str | None = None
  norm_plus_one: bool = False  # Gemma RMSNorm: x * (1 + w)
  embed_scale: bool = False  # Gemma: embeddings * sqrt(d_model), in the compute dtype
  pre_norms: bool = True
  post_norms: bool = False
  attn_logit_softcap: float | None = None  # Gemma 2
  final_logit_softcap: float | None = None  # Gemma 2
  query_pre_attn_scalar: float | None = None  # attention scale = scalar**-0.5; None => head_dim**-0.5
  head: str = "lm"  # "lm": vocab logits | "score": sequence-classification head
  num_labels: int = 1  # for head == "score"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  family: str = "llama"
  remat: str = "none"

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "max_seq_len", "num_labels"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.")
    # Frozen: the normalised per-layer tuples are set once here, so equal configs compare and hash equal.
    object.__setattr__(self, "rotary", _per_layer(self, "rotary", self.rotary, Rotary))
    object.__setattr__(self, "sliding_window",
                       _per_layer(self, "sliding_window", self.sliding_window, (int, type(None))))
    if not all(isinstance(r, Rotary) for r in self.rotary):
      raise ValueError(f"ModelConfig.rotary entries must be Rotary, got {self.rotary!r}.")
    if not all(w is None or (isinstance(w, int) and w >= 1) for w in self.sliding_window):
      raise ValueError(f"ModelConfig.sliding_window entries must be positive ints or None, "
                       f"got {self.sliding_window!r}.")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}.")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"ModelConfig.{name} must be None or > 0, got {value!r}.")
    for name, allowed in (("mlp_activation", _ACTIVATIONS), ("head", _HEADS), ("qk_norm", _QK_NORMS),
                          ("dtype", _DTYPES), ("param_dtype", _DTYPES), ("remat", REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; allowed: {allowed}.")
    if not isinstance(self.stop_token_ids, tuple):
      raise ValueError(f"ModelConfig.stop_token_ids must be a tuple of ints, got {self.stop_token_ids!r}.")
    for name, value in [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)] + [
        ("stop_token_ids", i) for i in self.stop_token_ids]:
      if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
        raise ValueError(f"ModelConfig.{name}: {value!r} must be an int in [0, vocab_size={self.vocab_size}).")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


def tiny(**overrides) -> ModelConfig:
  """A few-thousand-parameter config for tests; any field can be overridden.

  Example:
    >>> tiny(num_kv_heads=1, tie_embeddings=True).num_kv_heads
    1
  """
  fields = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                mlp_dim=64, max_seq_len=64)
  return ModelConfig(**{**fields, **overrides})
