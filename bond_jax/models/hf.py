"""Hugging Face checkpoints <-> our parameter tree, without PyTorch.

Reads and writes the Hugging Face layout (``config.json`` plus ``*.safetensors``, sharded with a
``model.safetensors.index.json`` or not) for the Llama family (Llama, SmolLM, TinyLlama), Qwen2 (qkv bias),
Gemma and Gemma 2, with a causal-LM head (``*ForCausalLM``) or a sequence-classification head
(``*ForSequenceClassification`` -> our head ``"score"``).

Layouts: a torch ``Linear`` stores ``[out, in]``; we store ``[in, out]`` with the head axes split out, so q/k/v
become ``[d_model, heads, head_dim]`` and o becomes ``[heads, head_dim, d_model]``. Our rotary embedding uses the
HF ``rotate_half`` convention, so q/k need no permutation. Gemma's RMSNorm scale is stored as in HF (``w``, the
effective scale being ``1 + w``).

Example::

  params, config = load_checkpoint("/ckpt/SmolLM-135M", dtype="bfloat16")
  tokenizer = load_tokenizer("/ckpt/SmolLM-135M")
  save_checkpoint(params, config, "/tmp/smollm_copy")   # transformers can load this directory
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bond_jax import sharding
from bond_jax.models.config import ModelConfig

Params = dict[str, Any]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# HF model_type -> (architecture prefix, model features that differ from the Llama layout).
_FAMILIES = {
    "llama": ("Llama", dict()),
    "qwen2": ("Qwen2", dict(qkv_bias=True)),
    "gemma": ("Gemma", dict(norm_plus_one=True, embed_scale=True)),
    "gemma2": ("Gemma2", dict(norm_plus_one=True, embed_scale=True, post_norms=True)),
}
_HEADS = {"ForCausalLM": "lm", "ForSequenceClassification": "score"}
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


def _family_features(family: str) -> dict[str, bool]:
  """All family flags of ModelConfig, set as ``family`` sets them."""
  flags = dict(qkv_bias=False, norm_plus_one=False, embed_scale=False, post_norms=False)
  return flags | _FAMILIES[family][1]


def _parse_architecture(hf: Mapping[str, Any]) -> tuple[str, str]:
  """(family, head) of an HF config dict; ValueError for anything we cannot load."""
  architectures = hf.get("architectures") or []
  if len(architectures) != 1:
    raise ValueError(f"config 'architectures' must name exactly one architecture, got {architectures!r}.")
  (architecture,) = architectures
  for family, (prefix, _) in _FAMILIES.items():
    for suffix, head in _HEADS.items():
      if architecture == prefix + suffix:
        return family, head
  supported = sorted(p + s for p, _ in _FAMILIES.values() for s in _HEADS)
  raise ValueError(f"Unsupported architecture {architecture!r}; supported: {supported}.")


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_theta from either the transformers>=5 ``rope_parameters`` or the older flat keys."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"Unsupported rotary scaling {rope_type!r} (only plain rotary embeddings are implemented).")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _first_id(value: int | list[int] | None) -> int | None:
  # Some configs (Llama 3 instruct) list several stop ids; sampling stops on one id, the first.
  return value[0] if isinstance(value, list) else value


def config_from_hf(hf_config: Mapping[str, Any] | Any, dtype: str = "float32") -> ModelConfig:
  """Maps a Hugging Face config (``config.json`` dict or ``PretrainedConfig``) to a ModelConfig.

  Args:
    hf_config: the parsed ``config.json``, or a ``transformers.PretrainedConfig``.
    dtype: parameter and compute dtype of the returned config.

  Returns:
    The ModelConfig. A missing ``pad_token_id`` falls back to the EOS id (then 0): our model reads padding from
    masks, the id only fills positions after EOS. Layers with sliding-window attention (Gemma 2, Qwen2 with
    ``use_sliding_window``) are exact only up to the window, so ``max_seq_len`` is capped at it.

  Example::

    config = config_from_hf(json.load(open("ckpt/config.json")))
  """
  hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  family, head = _parse_architecture(hf)
  if hf.get("attention_bias") and family != "qwen2":
    raise ValueError(f"attention_bias=True is not supported for {family!r} (it adds an o_proj bias).")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported.")
  activation_name = hf.get("hidden_activation") or hf.get("hidden_act")
  if family == "gemma" and activation_name == "gelu":
    # The official Gemma releases say "gelu" but mean the tanh approximation (transformers maps it the same way).
    activation_name = "gelu_pytorch_tanh"
  if activation_name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported hidden activation {activation_name!r}; supported: {sorted(_ACTIVATIONS)}.")

  max_seq_len = hf["max_position_embeddings"]
  has_sliding_layers = "sliding_attention" in (hf.get("layer_types") or []) or hf.get("use_sliding_window")
  if family == "gemma2" or has_sliding_layers:
    max_seq_len = min(max_seq_len, hf.get("sliding_window") or max_seq_len)

  eos_token_id = _first_id(hf.get("eos_token_id"))
  pad_token_id = _first_id(hf.get("pad_token_id"))
  if pad_token_id is None:
    pad_token_id = eos_token_id if eos_token_id is not None else 0
  num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
  default_tie = family in ("gemma", "gemma2")
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      num_layers=hf["num_hidden_layers"],
      d_model=hf["hidden_size"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"],
      max_seq_len=max_seq_len,
      rope_theta=_rope_theta(hf),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp_activation=_ACTIVATIONS[activation_name],
      tie_embeddings=head == "lm" and bool(hf.get("tie_word_embeddings", default_tie)),
      attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
      final_logit_softcap=hf.get("final_logit_softcapping") if family == "gemma2" else None,
      query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family == "gemma2" else None,
      head=head,
      num_labels=num_labels if head == "score" else 1,
      dtype=dtype,
      param_dtype=dtype,
      pad_token_id=pad_token_id,
      bos_token_id=_first_id(hf.get("bos_token_id")),
      eos_token_id=eos_token_id,
      **_family_features(family),
  )


def _family_of(config: ModelConfig) -> str:
  """The HF family whose layout ``config`` describes; ValueError if none does."""
  features = {name: getattr(config, name) for name in _family_features("llama")}
  family = next((f for f in _FAMILIES if _family_features(f) == features), None)
  if family is None:
    raise ValueError(f"No Hugging Face architecture has the model features {features}.")
  gemma2_only = dict(
      attn_logit_softcap=config.attn_logit_softcap,
      final_logit_softcap=config.final_logit_softcap,
      query_pre_attn_scalar=config.query_pre_attn_scalar,
  )
  if family != "gemma2" and any(v is not None for v in gemma2_only.values()):
    raise ValueError(f"{gemma2_only} are only representable by Gemma 2; the model features {features} are {family}'s.")
  return family


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The ``config.json`` dict of a ModelConfig (inverse of ``config_from_hf`` up to dtypes).

  Example::

    json.dump(config_to_hf(config), open("out/config.json", "w"))
  """
  family = _family_of(config)
  prefix = _FAMILIES[family][0]
  head_suffix = {head: suffix for suffix, head in _HEADS.items()}[config.head]
  activation = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[config.mlp_activation]
  hf = dict(
      architectures=[prefix + head_suffix],
      model_type=family,
      vocab_size=config.vocab_size,
      num_hidden_layers=config.num_layers,
      hidden_size=config.d_model,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      intermediate_size=config.mlp_dim,
      max_position_embeddings=config.max_seq_len,
      rope_theta=config.rope_theta,
      rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta),
      rms_norm_eps=config.norm_eps,
      hidden_act=activation,
      hidden_activation=activation,
      tie_word_embeddings=config.tie_embeddings,
      pad_token_id=config.pad_token_id,
      bos_token_id=config.bos_token_id,
      eos_token_id=config.eos_token_id,
      dtype=config.param_dtype,
  )
  if config.head == "score":
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
  if family == "gemma2":
    hf.update(
        attn_logit_softcapping=config.attn_logit_softcap,
        final_logit_softcapping=config.final_logit_softcap,
        query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
        # Every position is within the window, so each layer's sliding attention equals full attention.
        sliding_window=config.max_seq_len,
    )
  return hf


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
  """Where one HF tensor lives in our tree and how its layout differs."""

  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  our_shape: tuple[int, ...]
  transpose: bool  # torch Linear weights are [out, in]; ours are [in, ...out].

  def to_ours(self, x: np.ndarray) -> np.ndarray:
    return (x.T if self.transpose else x).reshape(self.our_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.transpose:
      return x.reshape(self.hf_shape[::-1]).T
    return x.reshape(self.hf_shape)


def _tensor_specs(config: ModelConfig) -> dict[str, _TensorSpec]:
  """HF tensor name -> _TensorSpec for every parameter of ``config``'s model."""
  d, h, kv, hd, f = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
  specs = {}

  def add(hf_name, path, hf_shape, our_shape, transpose=True):
    specs[hf_name] = _TensorSpec(tuple(path.split("/")), hf_shape, our_shape, transpose)

  def norm(hf_name, path):
    add(hf_name, path + "/scale", (d,), (d,), transpose=False)

  add("model.embed_tokens.weight", "embedder/embedding", (config.vocab_size, d), (config.vocab_size, d), False)
  # Gemma 2 names its four norms differently: post_attention_layernorm is the post-attention norm there.
  mlp_norm = "pre_feedforward_layernorm" if config.post_norms else "post_attention_layernorm"
  for i in range(config.num_layers):
    hf_layer, layer = f"model.layers.{i}", f"layer_{i}"
    norm(f"{hf_layer}.input_layernorm.weight", f"{layer}/pre_attn_norm")
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      add(f"{hf_layer}.self_attn.{name}_proj.weight", f"{layer}/attn/{name}/kernel", (heads * hd, d), (d, heads, hd))
      if config.qkv_bias:
        add(f"{hf_layer}.self_attn.{name}_proj.bias", f"{layer}/attn/{name}/bias", (heads * hd,), (heads, hd))
    add(f"{hf_layer}.self_attn.o_proj.weight", f"{layer}/attn/o/kernel", (d, h * hd), (h, hd, d))
    norm(f"{hf_layer}.{mlp_norm}.weight", f"{layer}/pre_mlp_norm")
    if config.post_norms:
      norm(f"{hf_layer}.post_attention_layernorm.weight", f"{layer}/post_attn_norm")
      norm(f"{hf_layer}.post_feedforward_layernorm.weight", f"{layer}/post_mlp_norm")
    add(f"{hf_layer}.mlp.gate_proj.weight", f"{layer}/mlp/gate/kernel", (f, d), (d, f))
    add(f"{hf_layer}.mlp.up_proj.weight", f"{layer}/mlp/up/kernel", (f, d), (d, f))
    add(f"{hf_layer}.mlp.down_proj.weight", f"{layer}/mlp/down/kernel", (d, f), (f, d))
  norm("model.norm.weight", "final_norm")
  if config.head == "score":
    add("score.weight", "score/kernel", (config.num_labels, d), (d, config.num_labels))
  elif not config.tie_embeddings:
    add("lm_head.weight", "lm_head/kernel", (config.vocab_size, d), (d, config.vocab_size))
  return specs


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file holding it, for a checkpoint directory."""
  index_file = os.path.join(path, WEIGHTS_INDEX_FILE)
  if os.path.exists(index_file):
    with open(index_file) as f:
      return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
  files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"No *.safetensors weights in checkpoint directory {path!r}.")
  names = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      names.update({name: file for name in f.keys()})
  return names


def _check_names(expected: set[str], found: set[str], config: ModelConfig) -> None:
  """ValueError naming the missing and unexpected tensors, if any."""
  unexpected = {n for n in found - expected if not _IGNORED_TENSORS.match(n)}
  if config.tie_embeddings:
    unexpected.discard("lm_head.weight")  # Some tied checkpoints store the shared matrix twice.
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


def load_checkpoint(path: str | os.PathLike, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[Params, ModelConfig]:
  """Loads a local Hugging Face checkpoint directory into our parameter tree.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index with its shards).
    dtype: dtype of the returned parameters and of the config's compute (``"float32"`` or ``"bfloat16"``).
    mesh: if given, each parameter is placed straight onto ``mesh`` with ``sharding.param_shardings``, so the
      full model never has to fit on one device.

  Returns:
    ``(params, config)``: params a nested dict of arrays in our layout (see MODEL_API), config a ModelConfig.
    ValueError (naming the tensor) for unknown architectures and missing, unexpected or mis-shaped tensors.

  Example::

    params, config = load_checkpoint("/ckpt/TinyLlama-1.1B", dtype="bfloat16")
    logits, _ = transformer.forward(params, config, tokens, positions, mask)
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    config = config_from_hf(json.load(f), dtype=dtype)
  specs = _tensor_specs(config)
  files = _weight_files(path)
  _check_names(set(specs), set(files), config)

  params: Params = {}
  for file in sorted(set(files[name] for name in specs)):
    with safe_open(file, framework="numpy") as f:
      for name in (n for n in specs if files[n] == file):
        spec = specs[name]
        tensor = f.get_tensor(name)
        if tuple(tensor.shape) != spec.hf_shape:
          raise ValueError(f"Tensor {name!r} has shape {tuple(tensor.shape)}; the config implies {spec.hf_shape}.")
        _set_path(params, spec.path, spec.to_ours(tensor).astype(jax.numpy.dtype(dtype)))
  if mesh is None:
    return jax.tree.map(jax.numpy.asarray, params), config
  return jax.device_put(params, sharding.param_shardings(params, mesh)), config


def save_checkpoint(params: Params, config: ModelConfig, path: str | os.PathLike) -> None:
  """Writes ``params`` as a Hugging Face checkpoint (``config.json`` + ``model.safetensors``).

  ``transformers.AutoModelForCausalLM.from_pretrained(path)`` (or ``...ForSequenceClassification`` for head
  ``"score"``) loads the result. Parameters are written in their own dtype.

  Example::

    save_checkpoint(params, config, "/tmp/policy_step_1000")
  """
  path = os.fspath(path)
  hf_config = config_to_hf(config)
  specs = _tensor_specs(config)
  tensors = {}
  for name, spec in specs.items():
    value = np.asarray(_get_path(params, spec.path))
    if value.shape != spec.our_shape:
      raise ValueError(f"params {'/'.join(spec.path)!r} has shape {value.shape}; the config implies {spec.our_shape}.")
    # safetensors needs C-contiguous arrays; the transposes are views.
    tensors[name] = np.ascontiguousarray(spec.to_hf(value))
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)


def load_tokenizer(path: str | os.PathLike):
  """Loads the tokenizer saved in a local checkpoint directory (never downloads).

  Example::

    tokenizer = load_tokenizer("/ckpt/SmolLM-135M")
    ids = tokenizer("Hello")["input_ids"]
  """
  import transformers  # Imported lazily: loading weights does not need it.

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"load_tokenizer: path={path!r} is not a local directory.")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
