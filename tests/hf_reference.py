"""Tiny random Hugging Face (PyTorch) reference models for the converter, sampler and reward-model tests."""

import numpy as np
import torch
import transformers

VOCAB = 48
PAD = 0
WINDOW = 4  # sliding windows shorter than the test sequences, so that they change the outputs

# family -> (config class, architecture prefix)
FAMILIES = {
    "llama": (transformers.LlamaConfig, "Llama"),
    "mistral": (transformers.MistralConfig, "Mistral"),
    "qwen2": (transformers.Qwen2Config, "Qwen2"),
    "qwen3": (transformers.Qwen3Config, "Qwen3"),
    "gemma": (transformers.GemmaConfig, "Gemma"),
    "gemma2": (transformers.Gemma2Config, "Gemma2"),
    "gemma3": (transformers.Gemma3TextConfig, "Gemma3"),
    "phi3": (transformers.Phi3Config, "Phi3"),
    "olmo2": (transformers.Olmo2Config, "Olmo2"),
}
HEADS = {"lm": "ForCausalLM", "score": "ForSequenceClassification"}
_ARCHITECTURES = {("gemma3", "score"): "Gemma3TextForSequenceClassification"}

# What each family's tiny model turns on beyond the Llama defaults, so that every feature bends the outputs.
_FAMILY_OVERRIDES = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    # Small caps so that soft-capping actually bends the logits of this random model.
    "gemma2": dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=16,
                   sliding_window=WINDOW),
    "gemma3": dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=16,
                   sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=200.0),
                                    "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000.0)}),
    "phi3": dict(sliding_window=WINDOW),
}

# Extra Llama checkpoints: each rope scaling transformers implements and we do (a pretraining context shorter than
# the test positions, so that llama3's bands and yarn's ramp all apply), and SmolLM's tied head.
ROPE_VARIANTS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
}


def architecture(family: str, head: str) -> str:
  return _ARCHITECTURES.get((family, head), FAMILIES[family][1] + HEADS[head])


def hf_config(family: str, head: str, **overrides) -> transformers.PretrainedConfig:
  """A 2-layer, d_model 32, grouped-query config of ``family`` with its distinctive features switched on."""
  config_cls, _ = FAMILIES[family]
  kwargs = dict(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
      pad_token_id=PAD, bos_token_id=1, eos_token_id=2, num_labels=1, architectures=[architecture(family, head)],
  )
  kwargs["rope_parameters"] = dict(rope_type="default", rope_theta=500.0)
  return config_cls(**(kwargs | _FAMILY_OVERRIDES.get(family, {}) | overrides))


def hf_model(family: str, head: str, seed: int = 0, **overrides) -> torch.nn.Module:
  """A random model whose weights (norm scales included) are O(0.3), so every term shows in the logits."""
  config = hf_config(family, head, **overrides)
  cls = getattr(transformers, config.architectures[0])
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Llama-style norms scale by w (keep them near 1); Gemma's by 1 + w.
      mean = 1.0 if "norm" in name and not family.startswith("gemma") else 0.0
      p.copy_(mean + 0.3 * torch.randn_like(p))
  return model


def hf_outputs(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The model's logits (causal LM: [batch, time, vocab]; classifier: pooled [batch, num_labels]).

  Positions count real tokens only, as ours do, so left padding is handled identically.
  """
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()
