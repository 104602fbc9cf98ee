"""Prompts as the policy reads them: texts or conversations to token ids, and back to the prompt as written.

A prompt is a text (``str``) or a conversation: a list of ``{"role": ..., "content": ...}`` turns. The policy's
`PromptTokenizer` encodes it with exactly the special tokens the model expects:

- without a chat template, a text gets the special tokens the tokenizer adds around a text (e.g. BOS in front),
  except those it already holds: a text rendered by a chat template elsewhere, which starts with the BOS text,
  keeps its one BOS (transformers: "text formatted with a chat template must not get special tokens again");
- with the chat template (``chat_template=True``), a conversation becomes exactly
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, and a text is one user turn.

Rewards read prompts back through ``prompt_of``: the ids of a templated prompt decode to template markup, not to
the user's turn, so the tokenizer remembers, for its most recent encodings, which prompt each id sequence came
from (keyed by a digest of the ids). Without a template the prompt is simply the decoded ids.

Example:
  >>> from bond_jax.tasks import default_assets
  >>> tokenizer = PromptTokenizer(default_assets.load_tokenizer())
  >>> tokenizer.encode("<bos>The plot") == tokenizer.encode("The plot")   # one BOS either way
  True
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import hashlib
from typing import Any, Union

import numpy as np

Turn = dict[str, str]
Prompt = Union[str, list[Turn]]  # A text, or a conversation of {"role", "content"} turns.

ROLE_KEYS = ("role", "content")
# Encodings remembered for `prompt_of` (only with a chat template): far more than the prompts a run has in flight
# (a few batches), and a few MB of digests.
REMEMBERED_PROMPTS = 1 << 16


class PromptError(ValueError):
  """The prompts cannot be used: none is usable, one does not fit the model's tokenizer, or a file or dataset
  holding them is missing or malformed."""


def as_text(raw: str | bytes) -> str | None:
  """The prompt as text, or None if it is not valid UTF-8 (bytes) or not encodable as UTF-8 (str).

  Example:
    >>> as_text(b"ok"), as_text("ok"), as_text(bytes([255]))
    ('ok', 'ok', None)
  """
  try:
    if isinstance(raw, bytes):
      return raw.decode("utf-8")
    raw.encode("utf-8")
  except UnicodeError:
    return None
  return raw


def is_conversation(prompt: Any) -> bool:
  """Whether `prompt` is a conversation: a non-empty list of dicts with string "role" and "content".

  Example:
    >>> is_conversation([{"role": "user", "content": "Hi"}]), is_conversation("Hi")
    (True, False)
  """
  return (isinstance(prompt, list) and bool(prompt)
          and all(isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ROLE_KEYS) for t in prompt))


def as_prompt(raw: str | bytes | Sequence[Turn]) -> Prompt | None:
  """A text (`as_text`) or a conversation whose contents are all UTF-8 text; None if any is not.

  Example:
    >>> as_prompt([{"role": "user", "content": b"Hi"}]), as_prompt(bytes([255]))
    ([{'role': 'user', 'content': 'Hi'}], None)
  """
  if isinstance(raw, (str, bytes)):
    return as_text(raw)
  turns = [{**turn, "content": as_text(turn["content"])} for turn in raw]
  return None if any(t["content"] is None for t in turns) else turns


def conversation(prompt: Prompt) -> list[Turn]:
  """The prompt as a conversation: a text is one user turn.

  Example:
    >>> conversation("The plot")
    [{'role': 'user', 'content': 'The plot'}]
  """
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt: Prompt) -> str:
  """The prompt as one text, for text rewards and logs: a text itself, a conversation its last turn's content.

  Example:
    >>> prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}])
    '2+2='
  """
  return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def encode_text(tokenizer, text: str) -> list[int]:
  """`text` as ids with the special tokens the tokenizer adds around a text, unless the text already holds them.

  `tokenizer.encode(text)` adds e.g. BOS in front; a text that already starts with the BOS text (a chat template
  rendered elsewhere) would get a second one. The added tokens are found as what `encode(text)` holds around
  `encode(text, add_special_tokens=False)`, and each side is added only if the text does not already start (end)
  with it.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> tokenizer = default_assets.load_tokenizer()
    >>> encode_text(tokenizer, "<bos>The") == encode_text(tokenizer, "The") == tokenizer.encode("The")
    True
  """
  plain = list(tokenizer.encode(text, add_special_tokens=False))
  full = list(tokenizer.encode(text))
  added = len(full) - len(plain)
  start = next((i for i in range(added + 1) if full[i:i + len(plain)] == plain), None) if added > 0 else None
  if start is None:  # Nothing added, or not only around the text: the tokenizer's own encoding stands.
    return full
  prefix, suffix = full[:start], full[start + len(plain):]
  if plain[:len(prefix)] == prefix:
    prefix = []
  if suffix and plain[-len(suffix):] == suffix:
    suffix = []
  return prefix + plain + suffix


def has_chat_template(tokenizer) -> bool:
  """Whether `tokenizer` carries a chat template (`tokenizer.chat_template`)."""
  return bool(getattr(tokenizer, "chat_template", None))


def special_ids(tokenizer) -> set[int]:
  """The ids of the tokenizer's special tokens (BOS, EOS, pad, ...): a prompt of only these is empty."""
  return set(getattr(tokenizer, "all_special_ids", ()))


def same_vocabulary(a, b) -> bool:
  """Whether two tokenizers share their vocabulary (added tokens included) and their BOS and EOS ids.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> same_vocabulary(default_assets.load_tokenizer(), default_assets.load_tokenizer())
    True
  """
  return (a.get_vocab() == b.get_vocab()
          and (a.bos_token_id, a.eos_token_id) == (b.bos_token_id, b.eos_token_id))


def with_pad_token(tokenizer, pad_token: str, field: str = "pad_token"):
  """`tokenizer` with `pad_token` (a token of its vocabulary, e.g. "<|finetune_right_pad_id|>") as its pad token.

  Raises:
    PromptError: naming `field` if `pad_token` is not a token of the vocabulary.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> with_pad_token(default_assets.load_tokenizer(), "<eos>").pad_token_id
    2
  """
  vocab = tokenizer.get_vocab()
  if pad_token not in vocab:
    special = sorted(getattr(tokenizer, "all_special_tokens", ()))
    raise PromptError(f"{field} = {pad_token!r} is not allowed: it is not a token of the tokenizer's vocabulary "
                      f"(its special tokens: {special}).")
  tokenizer.pad_token = pad_token
  return tokenizer


class PromptTokenizer:
  """The policy's tokenizer as a run uses it: prompts to ids (see the module docstring), ids back to prompts.

  Attributes:
    tokenizer: the wrapped tokenizer (a `transformers` tokenizer, or e.g. `id_tokenizer.IdTokenizer`).
    chat_template: whether prompts go through the tokenizer's chat template.
    pad_token_id, bos_token_id, eos_token_id: the wrapped tokenizer's.

  Raises:
    PromptError: `chat_template` is True and the tokenizer has none.

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> tokenizer = PromptTokenizer(default_assets.load_tokenizer())
    >>> ids = tokenizer.encode("The plot")
    >>> tokenizer.prompt_of(ids)
    'The plot'
  """

  def __init__(self, tokenizer, chat_template: bool = False):
    if chat_template and not has_chat_template(tokenizer):
      raise PromptError("chat_template = True (config.data.chat_template) is not allowed: the policy's tokenizer "
                        "has no chat template (tokenizer.chat_template is not set).")
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self._remembered: collections.OrderedDict[bytes, Prompt] = collections.OrderedDict()

  pad_token_id = property(lambda self: self.tokenizer.pad_token_id)
  bos_token_id = property(lambda self: self.tokenizer.bos_token_id)
  eos_token_id = property(lambda self: self.tokenizer.eos_token_id)

  def encode(self, prompt: Prompt) -> list[int]:
    """The prompt's ids, with exactly the special tokens the model expects.

    Raises:
      PromptError: a conversation without `chat_template`.
    """
    if not self.chat_template:
      if not isinstance(prompt, str):
        raise PromptError(f"the prompt {str(prompt)[:80]} is a conversation; conversations need chat_template = "
                          "True (config.data.chat_template).")
      return encode_text(self.tokenizer, prompt)
    return list(self.tokenizer.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))

  def is_empty(self, prompt: Prompt) -> bool:
    """Whether the prompt holds no text: blank, or only special tokens (e.g. "<pad>"), in every turn."""
    special = special_ids(self.tokenizer)
    return all(not text.strip() or all(i in special for i in self.tokenizer.encode(text, add_special_tokens=False))
               for text in ([prompt] if isinstance(prompt, str) else [t["content"] for t in prompt]))

  def remember(self, ids: Sequence[int], prompt: Prompt) -> None:
    """Records that `ids` (as fed to the model, e.g. truncated) came from `prompt`, for `prompt_of`."""
    if self.chat_template:
      key = _digest(ids)
      self._remembered[key] = prompt
      self._remembered.move_to_end(key)
      if len(self._remembered) > REMEMBERED_PROMPTS:
        self._remembered.popitem(last=False)

  def prompt_of(self, ids: Sequence[int]) -> Prompt:
    """The prompt that `ids` (a prompt's real tokens) came from: without a chat template, the decoded text; with
    one, the remembered prompt.

    Raises:
      PromptError: with a chat template, ids that were not among the last `REMEMBERED_PROMPTS` remembered.
    """
    if not self.chat_template:
      return self.decode(ids, skip_special_tokens=True)
    prompt = self._remembered.get(_digest(ids))
    if prompt is None:
      raise PromptError(f"prompt ids {list(ids)[:16]}... were not encoded by this PromptTokenizer (it remembers its "
                        f"last {REMEMBERED_PROMPTS} prompts), so their conversation is unknown.")
    return prompt

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
    return self.tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=skip_special_tokens)


def as_prompt_tokenizer(tokenizer) -> PromptTokenizer:
  """`tokenizer` itself if it is a `PromptTokenizer`, else that tokenizer wrapped without a chat template."""
  return tokenizer if isinstance(tokenizer, PromptTokenizer) else PromptTokenizer(tokenizer)


def _digest(ids: Sequence[int]) -> bytes:
  return hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=16).digest()
