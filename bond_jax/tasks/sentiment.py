"""The default task's reward: how positive a review reads, from a word lexicon a person can check by hand.

For a prompt and its generation, read as one review (the prompt's words followed by the generation's words),

    reward    = sentiment + 0.05 * tanh(letters / 100)
    sentiment = x / sqrt(x**2 + 15)                  (VADER's "compound" normalisation, in (-1, 1))
    x         = sum over sentiment words w_i of  valence(w_i) * boost_i * negation_i * recency_i

- `valence` is the word's entry in `sentiment_lexicon.VALENCE` (about -3 to +3; every word its own value);
- `boost_i` is the factor of an intensifier right before it ("very good": 1.3 x "good"), else 1;
- `negation_i` is -0.74 if "not", "never", "wasn't", ... occurs within the 3 words before it, else 1;
- `recency_i = 1 + 0.25 * i / (n - 1)` for the i-th of n words: a review's last words are its verdict, so they
  count up to 25% more;
- `letters` is the number of letters in the generation's words: a small bonus for saying more (at most 0.05,
  against 0.18 between "The food was good." and "The food was great."), saturating after about a sentence.

The squashing rewards one clearly positive statement almost as much as several, so repeating "great" gains
little. Distinct valences, recency and the letter count make ties between different texts rare (about 1e-4 of
pairs of different continuations of one prompt, see tests/test_default_task.py). Prompts and generations are
split into words separately, so the score does not depend on whether a decoded generation begins with a space.

Example:
  >>> sentiment_reward(["The food was"], [" very good."])[0] > sentiment_reward(["The food was"], [" bad."])[0]
  True
"""

from collections.abc import Sequence
import math

from bond_jax.tasks import sentiment_lexicon as lexicon

_RECENCY_GAIN = 0.25
_COMPOUND_ALPHA = 15.0
_LENGTH_BONUS = 0.05
_LENGTH_SCALE = 100.0


def review_words(text: str) -> list[str]:
  """Lower-cased words of `text` (apostrophes kept inside words).

  Example:
    >>> review_words("It wasn't GOOD, sadly.")
    ['it', "wasn't", 'good', 'sadly']
  """
  return lexicon.WORD.findall(text.lower())


def sentiment_sum(words: Sequence[str]) -> float:
  """x above: the boosted, negation-aware, recency-weighted sum of valences of `words` (from `review_words`).

  Example:
    >>> sentiment_sum(["the", "food", "was", "good"])   # 1.9 * 1.25, "good" being the last word
    2.375
  """
  n = len(words)
  total = 0.0
  for i, word in enumerate(words):
    valence = lexicon.VALENCE.get(word)
    if valence is None:
      continue
    boost = lexicon.INTENSIFIERS.get(words[i - 1], 1.0) if i > 0 else 1.0
    window = words[max(0, i - lexicon.NEGATION_WINDOW):i]
    negation = lexicon.NEGATION_FACTOR if lexicon.NEGATORS.intersection(window) else 1.0
    recency = 1.0 + _RECENCY_GAIN * i / max(n - 1, 1)
    total += valence * boost * negation * recency
  return total


def _compound(words: list[str]) -> float:
  x = sentiment_sum(words)
  return x / math.sqrt(x * x + _COMPOUND_ALPHA)


def review_sentiment(text: str) -> float:
  """The sentiment term of the reward for one review text, in (-1, 1); see the module docstring.

  Example:
    >>> review_sentiment("The plot was not bad.") > 0 > review_sentiment("The plot was not good.")
    True
  """
  return _compound(review_words(text))


def sentiment_reward(prompts: Sequence[str], generations: Sequence[str]) -> list[float]:
  """Rewards [batch] of generations [batch] continuing prompts [batch]; see the module docstring.

  Plain Python on decoded text; `bond_jax.rewards.text_reward` wraps it for use inside jit.

  Example:
    >>> [round(r, 2) for r in sentiment_reward(["The room was", "The room was"], [" lovely.", " dirty."])]
    [0.64, -0.53]
  """
  if len(prompts) != len(generations):
    raise ValueError(f"prompts and generations must have the same length, got {len(prompts)} and "
                     f"{len(generations)}.")
  rewards = []
  for prompt, generation in zip(prompts, generations):
    generated = review_words(generation)
    length_bonus = _LENGTH_BONUS * math.tanh(sum(map(len, generated)) / _LENGTH_SCALE)
    rewards.append(_compound(review_words(prompt) + generated) + length_bonus)
  return rewards
