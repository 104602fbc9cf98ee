"""Hugging Face checkpoints <-> our parameter tree, without PyTorch.

Reads and writes, on a local disk or an object store (any path `bond_jax.paths` speaks, e.g. ``gs://bucket/model``),
the Hugging Face layout (``config.json``, ``generation_config.json`` and ``*.safetensors``, sharded
with a ``model.safetensors.index.json`` or not) of the families in ``FAMILIES`` (Llama 1-3 with every rope scaling
transformers has but LongRoPE, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3, OLMo 2), each with a
causal-LM head (``*ForCausalLM``) or a sequence-classification head (``*ForSequenceClassification`` -> our head
``"score"``).

``config.json`` is read through the family's own transformers config class, which standardises the older layouts
still found on disk (``rope_scaling``, ``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``,
``use_sliding_window`` / ``max_window_layers``) and fills what a file omits with the defaults ``from_pretrained``
would use. What we do not implement is refused with a ``ValueError`` naming the config field and its value.

Layouts: a torch ``Linear`` stores ``[out, in]``; we store ``[in, out]`` with the head axes split out, so q/k/v
become ``[d_model, heads, head_dim]`` and o becomes ``[heads, head_dim, d_model]``. Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are split into our q/k/v and gate/up on load and fused again on save. Our rotary embedding uses the
HF ``rotate_half`` convention, so q/k need no permutation. Gemma's RMSNorm scale is stored as in HF (``w``, the
effective scale being ``1 + w``).

Reading: each ``*.safetensors`` file's header is read alone, then only the byte ranges of the tensors needed. Given
a mesh, every process reads only a contiguous band of rows of each tensor (1 / processes of its bytes), places it
on its own devices with ``jax.make_array_from_callback``, and one compiled reshuffle per tensor converts it to our
layout and dtype on the mesh, sharded by ``sharding.param_shardings``: no host holds, and no device receives, a
whole model. (safetensors' own ``safe_open`` reads local files only.)

Example (a random Qwen3 policy written as a checkpoint and read back)::

  >>> import tempfile
  >>> from bond_jax.models import config as config_lib, transformer
  >>> cfg = config_lib.tiny(family="qwen3", qk_norm="head", stop_token_ids=(1, 2))
  >>> path = tempfile.mkdtemp()
  >>> save_checkpoint(transformer.init_params(cfg, jax.random.key(0)), cfg, path)
  >>> params, loaded = load_checkpoint(path)
  >>> loaded == cfg, sorted(os.listdir(path))
  (True, ['config.json', 'generation_config.json', 'model.safetensors'])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bond_jax import paths
from bond_jax import sharding
from bond_jax.models.config import ROTARY_KINDS, ModelConfig, Rotary

Params = dict[str, Any]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one Hugging Face family lays out its config and weights.

  Attributes:
    model_type: ``config.json``'s ``model_type``.
    prefix: the architecture names' prefix (``Llama`` -> ``LlamaForCausalLM``).
    features: the ModelConfig flags the family fixes (the others keep their defaults).
    windows: where the family declares sliding windows: "none", "all" (``sliding_window`` on every layer) or
      "layer_types" (``sliding_window`` on the layers ``layer_types`` marks "sliding_attention").
    activation_key: the config field the MLP reads its activation from.
    gemma_attention: whether ``query_pre_attn_scalar`` and the final logit soft-cap apply (Gemma 2 and 3).
    attn_softcap: whether ``attn_logit_softcapping`` applies (Gemma 2; Gemma 3's attention ignores it).
    fused: whether q/k/v and gate/up are stored fused (Phi-3).
    score_architecture: the sequence classifier's architecture, when not ``prefix + "ForSequenceClassification"``.
  """

  model_type: str
  prefix: str
  features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  windows: str = "none"
  activation_key: str = "hidden_act"
  gemma_attention: bool = False
  attn_softcap: bool = False
  fused: bool = False
  score_architecture: str | None = None

  def architecture(self, head: str) -> str:
    if head == "score":
      return self.score_architecture or self.prefix + "ForSequenceClassification"
    return self.prefix + "ForCausalLM"


_GEMMA = dict(norm_plus_one=True, embed_scale=True)
FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama", "Llama"),
    "mistral": _Family("mistral", "Mistral", windows="all"),
    "qwen2": _Family("qwen2", "Qwen2", dict(qkv_bias=True), windows="layer_types"),
    "qwen3": _Family("qwen3", "Qwen3", dict(qk_norm="head"), windows="layer_types"),
    "gemma": _Family("gemma", "Gemma", _GEMMA),
    "gemma2": _Family("gemma2", "Gemma2", _GEMMA | dict(post_norms=True), windows="layer_types",
                      activation_key="hidden_activation", gemma_attention=True, attn_softcap=True),
    "gemma3": _Family("gemma3_text", "Gemma3", _GEMMA | dict(post_norms=True, qk_norm="head"),
                      windows="layer_types", activation_key="hidden_activation", gemma_attention=True,
                      score_architecture="Gemma3TextForSequenceClassification"),
    "phi3": _Family("phi3", "Phi3", windows="all", fused=True),
    "olmo2": _Family("olmo2", "Olmo2", dict(pre_norms=False, post_norms=True, qk_norm="projection")),
}
# The ModelConfig flags some family sets, at their defaults.
_FLAG_DEFAULTS = {name: ModelConfig.__dataclass_fields__[name].default
                  for name in {flag for family in FAMILIES.values() for flag in family.features}}
_HEADS = ("lm", "score")
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
# Tensors that some checkpoints carry but that hold no parameters (recomputed rotary frequencies).
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
_SLIDING, _FULL = "sliding_attention", "full_attention"


def _parse_architecture(hf: Mapping[str, Any]) -> tuple[str, str]:
  """(family, head) of an HF config dict; ValueError for anything we cannot load."""
  architectures = hf.get("architectures") or []
  if len(architectures) != 1:
    raise ValueError(f"config 'architectures' must name exactly one architecture, got {architectures!r}.")
  (architecture,) = architectures
  for name, family in FAMILIES.items():
    for head in _HEADS:
      if architecture == family.architecture(head):
        if hf.get("model_type") != family.model_type:
          raise ValueError(f"config model_type={hf.get('model_type')!r} does not match architecture "
                           f"{architecture!r} (model_type {family.model_type!r}).")
        return name, head
  supported = sorted(f.architecture(h) for f in FAMILIES.values() for h in _HEADS)
  raise ValueError(f"Unsupported architecture {architecture!r}; supported: {supported}.")


def _transformers_config(hf: Mapping[str, Any]):
  """``hf`` through its transformers config class: old layouts standardised, omitted fields at their defaults."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top  (config classes only: no PyTorch is needed)

  try:
    return transformers.AutoConfig.for_model(**copy.deepcopy(dict(hf)))
  except huggingface_hub.errors.StrictDataclassError as e:
    raise ValueError(f"config {hf.get('model_type')!r} rejected by transformers: {' '.join(str(e).split())}") from e


def _stop_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
  if value is None:
    return ()
  return (value,) if isinstance(value, int) else tuple(value)


def _rotary(rope: Mapping[str, Any], hf, truncate: bool) -> Rotary:
  """The Rotary of one standardised ``rope_parameters`` dict; ValueError for what we do not implement."""
  kind = rope.get("rope_type", "default")
  if kind not in ROTARY_KINDS:
    raise ValueError(f"config rope_parameters rope_type={kind!r} is not supported; supported: {ROTARY_KINDS}.")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config rope_parameters partial_rotary_factor={rope['partial_rotary_factor']!r} is not "
                     "supported (only rotary embeddings over the whole head).")
  fields = dict(theta=float(rope["rope_theta"]), kind=kind)
  if kind != "default":
    # yarn without a factor: the ratio of the extended to the pretraining context, as transformers takes it.
    fields["factor"] = float(rope.get("factor")
                             or hf.max_position_embeddings / rope["original_max_position_embeddings"])
  if kind in ("llama3", "yarn"):
    fields["original_max_len"] = int(rope["original_max_position_embeddings"])
  if kind == "llama3":
    fields.update(low_freq_factor=float(rope["low_freq_factor"]), high_freq_factor=float(rope["high_freq_factor"]))
  if kind == "yarn":
    # transformers' `_compute_yarn_parameters`: the cos/sin scale, from `factor` (and DeepSeek's mscales).
    def mscale(scale: float, m: float = 1.0) -> float:
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
      m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
      attention_factor = (mscale(fields["factor"], m) / mscale(fields["factor"], m_all) if m and m_all
                          else mscale(fields["factor"]))
    fields.update(attention_factor=float(attention_factor), beta_fast=float(rope.get("beta_fast") or 32),
                  beta_slow=float(rope.get("beta_slow") or 1), truncate=bool(truncate))
  return Rotary(**fields)


def _layer_types(hf, num_layers: int) -> list[str]:
  return list(getattr(hf, "layer_types", None) or [_FULL] * num_layers)


def _windows(hf, family: _Family, num_layers: int) -> tuple[int | None, ...]:
  """Each layer's sliding window (None: global attention), as the family's attention reads it."""
  if family.windows == "none":
    return (None,) * num_layers
  window = getattr(hf, "sliding_window", None)
  if family.windows == "all":
    return (window,) * num_layers
  layer_types = _layer_types(hf, num_layers)
  if _SLIDING in layer_types and window is None:
    raise ValueError(f"config layer_types={layer_types} has sliding layers but sliding_window=None.")
  return tuple(window if t == _SLIDING else None for t in layer_types)


def _rotaries(hf, num_layers: int) -> tuple[Rotary, ...]:
  """Each layer's Rotary: one ``rope_parameters`` for all, or one per layer type (Gemma 3)."""
  rope = hf.rope_parameters
  layer_types = _layer_types(hf, num_layers)
  truncate = rope.get("truncate", True)  # transformers reads it from the outer dict, nested or not
  if {_SLIDING, _FULL} & set(rope):
    per_type = {t: _rotary(rope[t], hf, truncate) for t in set(layer_types)}
    return tuple(per_type[t] for t in layer_types)
  return (_rotary(rope, hf, truncate),) * num_layers


def _refuse_unsupported(hf, family_name: str) -> None:
  """ValueError naming the first config field whose value changes the model in a way we do not implement."""
  for field in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    value = getattr(hf, field, None)
    if value and not (field == "attention_bias" and family_name == "qwen2"):
      raise ValueError(f"config {field}={value!r} is not supported for {family_name!r}.")


def config_from_hf(hf_config: Mapping[str, Any] | Any, dtype: str = "float32",
                   generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
  """Maps a Hugging Face config (``config.json`` dict or ``PretrainedConfig``) to a ModelConfig.

  Args:
    hf_config: the parsed ``config.json``, or a ``transformers.PretrainedConfig``.
    dtype: parameter and compute dtype of the returned config.
    generation_config: the parsed ``generation_config.json``, if the checkpoint has one: its ``eos_token_id``
      are then the stop ids, as ``generate`` reads them (else ``config.json``'s ``eos_token_id``).

  Returns:
    The ModelConfig: ``max_seq_len`` is ``max_position_embeddings``, ``pad_token_id`` the declared pad id (None
    when there is none), ``stop_token_ids`` every end-of-generation id. ValueError for an unsupported architecture
    or a config field whose value we do not implement (the message names both).

  Example:
    >>> config = config_from_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32,
    ...                          "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                          "num_key_value_heads": 2, "intermediate_size": 64, "sliding_window": 16,
    ...                          "eos_token_id": [2, 3]})
    >>> config.family, config.sliding_window, config.stop_token_ids, config.pad_token_id
    ('mistral', (16, 16), (2, 3), None)
  """
  as_dict = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  family_name, head = _parse_architecture(as_dict)
  family = FAMILIES[family_name]
  hf = hf_config if hasattr(hf_config, "to_dict") else _transformers_config(as_dict)
  _refuse_unsupported(hf, family_name)
  activation_name = getattr(hf, family.activation_key)
  if activation_name not in _ACTIVATIONS:
    raise ValueError(f"config {family.activation_key}={activation_name!r} is not supported; supported: "
                     f"{sorted(_ACTIVATIONS)}.")
  num_layers = hf.num_hidden_layers
  eos = hf.eos_token_id if generation_config is None else generation_config.get("eos_token_id")
  return ModelConfig(
      vocab_size=hf.vocab_size,
      num_layers=num_layers,
      d_model=hf.hidden_size,
      num_heads=hf.num_attention_heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
      mlp_dim=hf.intermediate_size,
      max_seq_len=hf.max_position_embeddings,
      rotary=_rotaries(hf, num_layers),
      sliding_window=_windows(hf, family, num_layers),
      norm_eps=float(hf.rms_norm_eps),
      mlp_activation=_ACTIVATIONS[activation_name],
      tie_embeddings=head == "lm" and bool(hf.tie_word_embeddings),
      attn_logit_softcap=hf.attn_logit_softcapping if family.attn_softcap else None,
      final_logit_softcap=hf.final_logit_softcapping if family.gemma_attention else None,
      query_pre_attn_scalar=hf.query_pre_attn_scalar if family.gemma_attention else None,
      head=head,
      num_labels=hf.num_labels if head == "score" else 1,
      dtype=dtype,
      param_dtype=dtype,
      pad_token_id=hf.pad_token_id,
      bos_token_id=hf.bos_token_id,
      stop_token_ids=_stop_ids(eos),
      family=family_name,
      **(_FLAG_DEFAULTS | dict(family.features)),
  )


def _rope_parameters(rotary: Rotary) -> dict[str, Any]:
  """The ``rope_parameters`` dict of one Rotary (inverse of ``_rotary``)."""
  out: dict[str, Any] = dict(rope_type=rotary.kind, rope_theta=rotary.theta)
  if rotary.kind != "default":
    out["factor"] = rotary.factor
  if rotary.kind in ("llama3", "yarn"):
    out["original_max_position_embeddings"] = rotary.original_max_len
  if rotary.kind == "llama3":
    out.update(low_freq_factor=rotary.low_freq_factor, high_freq_factor=rotary.high_freq_factor)
  if rotary.kind == "yarn":
    out.update(attention_factor=rotary.attention_factor, beta_fast=rotary.beta_fast, beta_slow=rotary.beta_slow,
               truncate=rotary.truncate)
  return out


def _one(values: Sequence[Any], what: str, family_name: str) -> Any:
  """The single distinct value of ``values``; ValueError if the family cannot declare several."""
  distinct = list(dict.fromkeys(values))
  if len(distinct) > 1:
    raise ValueError(f"ModelConfig {what} differ across layers ({distinct}); family {family_name!r} declares one.")
  return distinct[0] if distinct else None


def _check_representable(config: ModelConfig, family: _Family) -> None:
  """ValueError if ``config`` has a feature its family's checkpoints cannot express."""
  expected = _FLAG_DEFAULTS | dict(family.features)
  differing = {name: getattr(config, name) for name, value in expected.items() if getattr(config, name) != value}
  absent = ([] if family.attn_softcap else ["attn_logit_softcap"]) + (
      [] if family.gemma_attention else ["final_logit_softcap", "query_pre_attn_scalar"])
  differing.update({name: getattr(config, name) for name in absent if getattr(config, name) is not None})
  if family.windows == "none" and any(config.sliding_window):
    differing["sliding_window"] = config.sliding_window
  if differing:
    raise ValueError(f"No Hugging Face architecture of family {config.family!r} has the model features "
                     f"{differing} (it has {expected}).")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The ``config.json`` dict of a ModelConfig (inverse of ``config_from_hf`` up to dtypes).

  Raises ValueError if the config's family (``config.family``) cannot express one of its features.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> hf = config_to_hf(tiny(family="gemma2", norm_plus_one=True, embed_scale=True, post_norms=True,
    ...                        sliding_window=(8, None), query_pre_attn_scalar=16.0))
    >>> hf["architectures"], hf["layer_types"], hf["sliding_window"]
    (['Gemma2ForCausalLM'], ['sliding_attention', 'full_attention'], 8)
  """
  if config.family not in FAMILIES:
    raise ValueError(f"ModelConfig.family={config.family!r}; supported: {sorted(FAMILIES)}.")
  family = FAMILIES[config.family]
  _check_representable(config, family)
  activation = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[config.mlp_activation]
  stop = list(config.stop_token_ids)
  hf: dict[str, Any] = dict(
      architectures=[family.architecture(config.head)],
      model_type=family.model_type,
      vocab_size=config.vocab_size,
      num_hidden_layers=config.num_layers,
      hidden_size=config.d_model,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      intermediate_size=config.mlp_dim,
      max_position_embeddings=config.max_seq_len,
      rms_norm_eps=config.norm_eps,
      tie_word_embeddings=config.tie_embeddings,
      pad_token_id=config.pad_token_id,
      bos_token_id=config.bos_token_id,
      eos_token_id=stop[0] if len(stop) == 1 else (stop or None),
      dtype=config.param_dtype,
  )
  hf[family.activation_key] = activation
  if config.head == "score":
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  layer_types = [_FULL if w is None else _SLIDING for w in config.sliding_window]
  window = _one([w for w in config.sliding_window if w is not None], "sliding windows", config.family)
  if family.windows == "all":
    hf["sliding_window"] = _one(config.sliding_window, "sliding windows", config.family)
  elif family.windows == "layer_types":
    hf["layer_types"] = layer_types
    if family.gemma_attention:
      # Gemma builds its sliding mask even with no sliding layer: a window no sequence reaches changes nothing.
      hf["sliding_window"] = window or config.max_seq_len
    else:
      hf.update(sliding_window=window, use_sliding_window=window is not None,
                max_window_layers=layer_types.index(_SLIDING) if window else config.num_layers)
  if config.family == "gemma3":
    by_type = {t: _one([r for r, lt in zip(config.rotary, layer_types) if lt == t], f"{t} rotary", config.family)
               for t in (_SLIDING, _FULL)}
    hf["rope_parameters"] = {t: _rope_parameters(r or Rotary()) for t, r in by_type.items()}
  else:
    hf["rope_parameters"] = _rope_parameters(_one(config.rotary, "rotary embeddings", config.family))
  if family.gemma_attention:
    hf.update(attn_logit_softcapping=config.attn_logit_softcap, final_logit_softcapping=config.final_logit_softcap,
              query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim)
  return hf


def generation_config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The ``generation_config.json`` dict: ``generate`` stops on every one of ``config.stop_token_ids``.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> generation_config_to_hf(tiny(stop_token_ids=(1, 7), pad_token_id=0, bos_token_id=2))
    {'bos_token_id': 2, 'eos_token_id': [1, 7], 'pad_token_id': 0}
  """
  stop = list(config.stop_token_ids)
  return dict(bos_token_id=config.bos_token_id, eos_token_id=stop[0] if len(stop) == 1 else (stop or None),
              pad_token_id=config.pad_token_id)


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
  """One HF tensor and the parameters of ours it holds, stacked along its first axis (Phi-3 fuses q, k and v).

  Attributes:
    parts: ``(path, our_shape)`` of each parameter, in the tensor's order.
    hf_shape: the tensor's shape.
    transpose: torch Linear weights are ``[out, in]``; ours are ``[in, ...out]``.
  """

  parts: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
  hf_shape: tuple[int, ...]
  transpose: bool

  def _hf_part_shapes(self) -> list[tuple[int, ...]]:
    row = math.prod(self.hf_shape[1:])
    return [(math.prod(shape) // row,) + self.hf_shape[1:] for _, shape in self.parts]

  @property
  def row_axis(self) -> int:
    """The axis of the tensor's rows (its first axis) once in our axis order (`oriented`)."""
    return len(self.hf_shape) - 1 if self.transpose else 0

  def oriented(self, x):
    """The tensor in our axis order: transposed if stored ``[out, in]``."""
    return x.T if self.transpose else x

  def split_oriented(self, y) -> list:
    """Our parameters from the oriented tensor, split along its rows: numpy arrays from a numpy array, traced
    arrays from a traced one."""
    bounds = np.cumsum([0] + [s[0] for s in self._hf_part_shapes()]).tolist()
    rows = lambda start, stop: (slice(None),) * self.row_axis + (slice(start, stop),)
    return [y[rows(start, stop)].reshape(shape) for start, stop, (_, shape) in zip(bounds, bounds[1:], self.parts)]

  def to_ours(self, x) -> list:
    return self.split_oriented(self.oriented(x))

  def to_hf(self, values: Sequence[np.ndarray]) -> np.ndarray:
    pieces = [x.reshape(shape[::-1]).T if self.transpose else x.reshape(shape)
              for x, shape in zip(values, self._hf_part_shapes())]
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _tensor_specs(config: ModelConfig) -> dict[str, _TensorSpec]:
  """HF tensor name -> _TensorSpec for every parameter of ``config``'s model."""
  d, h, kv, hd, f = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
  fused = FAMILIES[config.family].fused
  specs = {}

  def add(hf_name, hf_shape, parts, transpose=True):
    specs[hf_name] = _TensorSpec(tuple((tuple(path.split("/")), shape) for path, shape in parts), hf_shape, transpose)

  def norm(hf_name, path, size=d):
    add(hf_name, (size,), [(path + "/scale", (size,))], transpose=False)

  add(EMBEDDING, (config.vocab_size, d), [("embedder/embedding", (config.vocab_size, d))], transpose=False)
  for i in range(config.num_layers):
    hf_layer, layer = f"model.layers.{i}", f"layer_{i}"
    heads = dict(q=h, k=kv, v=kv)
    qkv = {name: (f"{layer}/attn/{name}/kernel", (d, n, hd)) for name, n in heads.items()}
    if config.pre_norms:
      norm(f"{hf_layer}.input_layernorm.weight", f"{layer}/pre_attn_norm")
    if fused:
      add(f"{hf_layer}.self_attn.qkv_proj.weight", ((h + 2 * kv) * hd, d), qkv.values())
    for name, n in heads.items():
      if not fused:
        add(f"{hf_layer}.self_attn.{name}_proj.weight", (n * hd, d), [qkv[name]])
      if config.qkv_bias:
        add(f"{hf_layer}.self_attn.{name}_proj.bias", (n * hd,), [(f"{layer}/attn/{name}/bias", (n, hd))],
            transpose=False)
    if config.qk_norm is not None:
      for name in "qk":
        norm(f"{hf_layer}.self_attn.{name}_norm.weight", f"{layer}/attn/{name}_norm",
             hd if config.qk_norm == "head" else heads[name] * hd)
    add(f"{hf_layer}.self_attn.o_proj.weight", (d, h * hd), [(f"{layer}/attn/o/kernel", (h, hd, d))])
    if config.pre_norms:
      # Gemma 2 and 3 name their four norms differently: post_attention_layernorm is the post-attention norm there.
      mlp_norm = "pre_feedforward_layernorm" if config.post_norms else "post_attention_layernorm"
      norm(f"{hf_layer}.{mlp_norm}.weight", f"{layer}/pre_mlp_norm")
    if config.post_norms:
      norm(f"{hf_layer}.post_attention_layernorm.weight", f"{layer}/post_attn_norm")
      norm(f"{hf_layer}.post_feedforward_layernorm.weight", f"{layer}/post_mlp_norm")
    gate_up = [(f"{layer}/mlp/{name}/kernel", (d, f)) for name in ("gate", "up")]
    if fused:
      add(f"{hf_layer}.mlp.gate_up_proj.weight", (2 * f, d), gate_up)
    else:
      add(f"{hf_layer}.mlp.gate_proj.weight", (f, d), gate_up[:1])
      add(f"{hf_layer}.mlp.up_proj.weight", (f, d), gate_up[1:])
    add(f"{hf_layer}.mlp.down_proj.weight", (d, f), [(f"{layer}/mlp/down/kernel", (f, d))])
  norm("model.norm.weight", "final_norm")
  if config.head == "score":
    add("score.weight", (config.num_labels, d), [("score/kernel", (d, config.num_labels))])
  elif not config.tie_embeddings:
    add(LM_HEAD, (config.vocab_size, d), [("lm_head/kernel", (d, config.vocab_size))])
  return specs


# safetensors dtype names -> numpy dtypes (bfloat16 and float8 through ml_dtypes, as JAX has them).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
  """One ``*.safetensors`` file read by byte ranges: its header (names, dtypes, shapes, offsets) first, then only
  the rows of the tensors asked for. ``bytes_read`` counts every byte read from the file.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> weights = SafetensorsFile(os.path.join(default_assets.ASSETS_DIR, "policy", WEIGHTS_FILE))
    >>> weights.shape(EMBEDDING), weights.read_rows(EMBEDDING, 2, 4).shape, weights.bytes_read < 2 * 4 * 128 * 4 + 9000
    ((405, 128), (2, 128), True)
  """

  def __init__(self, path: paths.PathLike):
    self.path = path
    (length,) = struct.unpack("<Q", paths.read_ranges(path, [(0, 8)])[0])
    header = json.loads(paths.read_ranges(path, [(8, 8 + length)])[0])
    header.pop("__metadata__", None)
    self._tensors = header
    self._data_start = 8 + length
    self.bytes_read = 8 + length

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(_SAFETENSORS_DTYPES[self._tensors[name]["dtype"]])

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the first axis of tensor ``name`` (one contiguous byte range)."""
    shape, dtype = self.shape(name), self.dtype(name)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    offset = self._data_start + self._tensors[name]["data_offsets"][0]
    if stop <= start:
      return np.zeros((0, *shape[1:]), dtype)
    (data,) = paths.read_ranges(self.path, [(offset + start * row_bytes, offset + stop * row_bytes)])
    self.bytes_read += len(data)
    return np.frombuffer(data, dtype).reshape(stop - start, *shape[1:])

  def read(self, name: str) -> np.ndarray:
    return self.read_rows(name, 0, self.shape(name)[0])


def _weight_files(path: paths.Path) -> dict[str, SafetensorsFile]:
  """Tensor name -> the safetensors file holding it (its header read), for a checkpoint directory.

  As ``from_pretrained`` reads them: the files of ``model.safetensors.index.json`` if there is one, else
  ``model.safetensors``; other ``*.safetensors`` files (e.g. Mistral's ``consolidated.safetensors``) are not the
  model's.
  """
  index_file = path / WEIGHTS_INDEX_FILE
  if index_file.exists():
    weight_map = json.loads(index_file.read_text())["weight_map"]
    files = {file: SafetensorsFile(path / file) for file in sorted(set(weight_map.values()))}
    return {name: files[file] for name, file in weight_map.items()}
  file = path / WEIGHTS_FILE
  if not file.exists():
    raise FileNotFoundError(f"Checkpoint directory {os.fspath(path)!r} has neither {WEIGHTS_FILE} nor "
                            f"{WEIGHTS_INDEX_FILE}.")
  weights = SafetensorsFile(file)
  return {name: weights for name in weights.names()}


def _read(source: tuple[SafetensorsFile, str]) -> np.ndarray:
  file, name = source
  return file.read(name)


def _resolve_tied_head(config: ModelConfig, files: Mapping[str, SafetensorsFile]
                       ) -> tuple[ModelConfig, dict[str, tuple[SafetensorsFile, str]]]:
  """The config and, for each tensor name to load, its ``(file, stored name)``.

  A tied config whose checkpoint also stores ``lm_head.weight`` is resolved as transformers (5.x) resolves it: the
  same values as the embedding, tied (the copy ignored); different values, the stored head is real and the config
  wrong, so the model is loaded untied, with a warning naming the tensor; only the head stored, it is the shared
  matrix.
  """
  sources = {name: (file, name) for name, file in files.items()}
  if not (config.head == "lm" and config.tie_embeddings and LM_HEAD in sources):
    return config, sources
  head = sources.pop(LM_HEAD)
  if EMBEDDING not in sources:
    sources[EMBEDDING] = head
  elif not np.array_equal(_read(sources[EMBEDDING]), _read(head)):
    logging.warning("The config ties the output head to the embedding (tie_word_embeddings=true), but the "
                    "checkpoint stores a different %r: loading it untied, as transformers does.", LM_HEAD)
    sources[LM_HEAD] = head
    config = dataclasses.replace(config, tie_embeddings=False)
  return config, sources


def _check_names(expected: set[str], found: set[str]) -> None:
  """ValueError naming the missing and unexpected tensors, if any."""
  unexpected = {n for n in found - expected if not _IGNORED_TENSORS.match(n)}
  missing = expected - found
  if missing or unexpected:
    raise ValueError(
        f"Checkpoint tensors do not match the config: missing {sorted(missing)}, unexpected {sorted(unexpected)}."
    )


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    if key not in tree:
      raise ValueError(f"params has no entry {'/'.join(path)!r} (needed for the config given).")
    tree = tree[key]
  return tree


def read_config(path: paths.PathLike, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a checkpoint directory: ``config.json``, with the stop ids of ``generation_config.json``
  when the directory has one (as ``generate`` reads them).

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> read_config(os.path.join(default_assets.ASSETS_DIR, "policy")).stop_token_ids
    (2,)
  """
  path = paths.as_path(path)
  hf = json.loads((path / CONFIG_FILE).read_text())
  generation_file = path / GENERATION_CONFIG_FILE
  generation_config = json.loads(generation_file.read_text()) if generation_file.exists() else None
  return config_from_hf(hf, dtype=dtype, generation_config=generation_config)


def load_checkpoint(path: paths.PathLike, dtype: str = "float32", mesh: Mesh | None = None
                    ) -> tuple[Params, ModelConfig]:
  """Loads a Hugging Face checkpoint directory (local, or on an object store) into our parameter tree.

  Args:
    path: directory with ``config.json`` (and, optionally, ``generation_config.json``) and ``model.safetensors``
      (or a sharded index with its shards).
    dtype: dtype of the returned parameters and of the config's compute (``"float32"`` or ``"bfloat16"``).
    mesh: if given, each parameter is read straight onto ``mesh``, sharded by ``sharding.param_shardings``, each
      process reading only a band of rows of each tensor (see the module docstring); every process must call it.
      Without, the parameters are read whole onto the default device.

  Returns:
    ``(params, config)``: params a nested dict of arrays in our layout, config a ModelConfig (``read_config``,
    untied if the checkpoint stores an output head that differs from its embedding while the config says tied).
    ValueError (naming the tensor) for unknown architectures and missing, unexpected or mis-shaped tensors.

  Example:
    >>> from bond_jax import sharding
    >>> from bond_jax.tasks import default_assets
    >>> params, config = load_checkpoint(os.path.join(default_assets.ASSETS_DIR, "policy"))
    >>> config.family, config.tie_embeddings, params["embedder"]["embedding"].shape
    ('llama', True, (405, 128))
    >>> sharded, _ = load_checkpoint(os.path.join(default_assets.ASSETS_DIR, "policy"), "bfloat16",
    ...                              mesh=sharding.make_mesh((1, 2, 4)))
    >>> kernel = sharded["layer_0"]["mlp"]["gate"]["kernel"]
    >>> kernel.dtype, kernel.sharding.spec, bool((kernel == params["layer_0"]["mlp"]["gate"]["kernel"].astype(
    ...     jnp.bfloat16)).all())
    (dtype(bfloat16), P('fsdp', 'tensor'), True)
  """
  path = paths.as_path(path)
  config = read_config(path, dtype=dtype)
  config, sources = _resolve_tied_head(config, _weight_files(path))
  specs = _tensor_specs(config)
  _check_names(set(specs), set(sources))
  for name, spec in specs.items():
    file, stored = sources[name]
    if file.shape(stored) != spec.hf_shape:
      raise ValueError(f"Tensor {name!r} has shape {file.shape(stored)}; the config implies {spec.hf_shape}.")
  if mesh is None:
    params: Params = {}
    for name, spec in specs.items():
      for (part_path, _), value in zip(spec.parts, spec.to_ours(_read(sources[name]))):
        _set_path(params, part_path, jax.numpy.asarray(value.astype(jax.numpy.dtype(dtype))))
  else:
    params = _read_onto_mesh(specs, sources, jax.numpy.dtype(dtype), mesh)
  files = {id(file): file for file, _ in sources.values()}.values()
  logging.info("Read %d of the %d bytes of %s on process %d.", sum(f.bytes_read for f in files),
               sum(paths.as_path(f.path).stat().length for f in files), path, jax.process_index())
  return params, config


def _read_onto_mesh(specs: Mapping[str, _TensorSpec], sources: Mapping[str, tuple[SafetensorsFile, str]],
                    dtype: np.dtype, mesh: Mesh) -> Params:
  """Each tensor read as bands of rows, one per device of ``mesh`` (each process reading its devices' bands) and
  turned to our axis order on the host, then split, reshaped, cast to ``dtype`` and resharded as the rules say on
  the mesh. XLA reshards without gathering the tensor when the bands fall on whole heads and the devices divide
  its rows; otherwise (more devices than heads, padded rows) it gathers that tensor on each device within its own
  conversion ("Involuntary full rematerialization" in the log): one tensor, never the model."""
  abstract = {}
  for spec in specs.values():
    for part_path, shape in spec.parts:
      _set_path(abstract, part_path, jax.ShapeDtypeStruct(shape, dtype))
  targets = sharding.param_shardings(abstract, mesh)
  # The bands follow the devices ordered by process, so each process's bands are one contiguous range of rows.
  devices = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
  band_mesh = Mesh(np.array(devices), ("rows",))
  params: Params = {}
  for name, spec in specs.items():
    file, stored = sources[name]
    rows = spec.hf_shape[0]
    padded = -(-rows // len(devices)) * len(devices)  # Rows past the tensor's are zeros, dropped on the mesh.
    shape = list(spec.oriented(np.empty(spec.hf_shape, np.bool_)).shape)
    shape[spec.row_axis] = padded

    def read_band(index, file=file, stored=stored, rows=rows, spec=spec):
      start, stop = index[spec.row_axis].indices(padded)[:2]
      band = file.read_rows(stored, min(start, rows), min(stop, rows))
      band = np.concatenate([band, np.zeros((stop - start - len(band), *band.shape[1:]), band.dtype)])
      return np.ascontiguousarray(spec.oriented(band))

    tensor = jax.make_array_from_callback(
        tuple(shape), NamedSharding(band_mesh, P(*[None] * spec.row_axis, "rows")), read_band)
    shardings = tuple(_get_path(targets, part_path) for part_path, _ in spec.parts)
    for (part_path, _), value in zip(spec.parts, _to_ours_on_mesh(spec, dtype, shardings, padded)(tensor)):
      _set_path(params, part_path, value)
  return params


@functools.lru_cache(maxsize=None)
def _to_ours_on_mesh(spec: _TensorSpec, dtype: np.dtype, shardings: tuple[NamedSharding, ...], padded: int):
  """The compiled conversion of an oriented tensor with ``padded`` rows to our parameters in ``dtype``, placed at
  ``shardings`` (one per part); tensors of the same spec share it."""
  def convert(y):
    if padded > spec.hf_shape[0]:
      y = y[(slice(None),) * spec.row_axis + (slice(0, spec.hf_shape[0]),)]
    return tuple(part.astype(dtype) for part in spec.split_oriented(y))

  return jax.jit(convert, out_shardings=shardings)


def save_checkpoint(params: Params, config: ModelConfig, path: paths.PathLike) -> None:
  """Writes ``params`` as a Hugging Face checkpoint (``config.json``, ``generation_config.json`` with the stop ids,
  ``model.safetensors``) to a directory, local or on an object store (each file written whole).

  ``transformers.AutoModelForCausalLM.from_pretrained(path)`` (or ``...ForSequenceClassification`` for head
  ``"score"``) loads the result, and its ``generate`` stops where our sampler does. Parameters are written in their
  own dtype; ``config.json`` is written through the family's transformers config class (its current layout).

  Example:
    >>> import tempfile
    >>> from bond_jax.models import config as config_lib, transformer
    >>> cfg = config_lib.tiny(family="phi3")
    >>> path = tempfile.mkdtemp()
    >>> save_checkpoint(transformer.init_params(cfg, jax.random.key(0)), cfg, path)
    >>> SafetensorsFile(os.path.join(path, WEIGHTS_FILE)).shape("model.layers.0.self_attn.qkv_proj.weight")
    (64, 32)
  """
  import transformers  # pylint: disable=g-import-not-at-top  (config classes only: no PyTorch is needed)

  hf_config = _transformers_config(config_to_hf(config))
  specs = _tensor_specs(config)
  tensors = {}
  for name, spec in specs.items():
    values = []
    for part_path, shape in spec.parts:
      value = np.asarray(_get_path(params, part_path))
      if value.shape != shape:
        raise ValueError(f"params {'/'.join(part_path)!r} has shape {value.shape}; the config implies {shape}.")
      values.append(value)
    # safetensors needs C-contiguous arrays; the transposes are views.
    tensors[name] = np.ascontiguousarray(spec.to_hf(values))
  # transformers and safetensors write local files: written here, then copied whole to `path`.
  with tempfile.TemporaryDirectory(prefix="bond_jax_checkpoint_") as local:
    save_file(tensors, os.path.join(local, WEIGHTS_FILE), metadata={"format": "pt"})
    hf_config.save_pretrained(local)
    transformers.GenerationConfig(**generation_config_to_hf(config)).save_pretrained(local)
    paths.copy_files(local, path)


# What a tokenizer directory may hold besides the tokenizer: never copied to read the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


def load_tokenizer(path: paths.PathLike):
  """Loads the tokenizer saved in a checkpoint directory, local or on an object store (never downloads from a hub):
  transformers reads local files only, so a remote directory's files but its weights are copied to a temporary
  local directory first.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> load_tokenizer(os.path.join(default_assets.ASSETS_DIR, "tokenizer")).pad_token_id
    0
  """
  import transformers  # pylint: disable=g-import-not-at-top  (loading weights does not need it)

  if not paths.as_path(path).is_dir():
    raise ValueError(f"load_tokenizer: path={os.fspath(path)!r} is not a directory.")
  with paths.local_copy(path, skip=_WEIGHT_SUFFIXES) as local:
    return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
