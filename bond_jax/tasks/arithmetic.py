"""A verifiable task: two-number addition, "12+7=", checked right (1) or wrong (0).

Everything is a deterministic function of the constants below: the prompts (every `a+b=` with operands up to
`MAX_OPERAND`), the character-level tokenizer (built with `tokenizers`, saved in Hugging Face format), and the
reference LM's pretraining corpus, in which each line `a+b=c` is right with probability `CORPUS_PASS_RATE` and
otherwise off by a typical slip (±1, ±2, ±10), so a model trained on it is right about that often and Best-of-N
helps. `write_assets` writes prompts and tokenizer under `bond_jax/assets/arithmetic/`; the reference checkpoint
is made there by `python experiments/pretrain.py --task=arithmetic`.

The reward for BOND runs is `config.reward.kind = "python"`, `config.reward.function =
"bond_jax.tasks.arithmetic:check"`.

Example:
  >>> check(["12+7=", "3+4="], ["19", "8"])
  [1.0, 0.0]
"""

import json
import os
import re

import numpy as np
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import Regex
from tokenizers import Tokenizer

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "arithmetic")
PROMPTS_PATH = os.path.join(ASSETS_DIR, "prompts.jsonl")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
POLICY_DIR = os.path.join(ASSETS_DIR, "policy")

MAX_OPERAND = 29
CORPUS_PASS_RATE = 0.35
CORPUS_SEED = 0
NUM_CORPUS_LINES = 60_000
SLIPS = (-10, -2, -1, 1, 2, 10)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "0123456789+="
_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


def prompt_lines() -> list[str]:
  """Every prompt `"a+b="`, `0 <= a, b <= MAX_OPERAND`, in order."""
  return [f"{a}+{b}=" for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def corpus_lines(num_lines: int = NUM_CORPUS_LINES, seed: int = CORPUS_SEED) -> list[str]:
  """Pretraining lines `"a+b=c"`: c right with probability `CORPUS_PASS_RATE`, else a non-negative slip.

  Example:
    >>> corpus_lines(3)   # most lines right, some slipped
    ['25+8=33', '19+9=29', '15+1=26']
  """
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, MAX_OPERAND + 1, (2, num_lines))
  slips = np.where(rng.random(num_lines) < CORPUS_PASS_RATE, 0, rng.choice(SLIPS, num_lines))
  sums = a + b
  answers = np.where(sums + slips < 0, sums - slips, sums + slips)  # A slip below 0 goes up instead: still wrong.
  return [f"{x}+{y}={c}" for x, y, c in zip(a, b, answers)]


def check(prompts: list[str], generations: list[str]) -> list[float]:
  """1.0 where the generation is exactly the sum the prompt asks for, else 0.0 (a `reward.kind="python"` reward).

  Args:
    prompts: n prompt texts `"a+b="` (a malformed prompt scores 0).
    generations: n generated texts (special tokens removed).

  Returns:
    n floats in {0, 1}.

  Example:
    >>> check(["2+2="], ["4"])
    [1.0]
  """
  if len(prompts) != len(generations):
    raise ValueError(f"`generations` must have one entry per prompt ({len(prompts)}), got {len(generations)}.")
  scores = []
  for prompt, generation in zip(prompts, generations):
    match = _PROMPT.match(prompt.strip())
    scores.append(float(match is not None and generation.strip() == str(int(match[1]) + int(match[2]))))
  return scores


def build_tokenizer() -> Tokenizer:
  """Character-level: one token per character of `CHARACTERS`; <pad>=0, <bos>=1 (added by encode), <eos>=2, <unk>=3.

  Example:
    >>> build_tokenizer().encode("12+7=").tokens
    ['<bos>', '1', '2', '+', '7', '=']
  """
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()  # Characters join without spaces.
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
  return tokenizer


def tokenizer_config() -> dict:
  """The `tokenizer_config.json` that lets `transformers.AutoTokenizer` load the tokenizer."""
  return {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
          "eos_token": "<eos>", "unk_token": "<unk>", "model_max_length": 64}


def write_assets(out_dir: str = ASSETS_DIR) -> None:
  """Writes prompts.jsonl and tokenizer/{tokenizer.json, tokenizer_config.json} under `out_dir`.

  Example:
    >>> import os, tempfile
    >>> out_dir = tempfile.mkdtemp()
    >>> write_assets(out_dir)
    >>> sorted(os.listdir(out_dir)), sorted(os.listdir(os.path.join(out_dir, "tokenizer")))
    (['prompts.jsonl', 'tokenizer'], ['tokenizer.json', 'tokenizer_config.json'])
  """
  os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
  with open(os.path.join(out_dir, "prompts.jsonl"), "w", encoding="utf-8", newline="\n") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompt_lines())
  build_tokenizer().save(os.path.join(out_dir, "tokenizer", "tokenizer.json"), pretty=True)
  with open(os.path.join(out_dir, "tokenizer", "tokenizer_config.json"), "w", encoding="utf-8") as f:
    f.write(json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n")
