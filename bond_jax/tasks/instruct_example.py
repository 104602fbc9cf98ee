"""Tiny random stand-ins for the checkpoints of an instruct run: a chat policy and a reward model with another
tokenizer, and prompts as conversations (`configs/instruct.py`; `experiments/make_tiny_instruct.py` writes them).

- the policy: a 2-layer Qwen3 causal LM (per-head q/k norms) over the shipped word-level tokenizer, given a chat
  template that renders each turn as `<role>content<eos>` and the assistant's opening `<assistant>`, stopping on
  `<eos>` or on the extra end-of-turn token `<end_of_turn>` (declared in its `generation_config.json`, as instruct
  checkpoints do);
- the reward model: a 2-layer Llama sequence classifier over a character-level tokenizer with its own template
  (`<|role|>content<|end|>`), so the policy's ids mean nothing to it and every conversation is re-tokenized;
- the prompts: a JSONL file of `messages` (one user turn: the beginning of a review to continue).

Weights are random: the example shows what runs, not what it learns. Swap in real directories with the same fields
(see the README, "Bring your own checkpoint").

Example:
  >>> import tempfile
  >>> paths = write_assets(tempfile.mkdtemp())
  >>> sorted(paths)
  ['policy', 'prompts', 'reward_model']
"""

from __future__ import annotations

import json
import os

import jax
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors

from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.tasks import default_assets

# Renders BOS, then each turn as <role>content<eos>, then the assistant's opening: the shipped tokenizer's markup.
SHIPPED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
# The character tokenizer's: role tokens of its own.
CHARACTER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHARACTER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<end_of_turn>"
ROLE_TOKENS = ("<system>", "<user>", "<assistant>")  # The policy template's markup, one token each.
NUM_PROMPTS = 64
_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=96)


def shipped_tokenizer(path: str, chat_template: str | None = SHIPPED_TEMPLATE, drop_pad: bool = False,
                      extra_tokens: tuple[str, ...] = ()) -> str:
  """Saves the shipped tokenizer to `path` with `chat_template`, optionally without its pad token and with more
  special tokens (e.g. Llama 3's "<|finetune_right_pad_id|>"); returns `path`.

  Example:
    >>> import tempfile
    >>> from bond_jax.models import hf
    >>> tokenizer = hf.load_tokenizer(shipped_tokenizer(tempfile.mkdtemp(), extra_tokens=(END_OF_TURN,)))
    >>> tokenizer.convert_ids_to_tokens(tokenizer.apply_chat_template([{"role": "user", "content": "good"}],
    ...                                                               add_generation_prompt=True))[:2]
    ['<bos>', '<user>']
  """
  tokenizer = default_assets.load_tokenizer()
  if extra_tokens:
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
  if drop_pad:
    tokenizer.pad_token = None
  tokenizer.chat_template = chat_template
  tokenizer.save_pretrained(path)
  return path


def character_tokenizer(path: str, chat_template: str | None = CHARACTER_TEMPLATE) -> str:
  """Saves to `path` a tokenizer of one token per printable ASCII character after `CHARACTER_SPECIALS`, adding
  "<s>" in front of a text, with `chat_template`; returns `path`.

  Example:
    >>> import tempfile
    >>> from bond_jax.models import hf
    >>> hf.load_tokenizer(character_tokenizer(tempfile.mkdtemp())).tokenize("ok")
    ['o', 'k']
  """
  import transformers  # pylint: disable=g-import-not-at-top  (the tokenizer class only)

  vocab = {token: i for i, token in enumerate(CHARACTER_SPECIALS + tuple(chr(c) for c in range(32, 127)))}
  tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.add_special_tokens(list(CHARACTER_SPECIALS))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
  fast.chat_template = chat_template
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return path


def _random_checkpoint(path: str, hf_config: dict, seed: int) -> None:
  model_config = hf.config_from_hf(hf_config)
  hf.save_checkpoint(transformer.init_params(model_config, jax.random.PRNGKey(seed)), model_config, path)


def write_assets(out_dir: str, seed: int = 0) -> dict[str, str]:
  """Writes the policy, the reward model and the prompt file under `out_dir`; returns their paths by name."""
  paths = {name: os.path.join(out_dir, name) for name in ("policy", "reward_model")}
  paths["prompts"] = os.path.join(out_dir, "prompts.jsonl")
  tokenizer = hf.load_tokenizer(shipped_tokenizer(paths["policy"], extra_tokens=(END_OF_TURN, *ROLE_TOKENS)))
  stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
  _random_checkpoint(paths["policy"], dict(
      architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=len(tokenizer), **_SIZES,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id), seed)
  reward_tokenizer = hf.load_tokenizer(character_tokenizer(paths["reward_model"]))
  _random_checkpoint(paths["reward_model"], dict(
      architectures=["LlamaForSequenceClassification"], model_type="llama", vocab_size=len(reward_tokenizer),
      num_labels=1, **(_SIZES | dict(max_position_embeddings=512)), pad_token_id=reward_tokenizer.pad_token_id,
      bos_token_id=reward_tokenizer.bos_token_id, eos_token_id=reward_tokenizer.eos_token_id), seed + 1)
  with open(paths["prompts"], "w", encoding="utf-8") as f:
    for prompt in default_assets.prompt_lines()[:NUM_PROMPTS]:
      f.write(json.dumps({"messages": [{"role": "user", "content": prompt}]}) + "\n")
  return paths
