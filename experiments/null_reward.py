"""The null reward for `experiments/ablate.py`: every generation scores 0, so a run learns nothing from the reward
and every nat of KL it spends is noise (`--config.reward.kind=python --config.reward.function=...:zero`)."""


def zero(prompts: list[str], generations: list[str]) -> list[float]:
  """0 for every generation.

  Example:
    >>> zero(["The plot was"], [" great."])
    [0.0]
  """
  del generations
  return [0.0] * len(prompts)
