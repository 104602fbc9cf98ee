"""A seeded grammar of short English product reviews: the default task's LM corpus and its BOND prompts.

Reviews are 1 to 5 sentences about movies, restaurants, hotels, books, phones or games, drawn from templates
filled with the positive and negative words of `sentiment_lexicon`, intensifiers and negations, after an optional
neutral sentence of context. Each review leans positive, negative or mixed, so a small LM trained on them learns
readable text whose sentiment the default reward can score, and BOND has a clear direction (more positive) to
move its samples in.

Prompts are review beginnings cut just before the first sentiment-bearing word (and before any intensifier or
negator leading up to it), so the continuation alone decides the sentiment.

Example:
  >>> generate_reviews(1, seed=0)
  ['I played it with my friend. The board game was boring. I really hated the tutorial. Never again.']
  >>> generate_prompts(2, seed=1)
  ['It is near the old town. The breakfast was', 'I finished it in five days. The story was']
"""

import dataclasses

import numpy as np

from bond_jax.tasks import sentiment_lexicon as lexicon


@dataclasses.dataclass(frozen=True)
class _Domain:
  nouns: tuple[str, ...]  # What is reviewed ("the movie").
  aspects: tuple[str, ...]  # Singular parts of it ("the plot was").
  plural_aspects: tuple[str, ...]  # Plural parts of it ("the jokes were").
  positive: tuple[str, ...]  # Domain-specific adjectives added to the general ones.
  negative: tuple[str, ...]
  neutral_sentences: tuple[str, ...]  # Sentences without sentiment, for context.


_DOMAINS = (
    _Domain(
        nouns=("movie", "film", "show", "documentary"),
        aspects=("plot", "acting", "soundtrack", "ending", "dialogue", "pacing", "cast", "script", "camera work"),
        plural_aspects=("characters", "jokes", "special effects", "costumes"),
        positive=("memorable", "charming", "brilliant", "fun"),
        negative=("boring", "forgettable", "confusing", "clumsy"),
        neutral_sentences=("We watched it on a {day} night.", "I saw it with my {companion}.",
                           "It runs a little over two hours.", "I watched it at home."),
    ),
    _Domain(
        nouns=("restaurant", "cafe", "diner", "bistro"),
        aspects=("food", "service", "coffee", "menu", "dessert", "soup", "pizza", "waiter", "staff"),
        plural_aspects=("prices", "portions", "fries", "noodles"),
        positive=("tasty", "fresh", "friendly", "generous"),
        negative=("bland", "greasy", "stale", "overpriced", "rude", "cold"),
        neutral_sentences=("We went there on a {day} night.", "I had lunch there with my {companion}.",
                           "We ordered the set menu.", "It is close to the station."),
    ),
    _Domain(
        nouns=("hotel", "hostel", "resort", "guest house"),
        aspects=("room", "bed", "breakfast", "view", "location", "pool", "lobby", "shower", "staff"),
        plural_aspects=("towels", "prices", "rooms"),
        positive=("comfortable", "clean", "friendly", "lovely"),
        negative=("cramped", "dirty", "noisy", "overpriced", "rude"),
        neutral_sentences=("We stayed there for {nights} nights.", "I stayed there with my {companion}.",
                           "We arrived on a {day} evening.", "It is near the old town."),
    ),
    _Domain(
        nouns=("book", "novel", "story collection", "memoir"),
        aspects=("story", "writing", "ending", "prose", "plot", "translation", "cover"),
        plural_aspects=("characters", "chapters", "dialogues"),
        positive=("memorable", "charming", "beautiful", "brilliant"),
        negative=("dull", "confusing", "forgettable", "painful"),
        neutral_sentences=("I read it over a long weekend.", "My {companion} gave it to me.",
                           "I read it on the train.", "It has about three hundred pages."),
    ),
    _Domain(
        nouns=("phone", "laptop", "tablet", "camera"),
        aspects=("battery", "screen", "keyboard", "design", "speaker", "charger", "software", "case"),
        plural_aspects=("buttons", "photos", "updates"),
        positive=("smooth", "solid", "impressive", "beautiful"),
        negative=("slow", "broken", "weak", "clumsy", "overpriced"),
        neutral_sentences=("I bought it last {month}.", "I use it every day for work.",
                           "It came in a small box.", "My {companion} has the same one."),
    ),
    _Domain(
        nouns=("game", "puzzle game", "board game", "racing game"),
        aspects=("story", "music", "gameplay", "art style", "map", "ending", "tutorial"),
        plural_aspects=("controls", "graphics", "levels", "puzzles"),
        positive=("fun", "charming", "impressive", "smooth"),
        negative=("boring", "confusing", "clumsy", "annoying", "messy"),
        neutral_sentences=("I played it on a {day} night.", "I played it with my {companion}.",
                           "I finished it in {nights} days.", "It has twenty levels."),
    ),
)
_GENERAL_POSITIVE = ("good", "great", "excellent", "wonderful", "superb", "amazing", "nice", "pleasant",
                     "fantastic", "lovely", "perfect", "enjoyable", "delightful", "decent", "fine", "solid",
                     "outstanding")
_GENERAL_NEGATIVE = ("bad", "awful", "terrible", "poor", "disappointing", "mediocre", "horrible", "dull",
                     "weak", "messy", "dreadful", "annoying")
_FILL = {
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "companion": ("friend", "sister", "brother", "cousin", "partner", "dad", "colleague", "neighbour"),
    "nights": ("two", "three", "four", "five"),
    "month": ("spring", "summer", "winter", "autumn"),
}
_OPENERS = ("Honestly,", "Overall,", "To be honest,", "In the end,", "On the whole,", "At first,",
            "For the price,", "After a while,", "To be fair,", "In my opinion,")
_LINKING_VERBS = ("seemed", "felt", "looked")
_BOOSTERS = tuple(lexicon.INTENSIFIERS)
# Verdicts that end a review (never inside one, so no prompt carries a verdict).
_CLOSERS = {1: ("I would recommend it to anyone.", "I would happily recommend it.",
                "A real gem.", "I would go back again."),
            -1: ("I would not recommend it.", "What a waste.", "It was a mess.", "Never again.")}


def _choice(rng: np.random.Generator, options):
  return options[rng.integers(len(options))]


def _adjective(rng, domain: _Domain, polarity: int) -> str:
  pool = (_GENERAL_POSITIVE + domain.positive) if polarity > 0 else (_GENERAL_NEGATIVE + domain.negative)
  return _choice(rng, pool)


def _adjective_phrase(rng, domain: _Domain, polarity: int) -> str:
  """An adjective of `polarity`, sometimes boosted ("very good") or negated ("not bad" for a positive)."""
  u = rng.random()
  if u < 0.12:
    return "not " + _adjective(rng, domain, -polarity)
  if u < 0.45:
    return _choice(rng, _BOOSTERS) + " " + _adjective(rng, domain, polarity)
  return _adjective(rng, domain, polarity)


def _aspect(rng, domain: _Domain) -> tuple[str, str]:
  """An aspect and its past-tense "to be"."""
  if rng.random() < 0.25:
    return _choice(rng, domain.plural_aspects), "were"
  return _choice(rng, domain.aspects), "was"


def _linking(rng, be: str) -> str:
  return be if rng.random() < 0.7 else _choice(rng, _LINKING_VERBS)


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _sentence(rng, domain: _Domain, noun: str, polarity: int) -> str:
  """One sentence; `polarity` is +1 or -1 (the sentence's intended sentiment)."""
  kind = rng.integers(7)
  aspect, be = _aspect(rng, domain)
  if kind == 0:
    return f"the {aspect} {_linking(rng, be)} {_adjective_phrase(rng, domain, polarity)}."
  if kind == 1:
    aspect2, be2 = _aspect(rng, domain)
    return (f"the {aspect} {be} {_adjective_phrase(rng, domain, polarity)} and the {aspect2} {be2} "
            f"{_adjective_phrase(rng, domain, polarity)}.")
  if kind == 2:
    aspect2, be2 = _aspect(rng, domain)
    return (f"the {aspect} {be} {_adjective_phrase(rng, domain, polarity)}, but the {aspect2} {be2} "
            f"{_adjective_phrase(rng, domain, -polarity)}.")
  if kind == 3:
    verbs = lexicon.POSITIVE_VERBS if polarity > 0 else lexicon.NEGATIVE_VERBS
    booster = "really " if rng.random() < 0.3 else ""
    return f"I {booster}{_choice(rng, tuple(verbs))} the {aspect}."
  if kind == 4:
    phrase = _adjective_phrase(rng, domain, polarity)
    if phrase.startswith("not "):
      return f"it was not {_article(phrase[4:])} {phrase[4:]} {noun}."
    return f"it was {_article(phrase)} {phrase} {noun}."
  if kind == 5:
    return f"{_choice(rng, _OPENERS)} the {aspect} {_linking(rng, be)} {_adjective_phrase(rng, domain, polarity)}."
  return f"the {noun} was {_adjective_phrase(rng, domain, polarity)}."


def _neutral_sentence(rng, domain: _Domain) -> str:
  template = _choice(rng, domain.neutral_sentences)
  return template.format(**{k: _choice(rng, v) for k, v in _FILL.items()})


def _capitalize(sentence: str) -> str:
  return sentence[0].upper() + sentence[1:]


def _review(rng: np.random.Generator) -> str:
  domain = _choice(rng, _DOMAINS)
  noun = _choice(rng, domain.nouns)
  lean = _choice(rng, (1, 1, 1, -1, -1, -1, 0))  # 0: mixed, each sentence's polarity drawn on its own.
  sentences = []
  if rng.random() < 0.3:
    sentences.append(_neutral_sentence(rng, domain))
  for _ in range(1 + rng.integers(3)):
    polarity = lean if lean else _choice(rng, (1, -1))
    sentences.append(_sentence(rng, domain, noun, polarity))
  if lean and rng.random() < 0.25:
    sentences.append(_choice(rng, _CLOSERS[lean]))
  return " ".join(_capitalize(s) for s in sentences)


def generate_reviews(num_reviews: int, seed: int) -> list[str]:
  """`num_reviews` reviews, one string each (1 to 5 sentences), a deterministic function of `seed`.

  Example:
    >>> generate_reviews(1, seed=0)[0]
    'I played it with my friend. The board game was boring. I really hated the tutorial. Never again.'
  """
  if num_reviews < 0:
    raise ValueError(f"num_reviews={num_reviews} must be >= 0.")
  rng = np.random.default_rng(seed)
  return [_review(rng) for _ in range(num_reviews)]


_SENTIMENT_CUES = frozenset(lexicon.VALENCE) | frozenset(lexicon.INTENSIFIERS) | lexicon.NEGATORS


def review_prompt(review: str, min_words: int = 3, max_words: int = 11) -> str | None:
  """The review's beginning up to (not including) its first sentiment word, intensifier or negator.

  Returns None when that beginning has fewer than `min_words` words (too little context to be a prompt) or more
  than `max_words` (so that the default prompts fit 16 tokens).

  Example:
    >>> review_prompt("Honestly, the food was very tasty.")
    'Honestly, the food was'
  """
  for i, match in enumerate(lexicon.WORD.finditer(review.lower())):
    if match.group() in _SENTIMENT_CUES:
      return review[:match.start()].rstrip() if min_words <= i <= max_words else None
  return None


def generate_prompts(num_prompts: int, seed: int, max_attempts: int = 1_000_000) -> list[str]:
  """`num_prompts` distinct review beginnings (see `review_prompt`), in first-drawn order.

  Raises ValueError if the grammar cannot yield that many distinct prompts within `max_attempts` reviews.

  Example:
    >>> generate_prompts(2, seed=1)
    ['It is near the old town. The breakfast was', 'I finished it in five days. The story was']
  """
  rng = np.random.default_rng(seed)
  prompts: dict[str, None] = {}  # An ordered set.
  for _ in range(max_attempts):
    if len(prompts) == num_prompts:
      return list(prompts)
    prompt = review_prompt(_review(rng))
    if prompt is not None:
      prompts[prompt] = None
  raise ValueError(f"num_prompts={num_prompts}: only {len(prompts)} distinct prompts in {max_attempts} reviews.")
