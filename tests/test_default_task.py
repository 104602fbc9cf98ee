"""The embedded default task: generated corpus and prompts, the shipped tokenizer, and the sentiment reward."""

import collections
import json
import math

import numpy as np
import pytest
from tokenizers import pre_tokenizers
import transformers

from bond_jax.data import prompt_batches
from bond_jax.data import prompt_files
from bond_jax.tasks import default_assets
from bond_jax.tasks import review_corpus
from bond_jax.tasks import sentiment
from bond_jax.tasks import sentiment_lexicon


@pytest.fixture(scope="module")
def corpus():
  return default_assets.corpus_lines()


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(default_assets.TOKENIZER_DIR)


# Shipped assets.


def test_committed_assets_equal_a_regeneration(corpus):
  with open(default_assets.CORPUS_PATH, encoding="utf-8") as f:
    assert f.read() == "".join(line + "\n" for line in corpus)
  with open(default_assets.PROMPTS_PATH, encoding="utf-8") as f:
    assert [json.loads(line)["prompt"] for line in f] == default_assets.prompt_lines()
  with open(f"{default_assets.TOKENIZER_DIR}/tokenizer.json", encoding="utf-8") as f:
    shipped = json.load(f)
  assert shipped == json.loads(default_assets.build_tokenizer(corpus).to_str())
  with open(f"{default_assets.TOKENIZER_DIR}/tokenizer_config.json", encoding="utf-8") as f:
    assert json.load(f) == default_assets.tokenizer_config()


def test_generators_are_seeded():
  assert review_corpus.generate_reviews(50, seed=3) == review_corpus.generate_reviews(50, seed=3)
  assert review_corpus.generate_reviews(50, seed=3) != review_corpus.generate_reviews(50, seed=4)
  prompts = review_corpus.generate_prompts(300, seed=5)
  assert prompts == review_corpus.generate_prompts(300, seed=5) and len(set(prompts)) == 300


def test_corpus_is_varied_and_mixes_sentiments(corpus):
  assert len(set(corpus)) > 0.9 * len(corpus)
  scores = np.array([sentiment.review_sentiment(line) for line in corpus])
  assert 0.3 < np.mean(scores > 0.2) < 0.7 and 0.2 < np.mean(scores < -0.2) < 0.6


def test_prompts_stop_before_any_sentiment_word():
  prompts = prompt_files.read_prompt_file(default_assets.PROMPTS_PATH)
  banned = set(sentiment_lexicon.VALENCE) | set(sentiment_lexicon.INTENSIFIERS) | sentiment_lexicon.NEGATORS
  assert all(not banned & set(sentiment.review_words(p)) for p in prompts)
  assert review_corpus.review_prompt("Honestly, the food was very tasty.") == "Honestly, the food was"
  assert review_corpus.review_prompt("The food was good.") == "The food was"
  assert review_corpus.review_prompt("It was good.") is None  # Two words: too short.


# Tokenizer.


def test_tokenizer_loads_with_special_tokens(tokenizer):
  assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
      default_assets.PAD_ID, default_assets.BOS_ID, default_assets.EOS_ID, default_assets.UNK_ID)
  assert len(tokenizer) <= default_assets.MAX_VOCAB_SIZE
  assert tokenizer.encode("The plot was great.")[0] == default_assets.BOS_ID


def test_tokenizer_round_trips_corpus_one_token_per_word(tokenizer, corpus):
  pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  sample = corpus[::20]
  encoded = tokenizer(sample)["input_ids"]
  assert tokenizer.batch_decode(encoded, skip_special_tokens=True) == sample
  assert [len(ids) - 1 for ids in encoded] == [len(pre_tokenizer.pre_tokenize_str(s)) for s in sample]
  assert all(default_assets.UNK_ID not in ids for ids in encoded)
  # Other ASCII is spelled out and still decodes; other characters become <unk>.
  assert tokenizer.decode(tokenizer.encode("Zebras jog!"), skip_special_tokens=True) == "Zebras jog!"
  assert default_assets.UNK_ID in tokenizer.encode("café")


def test_default_prompts_fit_sixteen_tokens(tokenizer):
  prompts = prompt_files.read_prompt_file(default_assets.PROMPTS_PATH)
  it = prompt_batches.PromptIterator(prompts, tokenizer, batch_size=len(prompts), prompt_len=16, shuffle=False,
                                     vocab_size=len(tokenizer))
  batch = next(it)
  assert it.counts["truncated"] == 0 and batch["text"] == prompts
  assert tokenizer.batch_decode([row[mask] for row, mask in zip(batch["prompts"], batch["prompt_mask"])],
                                skip_special_tokens=True) == prompts


# Reward.


def test_lexicon_valences_distinct_and_word_classes_disjoint():
  valences = list(sentiment_lexicon.VALENCE.values())
  assert len(set(valences)) == len(valences)  # So sums over different words rarely tie.
  classes = [set(sentiment_lexicon.VALENCE), set(sentiment_lexicon.INTENSIFIERS), set(sentiment_lexicon.NEGATORS)]
  assert sum(map(len, classes)) == len(set().union(*classes))


def test_reward_matches_the_documented_formula():
  # "The food was good." : one sentiment word, the last of n=4 words: recency 1.25.
  x = 1.9 * 1.25
  assert sentiment.review_sentiment("The food was good.") == pytest.approx(x / math.sqrt(x * x + 15))
  # "The food was not very good": "very" boosts (1.3), "not" within 3 words negates (-0.74); last of 6 words.
  x = 1.9 * 1.3 * -0.74 * 1.25
  assert sentiment.review_sentiment("The food was not very good") == pytest.approx(x / math.sqrt(x * x + 15))
  # "Great food but awful service": positions 0 and 3 of 5 words.
  x = 3.1 * 1.0 + -3.05 * (1 + 0.25 * 3 / 4)
  assert sentiment.review_sentiment("Great food but awful service") == pytest.approx(x / math.sqrt(x * x + 15))
  # The reward adds 0.05 * tanh(letters / 100) for the generation's letters (" very good." has 8).
  sentiment_part = sentiment.review_sentiment("The food was very good.")
  assert sentiment.sentiment_reward(["The food was"], [" very good."]) == [
      pytest.approx(sentiment_part + 0.05 * math.tanh(8 / 100))]


def test_reward_ranks_positive_above_negative():
  positive = [" great and the staff was friendly.", " really wonderful.", " not bad at all. I loved it.",
              " superb, I would recommend it."]
  negative = [" awful and the staff was rude.", " really disappointing.", " not good at all. I hated it.",
              " terrible, I would not recommend it."]
  rewards = sentiment.sentiment_reward(["The hotel was"] * 8, positive + negative)
  assert min(rewards[:4]) > 0.3 > -0.3 > max(rewards[4:])
  good, very_good, not_good = sentiment.sentiment_reward(["The plot was"] * 3, [" good.", " very good.", " not good."])
  assert very_good > good > 0 > not_good
  with pytest.raises(ValueError, match="same length"):
    sentiment.sentiment_reward(["a"], [])


def test_reward_does_not_depend_on_leading_space_of_generation():
  assert sentiment.sentiment_reward(["The room was"], ["lovely."]) == sentiment.sentiment_reward(
      ["The room was"], [" lovely."])


def test_rewards_rarely_tie_between_different_generations():
  reviews = review_corpus.generate_reviews(6000, seed=11)
  continuations = collections.defaultdict(set)  # Prompt -> distinct continuations (like policy samples).
  for review in reviews:
    prompt = review_corpus.review_prompt(review)
    if prompt is not None:
      continuations[prompt].add(review[len(prompt):])
  tied_pairs = pairs = 0
  for prompt, generations in continuations.items():
    rewards = sentiment.sentiment_reward([prompt] * len(generations), sorted(generations))
    counts = collections.Counter(rewards).values()
    tied_pairs += sum(c * (c - 1) for c in counts)
    pairs += len(rewards) * (len(rewards) - 1)
  assert pairs > 100_000
  assert tied_pairs / pairs < 1e-3
