"""Decoder-only transformer hyper-parameters (Llama / Qwen2 / Gemma / Gemma 2 families)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_ACTIVATIONS = ("silu", "gelu_tanh")
_HEADS = ("lm", "score")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer; frozen, so it is hashable and a valid jit static argument.

  Example:
    >>> cfg = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
    ...                   head_dim=8, mlp_dim=64, max_seq_len=64)
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int  # grouped-query attention: num_heads % num_kv_heads == 0
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  mlp_activation: str = "silu"  # "silu" (SwiGLU, Llama/Qwen2) | "gelu_tanh" (GeGLU, Gemma)
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  norm_plus_one: bool = False  # Gemma RMSNorm: x * (1 + w)
  embed_scale: bool = False  # Gemma: embeddings * sqrt(d_model), in the compute dtype
  post_norms: bool = False  # Gemma 2: extra post-attention / post-MLP norms
  attn_logit_softcap: float | None = None  # Gemma 2
  final_logit_softcap: float | None = None  # Gemma 2
  query_pre_attn_scalar: float | None = None  # attention scale = scalar**-0.5; None => head_dim**-0.5
  head: str = "lm"  # "lm": vocab logits | "score": sequence-classification head
  num_labels: int = 1  # for head == "score"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  pad_token_id: int = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None

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
    for name in ("rope_theta", "norm_eps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}.")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"ModelConfig.{name} must be None or > 0, got {value!r}.")
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(f"ModelConfig.mlp_activation={self.mlp_activation!r}; allowed: {_ACTIVATIONS}.")
    if self.head not in _HEADS:
      raise ValueError(f"ModelConfig.head={self.head!r}; allowed: {_HEADS}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; allowed: {_DTYPES}.")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"ModelConfig.{name}={value!r} must lie in [0, vocab_size={self.vocab_size}).")

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
    >>> cfg = tiny(num_kv_heads=1, tie_embeddings=True)
  """
  fields = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                mlp_dim=64, max_seq_len=64)
  return ModelConfig(**{**fields, **overrides})
