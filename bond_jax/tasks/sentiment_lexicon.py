"""The sentiment lexicon shared by the default task's corpus grammar and its reward.

Valences are on the VADER scale (Hutto & Gilbert, 2014): about -4 (very negative) to +4 (very positive). Every
word has its own valence (no two are equal), so sums over different words rarely tie. Intensifiers multiply the
valence of the next sentiment word; negators flip (and damp) it.

Example:
  >>> VALENCE["great"], VALENCE["awful"], INTENSIFIERS["very"]
  (3.1, -3.05, 1.3)
"""

import re

# How text splits into the words this lexicon speaks of (lower case; apostrophes kept inside: "wasn't").
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

# Adjectives that describe an aspect ("the plot was ___").
POSITIVE_ADJECTIVES = {
    "fine": 0.8, "decent": 1.05, "solid": 1.45, "clean": 1.5, "smooth": 1.35, "fresh": 1.3, "nice": 1.6,
    "pleasant": 1.8, "good": 1.9, "comfortable": 1.95, "memorable": 1.85, "tasty": 2.0, "enjoyable": 2.1,
    "generous": 2.05, "friendly": 2.2, "impressive": 2.25, "fun": 2.3, "charming": 2.35, "delightful": 2.6,
    "lovely": 2.55, "excellent": 2.7, "perfect": 2.75, "amazing": 2.8, "brilliant": 2.85, "wonderful": 2.9,
    "beautiful": 2.95, "superb": 3.0, "fantastic": 2.92, "great": 3.1, "outstanding": 3.2,
}
NEGATIVE_ADJECTIVES = {
    "slow": -1.0, "cold": -0.9, "forgettable": -1.1, "noisy": -1.2, "bland": -1.3, "mediocre": -1.4,
    "confusing": -1.45, "greasy": -1.35, "cramped": -1.5, "clumsy": -1.55, "weak": -1.6, "messy": -1.65,
    "dull": -1.7, "stale": -1.75, "overpriced": -1.8, "boring": -1.9, "dirty": -1.95, "annoying": -1.92,
    "rude": -2.0, "poor": -2.1, "disappointing": -2.2, "broken": -2.3, "bad": -2.5, "painful": -2.6,
    "horrible": -2.9, "terrible": -3.0, "awful": -3.05, "dreadful": -2.95,
}

# Verbs with a person as subject ("I ___ the ending").
POSITIVE_VERBS = {"liked": 1.75, "enjoyed": 2.15, "appreciated": 1.88, "loved": 3.05, "adored": 2.83}
NEGATIVE_VERBS = {"disliked": -1.85, "hated": -3.02, "regretted": -2.05, "endured": -1.25, "dreaded": -2.4}
# "recommend" carries sentiment too, so "I would not recommend it" scores negative.
OTHER_SENTIMENT_WORDS = {"recommend": 1.55, "recommended": 1.62, "mess": -1.98, "waste": -2.45, "gem": 2.65}

VALENCE: dict[str, float] = {
    **POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **POSITIVE_VERBS, **NEGATIVE_VERBS, **OTHER_SENTIMENT_WORDS,
}

# Multiplier applied to the next sentiment word (VADER's boosters, as factors).
INTENSIFIERS = {
    "slightly": 0.6, "somewhat": 0.75, "fairly": 0.85, "rather": 0.9, "quite": 1.1, "pretty": 1.05,
    "so": 1.2, "really": 1.25, "very": 1.3, "truly": 1.32, "incredibly": 1.45, "extremely": 1.5,
}
# A negator within `NEGATION_WINDOW` words before a sentiment word multiplies its valence by `NEGATION_FACTOR`
# (VADER's -0.74: "not good" is negative, but less so than "bad").
NEGATORS = frozenset({"not", "never", "hardly", "barely", "wasn't", "weren't", "isn't", "didn't", "don't"})
NEGATION_FACTOR = -0.74
NEGATION_WINDOW = 3

