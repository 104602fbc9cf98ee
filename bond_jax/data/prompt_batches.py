"""Prompt batches for the trainer: tokenised, left-padded, shuffled per epoch with a seed, sharded per host, resumable.

Order: epoch e visits the prompts in the permutation `default_rng([seed, e]).permutation(n)` (or in stored order
without shuffling). The global batch is the next `batch_size` usable prompts in that order, continuing into the
next epoch's permutation when one ends; host `process_index` of `process_count` gets rows
`[process_index * per_host, (process_index + 1) * per_host)` of it. Every host reads and tokenises the whole
global batch, so all hosts agree on which prompts are skipped without talking to each other.

Each prompt (a text, or a conversation with a chat template) is encoded by the policy's
`prompt_encoding.PromptTokenizer`, so it carries exactly the special tokens the model expects (e.g. one BOS).

- longer than `prompt_len` tokens: with overlong="truncate" the last tokens are kept (the words nearest the
  generation; a leading BOS is kept too), counted as "truncated"; with overlong="reject" the prompt is skipped,
  counted as "rejected";
- empty, whitespace only, or only special tokens (e.g. "<pad>"), in every turn: skipped, "empty";
- bytes that are not UTF-8 or text that cannot be encoded as UTF-8 (in any turn): skipped, "undecodable";
- a token id outside [0, vocab_size): `PromptError` (the tokenizer does not match the model).

The first skip or truncation of each kind is logged as a warning with the prompt's index, and every epoch's
counts are logged when it ends; `counts` holds them and is part of the state, so a resumed run logs the same.

Example:
  >>> from bond_jax.tasks import default_assets
  >>> prompts = ["The plot was", "The hotel", "I bought it"]
  >>> it = PromptIterator(prompts, default_assets.load_tokenizer(), batch_size=2, prompt_len=5, seed=0)
  >>> batch = next(it)   # {"prompts": int32 [2, 5], "prompt_mask": bool [2, 5], "text": 2 str}
  >>> batch["text"], batch["prompt_mask"].sum(axis=1)   # each with its BOS
  (['I bought it', 'The plot was'], array([4, 4]))
  >>> state = it.get_state()          # JSON-serialisable: save it with the checkpoint
  >>> it2 = PromptIterator(prompts, default_assets.load_tokenizer(), batch_size=2, prompt_len=5, seed=0)
  >>> it2.set_state(state)
  >>> next(it2)["text"] == next(it)["text"]
  True
"""

from collections.abc import Sequence
from typing import Protocol

from absl import logging
import numpy as np

from bond_jax.data import prompt_encoding
from bond_jax.data.prompt_encoding import PromptError

OVERLONG_POLICIES = ("truncate", "reject")

# "yielded": prompts in global batches so far; the others: prompts truncated or skipped, by reason.
COUNT_KEYS = ("yielded", "truncated", "rejected", "empty", "undecodable")


class TextSource(Protocol):
  """Random access to raw prompts (a list, or `prompt_tfds.TextColumn`): texts, or conversations (lists of
  {"role", "content"} turns)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> str | bytes | list[dict]:
    ...


def fit_to_length(ids: Sequence[int], prompt_len: int, bos_token_id: int | None) -> list[int]:
  """The last `prompt_len` ids of `ids`, keeping a leading BOS in front of them.

  Example:
    >>> fit_to_length([1, 5, 6, 7, 8], prompt_len=3, bos_token_id=1)
    [1, 7, 8]
  """
  if len(ids) <= prompt_len:
    return list(ids)
  if bos_token_id is not None and ids[0] == bos_token_id:
    return [ids[0]] + list(ids[len(ids) - prompt_len + 1:])
  return list(ids[len(ids) - prompt_len:])


def left_pad(rows: Sequence[Sequence[int]], prompt_len: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token rows to [len(rows), prompt_len]; returns (tokens int32, mask bool, True on real tokens).

  The mask comes from positions, not from comparing with the pad id, so a pad id inside a prompt stays real.

  Example:
    >>> left_pad([[1, 5], [1, 6, 7]], prompt_len=3, pad_token_id=0)[0]
    array([[0, 1, 5],
           [1, 6, 7]], dtype=int32)
  """
  lengths = np.array([len(r) for r in rows], dtype=np.int32)
  if np.any(lengths > prompt_len):
    raise ValueError(f"a row has {lengths.max()} tokens, more than prompt_len={prompt_len}.")
  mask = np.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
  tokens = np.full((len(rows), prompt_len), pad_token_id, dtype=np.int32)
  tokens[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
  return tokens, mask


class PromptIterator:
  """Batches {"prompts": int32 [per_host, prompt_len], "prompt_mask": bool [per_host, prompt_len],
  "text": list[str] (the prompts as read, before truncation; a conversation's last turn, see
  `prompt_encoding.prompt_text`)}, left-padded with the tokenizer's pad id (the mask, not the id, tells padding).

  Args:
    texts: the prompts (random access; see `TextSource`).
    tokenizer: a `prompt_encoding.PromptTokenizer`, or a tokenizer (`transformers`, `IdTokenizer`) to wrap in one
      without a chat template; it needs a pad token. Each yielded prompt is `remember`ed by it.
    batch_size: prompts per global batch, across all hosts; divisible by `process_count`.
    prompt_len: tokens per prompt after padding.
    seed: seeds the per-epoch permutations.
    overlong: "truncate" (keep the last `prompt_len` tokens) or "reject" (skip and count).
    shuffle: False visits the prompts in stored order (for evaluation).
    num_epochs: stop (StopIteration) after this many passes, dropping an incomplete last batch; None: forever.
    process_index, process_count: this host and the number of hosts.
    vocab_size: if given, token ids must lie in [0, vocab_size).
    name: names the split in logs and errors.
  """

  def __init__(self, texts: TextSource, tokenizer, *, batch_size: int, prompt_len: int, seed: int = 0,
               overlong: str = "truncate", shuffle: bool = True, num_epochs: int | None = None,
               process_index: int = 0, process_count: int = 1, vocab_size: int | None = None,
               name: str = "train"):
    if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if prompt_len <= 0:
      raise ValueError(f"prompt_len={prompt_len} must be positive.")
    if overlong not in OVERLONG_POLICIES:
      raise ValueError(f"overlong={overlong!r} must be one of {OVERLONG_POLICIES}.")
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs={num_epochs} must be positive or None.")
    tokenizer = prompt_encoding.as_prompt_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
      raise PromptError("the tokenizer has no pad token (pad_token_id is None); name one of its tokens in "
                        "config.policy.pad_token, e.g. its EOS token.")
    if len(texts) == 0:
      raise PromptError(f"the {name!r} prompts are empty: no prompt to batch.")
    self._texts = texts
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._prompt_len = prompt_len
    self._seed = seed
    self._overlong = overlong
    self._shuffle = shuffle
    self._num_epochs = num_epochs
    self._rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
    self._vocab_size = vocab_size
    self._name = name
    self._epoch = 0
    self._index = 0
    self._order_epoch = None
    self._order = None
    self.counts = dict.fromkeys(COUNT_KEYS, 0)
    logging.info("Prompts %r: %d, batch %d (this host: rows %d:%d), prompt_len %d; longer prompts are %s.", name,
                 len(texts), batch_size, self._rows.start, self._rows.stop, prompt_len,
                 "truncated to their last tokens" if overlong == "truncate" else "rejected (skipped and counted)")

  def get_state(self) -> dict:
    """The position (epoch, index into its order) and counts, JSON-serialisable; `set_state` restores it."""
    return {"epoch": self._epoch, "index": self._index, "num_prompts": len(self._texts), "seed": self._seed,
            "counts": dict(self.counts)}

  def set_state(self, state: dict) -> None:
    """Continues from `state` (from `get_state` of an iterator over the same prompts with the same seed)."""
    if (state["num_prompts"], state["seed"]) != (len(self._texts), self._seed):
      raise PromptError(f"state for {state['num_prompts']} prompts with seed {state['seed']} does not fit the "
                        f"{self._name!r} iterator over {len(self._texts)} prompts with seed {self._seed}.")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self.counts = {key: int(state["counts"][key]) for key in COUNT_KEYS}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    ids, texts = [], []
    misses = 0  # Consecutive unusable prompts: a whole pass of them means none is usable.
    while len(ids) < self._batch_size:
      position = self._next_position()
      raw = self._texts[position]
      prompt = prompt_encoding.as_prompt(raw)
      encoded = self._encode(prompt, raw, position)
      if encoded is None:
        misses += 1
        if misses >= len(self._texts):
          raise PromptError(f"no usable prompt in the {self._name!r} prompts: {self.counts}.")
        continue
      misses = 0
      ids.append(encoded)
      texts.append(prompt_encoding.prompt_text(prompt))
    self.counts["yielded"] += self._batch_size
    tokens, mask = left_pad(ids[self._rows], self._prompt_len, self._tokenizer.pad_token_id)
    return {"prompts": tokens, "prompt_mask": mask, "text": texts[self._rows]}

  def _next_position(self) -> int:
    """The stored index of the next prompt in the epoch order, moving to the next epoch when one ends."""
    if self._index == len(self._texts):
      logging.log_every_n_seconds(logging.INFO, "Prompts %r: epoch %d done; counts so far %s.", 60, self._name,
                                  self._epoch, self.counts)
      self._epoch += 1
      self._index = 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    if self._order_epoch != self._epoch:
      n = len(self._texts)
      self._order = np.random.default_rng([self._seed, self._epoch]).permutation(n) if self._shuffle else None
      self._order_epoch = self._epoch
    position = self._index if self._order is None else int(self._order[self._index])
    self._index += 1
    return position

  def _encode(self, prompt: prompt_encoding.Prompt | None, raw, position: int) -> list[int] | None:
    """The token ids of `prompt` (`raw` read as text, None if undecodable) fitted to `prompt_len` and remembered by
    the tokenizer, or None (counted) if it is skipped."""
    if prompt is None:
      return self._skip("undecodable", position, raw)
    if self._tokenizer.is_empty(prompt):
      return self._skip("empty", position, raw)
    ids = self._tokenizer.encode(prompt)
    if self._vocab_size is not None and not all(0 <= i < self._vocab_size for i in ids):
      raise PromptError(f"prompt {position} of {self._name!r} ({str(prompt)[:80]!r}) encodes to token ids outside "
                        f"[0, vocab_size={self._vocab_size}): {[i for i in ids if not 0 <= i < self._vocab_size]}; "
                        "the tokenizer does not match the model.")
    if len(ids) > self._prompt_len:
      if self._overlong == "reject":
        return self._skip("rejected", position, raw, f"{len(ids)} tokens > prompt_len {self._prompt_len}")
      self._count("truncated", position, raw, f"{len(ids)} tokens > prompt_len {self._prompt_len}")
      ids = fit_to_length(ids, self._prompt_len, self._tokenizer.bos_token_id)
    self._tokenizer.remember(ids, prompt)
    return ids

  def _count(self, kind: str, position: int, raw, detail: str = "") -> None:
    if self.counts[kind] == 0:
      logging.warning("Prompts %r: prompt %d is %s%s: %.80r (further ones are only counted).", self._name,
                      position, kind, f" ({detail})" if detail else "", raw)
    self.counts[kind] += 1

  def _skip(self, kind: str, position: int, raw, detail: str = "") -> None:
    self._count(kind, position, raw, detail)
    return None
