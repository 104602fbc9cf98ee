"""Reading prompts from plain files (JSONL or one prompt per line) and holding out an eval split by hash.

A JSONL line holds a text prompt under `text_key`, or, for chat models, a conversation under "messages": a list
of `{"role": ..., "content": ...}` turns (rendered by the tokenizer's chat template, `prompt_encoding`).

Lines are decoded as UTF-8 with `surrogateescape`, so an undecodable line is not an error here: it reaches the
prompt iterator as text that cannot be re-encoded, which skips and counts it (see `prompt_batches`).

Example:
  >>> from bond_jax.tasks import default_assets
  >>> prompts = read_prompt_file(default_assets.PROMPTS_PATH, text_key="prompt")
  >>> train, held_out = split_holdout(prompts, eval_fraction=0.1)
  >>> len(prompts), len(train) + len(held_out)
  (2000, 2000)
"""

from collections.abc import Sequence
import hashlib
import json

from bond_jax import paths
from bond_jax.data import prompt_encoding
from bond_jax.data.prompt_encoding import PromptError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MESSAGES_KEY = "messages"  # The JSONL field of a conversation prompt.


def _decoded_lines(path: str) -> list[str]:
  data = paths.as_path(path).read_bytes()
  return [line.rstrip(b"\r").decode("utf-8", "surrogateescape") for line in data.split(b"\n")]


def read_text_prompts(path: str) -> list[str]:
  """One prompt per line (a trailing newline does not add an empty prompt; other blank lines are kept).

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "prompts.txt")
    >>> with open(path, "w") as f:
    ...   _ = f.write("The movie was\\n\\nThe room\\n")
    >>> read_text_prompts(path)
    ['The movie was', '', 'The room']
  """
  lines = _decoded_lines(path)
  return lines[:-1] if lines and not lines[-1] else lines


def read_jsonl_prompts(path: str, text_key: str = "prompt") -> list[prompt_encoding.Prompt]:
  """The prompt of each JSON object line of `path` (blank lines are ignored): the text under `text_key`, or else
  the conversation under "messages".

  Raises:
    PromptError: naming the line, for invalid JSON, a line with neither key, a text that is not a string, or
      messages that are not a non-empty list of {"role": str, "content": str}.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "prompts.jsonl")
    >>> with open(path, "w") as f:
    ...   _ = f.write('{"prompt": "The movie was"}\\n{"messages": [{"role": "user", "content": "Hi"}]}\\n')
    >>> read_jsonl_prompts(path, text_key="prompt")
    ['The movie was', [{'role': 'user', 'content': 'Hi'}]]
  """
  prompts = []
  for number, line in enumerate(_decoded_lines(path), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptError(f"{path}:{number}: not a JSON object line ({e.msg}).") from e
    if isinstance(record, dict) and text_key in record:
      if not isinstance(record[text_key], str):
        raise PromptError(f"{path}:{number}: {text_key!r} must be a string, got {record[text_key]!r}.")
      prompts.append(record[text_key])
    elif isinstance(record, dict) and MESSAGES_KEY in record:
      if not prompt_encoding.is_conversation(record[MESSAGES_KEY]):
        raise PromptError(f"{path}:{number}: {MESSAGES_KEY!r} must be a non-empty list of "
                          f"{{\"role\": str, \"content\": str}} turns, got {str(record[MESSAGES_KEY])[:120]}.")
      prompts.append(record[MESSAGES_KEY])  # Whole turns: a template may read more keys than role and content.
    else:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise PromptError(f"{path}:{number}: neither text_key={text_key!r} nor {MESSAGES_KEY!r} found; the line holds "
                        f"{keys}.")
  return prompts


def read_prompt_file(path: str, text_key: str = "prompt") -> list[prompt_encoding.Prompt]:
  """Prompts of a JSONL file (suffix .jsonl or .ndjson, see `read_jsonl_prompts`) or a text file (one per line),
  local or on an object store (`bond_jax.paths`).

  Example:
    >>> from bond_jax.tasks import default_assets
    >>> read_prompt_file(default_assets.PROMPTS_PATH)[:2]
    ['It is near the old town. The breakfast was', 'I finished it in five days. The story was']
  """
  if not paths.as_path(path).is_file():
    raise PromptError(f"prompt file path={path!r} does not exist.")
  if path.endswith(JSONL_SUFFIXES):
    return read_jsonl_prompts(path, text_key)
  return read_text_prompts(path)


def _hash_unit(prompt: prompt_encoding.Prompt) -> float:
  """A uniform-looking number in [0, 1) fixed by the prompt alone (stable across runs and machines)."""
  text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
  digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(prompts: Sequence[prompt_encoding.Prompt], eval_fraction: float
                  ) -> tuple[list[prompt_encoding.Prompt], list[prompt_encoding.Prompt]]:
  """(train, eval): each prompt goes to eval iff a hash of it (its text, or its turns) falls below `eval_fraction`.

  The split depends on the prompt only, not on file order, and repeated prompts all land on the same side, so
  train and eval share no prompt.

  Example:
    >>> train, held_out = split_holdout(["a", "b", "c", "d"], eval_fraction=0.5)
    >>> sorted(train + held_out), split_holdout(["a", "b", "c", "d"], eval_fraction=0.5) == (train, held_out)
    (['a', 'b', 'c', 'd'], True)
  """
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
  in_eval = [_hash_unit(p) < eval_fraction for p in prompts]
  return ([p for p, e in zip(prompts, in_eval) if not e], [p for p, e in zip(prompts, in_eval) if e])
