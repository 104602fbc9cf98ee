"""A tokenizer for synthetic token tasks: the text of a sequence is its token ids, separated by spaces.

Every id in `[0, vocab_size)` is an ordinary token (none is special, so decoding keeps them all); id 0 doubles as
the pad id that `prompt_batches.PromptIterator` fills the padding with (the prompt mask, not the id, tells padding
from a real 0).

Example:
  >>> tokenizer = IdTokenizer(vocab_size=8)
  >>> tokenizer.encode("3 1 0")
  [3, 1, 0]
  >>> tokenizer.decode([3, 1, 0])
  '3 1 0'
"""

from collections.abc import Sequence

from bond_jax.data.prompt_encoding import PromptError


class IdTokenizer:
  """Reads and writes token ids as space-separated integers; `PromptError` on anything else or an id out of range."""

  pad_token_id = 0
  bos_token_id = None
  eos_token_id = None
  all_special_ids = ()

  def __init__(self, vocab_size: int):
    if not isinstance(vocab_size, int) or vocab_size < 1:
      raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}.")
    self.vocab_size = vocab_size

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def pad_token(self) -> str:
    return str(self.pad_token_id)

  @pad_token.setter
  def pad_token(self, token: str) -> None:
    self.pad_token_id = self.get_vocab()[token]

  def get_vocab(self) -> dict[str, int]:
    """Each id's text is the id itself: `{"0": 0, "1": 1, ...}`."""
    return {str(i): i for i in range(self.vocab_size)}

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """`"3 1 4"` -> `[3, 1, 4]` (there are no special tokens to add)."""
    del add_special_tokens
    try:
      ids = [int(word) for word in text.split()]
    except ValueError as e:
      raise PromptError(f"IdTokenizer reads space-separated integers, got {text[:80]!r}.") from e
    if not all(0 <= i < self.vocab_size for i in ids):
      raise PromptError(f"IdTokenizer: ids of {text[:80]!r} must lie in [0, vocab_size={self.vocab_size}).")
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """`[3, 1, 4]` -> `"3 1 4"` (there are no special tokens to skip)."""
    del skip_special_tokens
    return " ".join(str(int(i)) for i in ids)

  def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
    return [self.decode(row, skip_special_tokens) for row in rows]
