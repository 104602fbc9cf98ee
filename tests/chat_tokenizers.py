"""Tiny Hugging Face tokenizers with and without chat templates, saved as directories, for the prompt and reward
tests: the shipped tokenizer with a template, and a character-level tokenizer with another vocabulary."""

import os

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
import transformers

from bond_jax.tasks import default_assets

# Renders BOS, then each turn as <role>content<eos>, then the assistant's opening: the shipped tokenizer's markup.
SHIPPED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
# The character tokenizer's: role tokens of its own.
CHARACTER_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHARACTER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def shipped_tokenizer(path: str, chat_template: str | None = SHIPPED_TEMPLATE, drop_pad: bool = False,
                      extra_tokens: tuple[str, ...] = ()) -> str:
  """Saves the shipped tokenizer to `path` with `chat_template`, optionally without its pad token and with more
  special tokens (e.g. Llama 3's "<|finetune_right_pad_id|>"); returns `path`."""
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
  "<s>" in front of a text, with `chat_template`; returns `path`."""
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
