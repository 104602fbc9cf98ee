"""Reading prompts from plain files (JSONL or one prompt per line) and holding out an eval split by hash.

Lines are decoded as UTF-8 with `surrogateescape`, so an undecodable line is not an error here: it reaches the
prompt iterator as text that cannot be re-encoded, which skips and counts it (see `prompt_batches`).

Example:
  >>> prompts = read_prompt_file("bond_jax/assets/prompts.jsonl", text_key="prompt")
  >>> train, held_out = split_holdout(prompts, eval_fraction=0.1)
"""

from collections.abc import Sequence
import hashlib
import json
import os

from bond_jax.data import prompt_batches

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _decoded_lines(path: str) -> list[str]:
  with open(path, "rb") as f:
    data = f.read()
  return [line.rstrip(b"\r").decode("utf-8", "surrogateescape") for line in data.split(b"\n")]


def read_text_prompts(path: str) -> list[str]:
  """One prompt per line (a trailing newline does not add an empty prompt; other blank lines are kept).

  Example:
    >>> read_text_prompts("prompts.txt")   # ["The movie was", "I stayed there with my friend. The room"]
  """
  lines = _decoded_lines(path)
  return lines[:-1] if lines and not lines[-1] else lines


def read_jsonl_prompts(path: str, text_key: str = "prompt") -> list[str]:
  """The `text_key` field of each JSON object line of `path` (blank lines are ignored).

  Raises `prompt_batches.PromptError` naming the line for invalid JSON, a missing key or a value that is not a
  string.

  Example:
    >>> read_jsonl_prompts("prompts.jsonl", text_key="prompt")   # lines like {"prompt": "The movie was"}
  """
  prompts = []
  for number, line in enumerate(_decoded_lines(path), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise prompt_batches.PromptError(f"{path}:{number}: not a JSON object line ({e.msg}).") from e
    if not isinstance(record, dict) or text_key not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise prompt_batches.PromptError(f"{path}:{number}: text_key={text_key!r} not found; the line holds {keys}.")
    if not isinstance(record[text_key], str):
      raise prompt_batches.PromptError(f"{path}:{number}: {text_key!r} must be a string, got {record[text_key]!r}.")
    prompts.append(record[text_key])
  return prompts


def read_prompt_file(path: str, text_key: str = "prompt") -> list[str]:
  """Prompts of a JSONL file (suffix .jsonl or .ndjson, field `text_key`) or a text file (one per line).

  Example:
    >>> read_prompt_file("bond_jax/assets/prompts.jsonl")[:2]   # e.g. ["It was a", "The prices were"]
  """
  if not os.path.isfile(path):
    raise prompt_batches.PromptError(f"prompt file path={path!r} does not exist.")
  if path.endswith(JSONL_SUFFIXES):
    return read_jsonl_prompts(path, text_key)
  return read_text_prompts(path)


def _hash_unit(text: str) -> float:
  """A uniform-looking number in [0, 1) fixed by the text alone (stable across runs and machines)."""
  digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(prompts: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train, eval): each prompt goes to eval iff a hash of its text falls below `eval_fraction`.

  The split depends on the text only, not on file order, and repeated prompts all land on the same side, so
  train and eval share no prompt text.

  Example:
    >>> train, held_out = split_holdout(["a", "b", "c"], eval_fraction=0.5)
  """
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
  in_eval = [_hash_unit(p) < eval_fraction for p in prompts]
  return ([p for p, e in zip(prompts, in_eval) if not e], [p for p, e in zip(prompts, in_eval) if e])
