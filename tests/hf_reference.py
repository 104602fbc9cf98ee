"""Tiny random Hugging Face (PyTorch) reference models for the converter and reward-model tests."""

import numpy as np
import torch
import transformers

VOCAB = 48
PAD = 0

# family -> (config class, architecture prefix)
FAMILIES = {
    "llama": (transformers.LlamaConfig, "Llama"),
    "qwen2": (transformers.Qwen2Config, "Qwen2"),
    "gemma": (transformers.GemmaConfig, "Gemma"),
    "gemma2": (transformers.Gemma2Config, "Gemma2"),
}
HEADS = {"lm": "ForCausalLM", "score": "ForSequenceClassification"}


def hf_config(family: str, head: str, **overrides) -> transformers.PretrainedConfig:
  """A 2-layer, d_model 32, grouped-query config of ``family``."""
  config_cls, prefix = FAMILIES[family]
  kwargs = dict(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
      pad_token_id=PAD, bos_token_id=1, eos_token_id=2, num_labels=1,
      architectures=[prefix + HEADS[head]],
  )
  if family == "gemma2":
    # Small caps so that soft-capping actually bends the logits of this random model.
    kwargs.update(attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=16,
                  sliding_window=64)
  return config_cls(**(kwargs | overrides))


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
