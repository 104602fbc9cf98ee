"""The embedded default task's shipped files: review corpus, BOND prompts and tokenizer, and how they are made.

All three are deterministic functions of the constants below; `experiments/make_default_assets.py` writes them
under `bond_jax/assets/` and tests/test_default_task.py checks that the committed files equal a regeneration.

The tokenizer is word-level with a character fallback, built with the `tokenizers` library: GPT-2 style byte-level
pre-tokenisation (a word carries its leading space, "Ġgreat"), and a Unigram model whose pieces are the corpus's
words (scored by log frequency) plus the printable ASCII characters (scored so low that a known word is always
one token). Every corpus word is one token, other ASCII text is spelled by characters, anything else is <unk>;
decoding gives back the text exactly. Special tokens: <pad>=0, <bos>=1 (added in front by `encode`), <eos>=2,
<unk>=3.

Example:
  >>> tokenizer = load_tokenizer()
  >>> tokenizer.decode(tokenizer.encode("The plot was great."), skip_special_tokens=True)
  'The plot was great.'
"""

import collections
from collections.abc import Sequence
import json
import math
import os

from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import Tokenizer
import transformers

from bond_jax.tasks import review_corpus

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CORPUS_PATH = os.path.join(ASSETS_DIR, "reviews.txt")
PROMPTS_PATH = os.path.join(ASSETS_DIR, "prompts.jsonl")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")

CORPUS_SEED = 0
NUM_REVIEWS = 12_000
PROMPT_SEED = 1  # Not the corpus seed, so prompts are not just the corpus's first reviews cut short.
NUM_PROMPTS = 2_000
MAX_VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
_CHARACTER_SCORE = -100.0  # Below any word's log frequency times its length in characters.


def corpus_lines() -> list[str]:
  """The LM training corpus: one review per line."""
  return review_corpus.generate_reviews(NUM_REVIEWS, seed=CORPUS_SEED)


def prompt_lines() -> list[str]:
  """The BOND prompts: distinct review beginnings."""
  return review_corpus.generate_prompts(NUM_PROMPTS, seed=PROMPT_SEED)


def build_tokenizer(lines: Sequence[str]) -> Tokenizer:
  """The word-level tokenizer with character fallback described in the module docstring, built from `lines`.

  Example:
    >>> build_tokenizer(["The plot was great."]).encode("The plot was great.").tokens
    ['<bos>', 'The', 'Ġplot', 'Ġwas', 'Ġgreat', '.']
  """
  pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  counts = collections.Counter(piece for line in lines for piece, _ in pre_tokenizer.pre_tokenize_str(line))
  characters = sorted({pre_tokenizer.pre_tokenize_str(chr(c))[0][0] for c in range(32, 127)})
  words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
  num_words = MAX_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(characters)
  if len(words) > num_words:
    raise ValueError(f"the corpus has {len(words)} distinct words; at most {num_words} fit MAX_VOCAB_SIZE.")
  total = sum(counts.values())
  vocab = ([(token, 0.0) for token in SPECIAL_TOKENS] + [(c, _CHARACTER_SCORE) for c in characters]
           + [(w, math.log(counts[w] / total)) for w in words])
  tokenizer = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
  return tokenizer


def tokenizer_config() -> dict:
  """The `tokenizer_config.json` that lets `transformers.AutoTokenizer` load the tokenizer."""
  return {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
          "eos_token": "<eos>", "unk_token": "<unk>", "model_max_length": 1024}


def write_assets(out_dir: str = ASSETS_DIR) -> None:
  """Writes reviews.txt, prompts.jsonl and tokenizer/{tokenizer.json, tokenizer_config.json} under `out_dir`.

  Example:
    >>> import os, tempfile
    >>> out_dir = tempfile.mkdtemp()
    >>> write_assets(out_dir)
    >>> sorted(os.listdir(out_dir))
    ['prompts.jsonl', 'reviews.txt', 'tokenizer']
  """
  corpus = corpus_lines()
  os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
  with open(os.path.join(out_dir, "reviews.txt"), "w", encoding="utf-8", newline="\n") as f:
    f.writelines(line + "\n" for line in corpus)
  with open(os.path.join(out_dir, "prompts.jsonl"), "w", encoding="utf-8", newline="\n") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompt_lines())
  build_tokenizer(corpus).save(os.path.join(out_dir, "tokenizer", "tokenizer.json"), pretty=True)
  with open(os.path.join(out_dir, "tokenizer", "tokenizer_config.json"), "w", encoding="utf-8") as f:
    f.write(json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n")


def load_tokenizer(path: str = TOKENIZER_DIR):
  """The tokenizer in `path` (default: the shipped one) via `transformers.AutoTokenizer`.

  Example:
    >>> tokenizer = load_tokenizer()
    >>> tokenizer.convert_ids_to_tokens(tokenizer.encode("The plot was"))
    ['<bos>', 'The', 'Ġplot', 'Ġwas']
  """
  return transformers.AutoTokenizer.from_pretrained(path)
