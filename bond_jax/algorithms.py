"""The training methods as objects: what each samples per prompt, what it distils, how its anchor moves, its loss.

An `Algorithm` is a frozen dataclass whose fields are its hyperparameters; its defaults are the run config's group
named after it (`config.jbond`, `config.bond`, `config.reinforce`), and `from_config` builds the one
`config.algorithm` names. The train step, evaluation, the exact evaluation, the memory estimate, config validation
and the plots ask it, never the algorithm's name:

- `sample_counts()`: policy and anchor samples drawn per prompt;
- `target_n()`: the N whose Best-of-N of the anchor the loss distils (None: no Best-of-N target);
- `num_best_of_n()`: how many Best-of-n anchor samples per prompt the forward term trains on;
- `anchor`: how the anchor moves (`anchor.AnchorSchedule`, from `config.anchor`), None without an anchor, and
  `anchor_moves`: whether it ever leaves the reference;
- `reference_in_loss`: whether `log π_ref` enters the loss (else it is a metric, computed on logged steps only);
- `loss(inputs)`: `(loss, metrics)` from the step's `LossInputs`.

Adding a method is one new subclass, registered with `register` (for example in the module of a config file,
before `config.algorithm` names it), and its tests. The mathematics of each is in docs/method.md.

Example:
  >>> from bond_jax import run_config
  >>> config = run_config.base_config()
  >>> algorithm = from_config(config)
  >>> algorithm.name, algorithm.sample_counts(), algorithm.target_n()
  ('jbond', SampleCounts(policy=1, anchor=2), 2)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import ml_collections

from bond_jax import anchor as anchor_lib
from bond_jax import losses

Metrics = dict[str, jax.Array]
# A field's test and what it allows, for messages: "config.<group>.<field> = <value> is not allowed: expected ...".
FieldRule = tuple[Callable[[Any], bool], str]


class SampleCounts(NamedTuple):
  """Samples drawn per prompt in one train step: from the policy, and from the anchor (0: none)."""

  policy: int
  anchor: int


class LossInputs(NamedTuple):
  """What a loss sees of one step; row b holds prompt b's samples, all log-probabilities under the sampling
  distribution (the temperature applied: docs/method.md, "Which distributions the estimates refer to").

  Attributes:
    policy_log_probs: `[batch, policy]` `log π_θ(y)` of the policy samples, differentiable.
    best_log_probs: `[batch, best]` `log π_θ(y')` of the Best-of-n anchor samples, differentiable (`best` is
      `num_best_of_n()`, 0 without an anchor).
    anchor_log_probs: `[batch, policy]` `log π_anchor(y)` of the policy samples.
    ref_log_probs: `[batch, policy]` `log π_ref(y)` of the policy samples; NaN on the steps that do not log
      metrics unless `reference_in_loss`.
    policy_rewards: `[batch, policy]` rewards of the policy samples.
    anchor_rewards: `[batch, anchor]` rewards of the anchor samples.
    p_lt: `[batch, policy]` share of the anchor samples whose reward is below the policy sample's.
    p_le: `[batch, policy]` share at or below it.
  """

  policy_log_probs: jax.Array
  best_log_probs: jax.Array
  anchor_log_probs: jax.Array
  ref_log_probs: jax.Array
  policy_rewards: jax.Array
  anchor_rewards: jax.Array
  p_lt: jax.Array
  p_le: jax.Array


def _positive_int(v) -> bool:
  return isinstance(v, int) and v > 0


def _unit_interval(v) -> bool:
  return 0 <= v <= 1


def _non_negative(v) -> bool:
  return v >= 0


@dataclasses.dataclass(frozen=True)
class Algorithm(abc.ABC):
  """A training method; subclasses are frozen dataclasses whose fields are its hyperparameters.

  Attributes:
    anchor: how the anchor moves after each update (None for methods without an anchor); built from
      `config.anchor`, not from the method's own group.
  """

  name: ClassVar[str]
  # Whether `log π_ref` of the policy samples enters the loss; else it is only the metric `kl/policy_ref`.
  reference_in_loss: ClassVar[bool] = False
  # Whether the sampler may truncate (top-k, top-p). The three methods here score the same samples under the policy,
  # the anchor and the reference; truncating each to its own top tokens gives them different supports, and the
  # KL terms between them become infinite (docs/method.md).
  supports_truncated_sampling: ClassVar[bool] = False
  # Field name -> rule, for the fields of the method's config group.
  field_rules: ClassVar[dict[str, FieldRule]] = {}

  anchor: anchor_lib.AnchorSchedule | None = None

  @property
  def has_anchor(self) -> bool:
    """Whether the method samples an anchor (and so has an `anchor` schedule)."""
    return self.sample_counts().anchor > 0

  @property
  def anchor_moves(self) -> bool:
    """Whether the anchor ever leaves the reference it starts at."""
    return self.anchor is not None and self.anchor.moves

  @abc.abstractmethod
  def sample_counts(self) -> SampleCounts:
    """Policy and anchor samples drawn per prompt in one train step."""

  def target_n(self) -> int | None:
    """The N whose Best-of-N of the anchor the loss distils; None when the method has no Best-of-N target."""
    return None

  def num_best_of_n(self) -> int:
    """Best-of-n anchor samples per prompt for the forward term: one per disjoint group of n anchor samples."""
    n = self.target_n()
    return 0 if n is None else self.sample_counts().anchor // n

  def problems(self) -> Iterator[tuple[str, str]]:
    """`(field, what is allowed)` for each combination of this method's fields that cannot work."""
    return iter(())

  @abc.abstractmethod
  def loss(self, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    """The scalar loss to minimise and its metrics (scalars), from one step's `LossInputs`."""


@dataclasses.dataclass(frozen=True)
class JBond(Algorithm):
  """J-BOND (Sessa et al. 2024, section 5; docs/method.md, "J-BOND"): per prompt policy samples and pairs of anchor
  samples (the paper: 1 and one pair); the Best-of-2 anchor samples' negative log-likelihood, the J-BOND
  policy-gradient term and `γ·KL(π || anchor)`.

  Attributes:
    beta: weight of the backward (policy-gradient) term against the forward (Best-of-2 NLL) one, in [0, 1].
    gamma: weight of `KL(π || π_anchor)`, >= 0.
    reward_form: "penalty" (the paper's: `-penalty` when worse than both samples of an anchor pair, else 0,
      averaged over the pairs) | "tie_aware" (the estimated exact Best-of-2 log ratio from all the anchor samples;
      use it when rewards tie).
    penalty: the reward when losing to both anchor samples is `-penalty` (`log 16` makes the expected reward at the
      median `log 0.5`).
    ties_lose: a tie with both anchor samples counts as losing (the paper's appendix) rather than not (its text).
    num_policy_samples: policy samples per prompt (the paper: 1).
    num_anchor_samples: anchor samples per prompt, an even number (the paper: 2); each pair gives one Best-of-2
      sample for the forward term.
    baseline: of the policy-gradient terms, "batch" (the other prompts' samples: the paper's), "samples" (the other
      samples of the same prompt; needs 2 or more policy samples) or "none" (`losses.leave_one_out_baseline`).
  """

  name: ClassVar[str] = "jbond"
  field_rules: ClassVar[dict[str, FieldRule]] = {
      "beta": (_unit_interval, "a number in [0, 1]"),
      "gamma": (_non_negative, "a non-negative number"),
      "reward_form": (lambda v: v in losses.JBOND_REWARD_FORMS, f"one of {losses.JBOND_REWARD_FORMS}"),
      "penalty": (_non_negative, "a non-negative number"),
      "num_policy_samples": (_positive_int, "a positive integer"),
      "num_anchor_samples": (lambda v: _positive_int(v) and v % 2 == 0, "a positive even integer (anchor pairs)"),
      "baseline": (lambda v: v in losses.BASELINES, f"one of {losses.BASELINES}"),
  }

  beta: float = 0.5
  gamma: float = 0.0
  reward_form: str = "penalty"
  penalty: float = math.log(16)
  ties_lose: bool = False
  num_policy_samples: int = 1
  num_anchor_samples: int = 2
  baseline: str = "batch"

  def sample_counts(self) -> SampleCounts:
    return SampleCounts(policy=self.num_policy_samples, anchor=self.num_anchor_samples)

  def target_n(self) -> int:
    return 2

  def problems(self) -> Iterator[tuple[str, str]]:
    if self.baseline == "samples" and self.num_policy_samples < 2:
      yield "baseline", ("'batch' or 'none' with one policy sample per prompt (the 'samples' baseline needs "
                         "jbond.num_policy_samples >= 2)")

  def reward(self, policy_rewards: jax.Array, anchor_rewards: jax.Array) -> jax.Array:
    """`[batch, policy]` J-BOND rewards of the policy samples against `[batch, anchor]` anchor rewards."""
    if self.reward_form == "tie_aware":
      return losses.jbond_tie_aware_reward(policy_rewards, anchor_rewards)
    pairs = [losses.jbond_reward(policy_rewards, anchor_rewards[:, i:i + 2], self.penalty, self.ties_lose)
             for i in range(0, anchor_rewards.shape[1], 2)]
    return sum(pairs[1:], pairs[0]) / len(pairs)

  def loss(self, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    return losses.jbond_loss(
        inputs.policy_log_probs, inputs.anchor_log_probs, bon_policy_log_probs=inputs.best_log_probs,
        beta=self.beta, gamma=self.gamma, reward=self.reward(inputs.policy_rewards, inputs.anchor_rewards),
        baseline=self.baseline)


@dataclasses.dataclass(frozen=True)
class Bond(Algorithm):
  """BOND with a fixed N (Sessa et al. 2024, section 3; docs/method.md, "The Jeffreys loss"): the Jeffreys mix
  of the Best-of-N samples' NLL (forward KL) and the score-function backward `KL(π || Best-of-N of the anchor)`,
  quantiles estimated from k anchor samples per prompt.

  Attributes:
    n: the N of Best-of-N (>= 1).
    num_anchor_samples: k anchor samples per prompt (>= n); each of the k // n disjoint groups of n gives one
      Best-of-n sample for the forward term.
    num_policy_samples: policy samples per prompt (>= 2, for the leave-one-out baseline).
    beta: weight of the backward term, in [0, 1].
    reward_form: "log_quantile" (the paper's `log n + (n-1) log p_le`) | "tie_aware" (the exact Theorem 1 ratio).
  """

  name: ClassVar[str] = "bond"
  field_rules: ClassVar[dict[str, FieldRule]] = {
      "n": (_positive_int, "an integer >= 1"),
      "num_anchor_samples": (_positive_int, "a positive integer"),
      "num_policy_samples": (_positive_int, "a positive integer"),
      "beta": (_unit_interval, "a number in [0, 1]"),
      "reward_form": (lambda v: v in losses.REWARD_FORMS, f"one of {losses.REWARD_FORMS}"),
  }

  n: int = 8
  num_anchor_samples: int = 16
  num_policy_samples: int = 2
  beta: float = 0.5
  reward_form: str = "log_quantile"

  def sample_counts(self) -> SampleCounts:
    return SampleCounts(policy=self.num_policy_samples, anchor=self.num_anchor_samples)

  def target_n(self) -> int:
    return self.n

  def problems(self) -> Iterator[tuple[str, str]]:
    if self.num_anchor_samples < self.n:
      yield "num_anchor_samples", f"at least bond.n = {self.n} (the forward term needs n anchor samples)"
    if self.num_policy_samples < 2:
      yield "num_policy_samples", "at least 2 (the leave-one-out baseline needs two samples per prompt)"

  def loss(self, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    return losses.jeffreys_loss(
        losses.forward_kl_loss(inputs.best_log_probs),
        losses.backward_kl_loss(inputs.policy_log_probs, inputs.anchor_log_probs, inputs.p_lt, inputs.p_le, self.n,
                                floor=losses.quantile_floor(self.num_anchor_samples), reward_form=self.reward_form),
        beta=self.beta)


@dataclasses.dataclass(frozen=True)
class Reinforce(Algorithm):
  """REINFORCE on the raw reward with a KL penalty to the reference, the paper's baseline (docs/method.md,
  "REINFORCE"): no anchor, a leave-one-out baseline over each prompt's samples.

  Attributes:
    num_samples: policy samples per prompt (>= 2, for the leave-one-out baseline).
    kl_coef: the coefficient of `KL(π || π_ref)`, >= 0.
  """

  name: ClassVar[str] = "reinforce"
  reference_in_loss: ClassVar[bool] = True
  field_rules: ClassVar[dict[str, FieldRule]] = {
      "num_samples": (_positive_int, "a positive integer"),
      "kl_coef": (_non_negative, "a non-negative number"),
  }

  num_samples: int = 2
  kl_coef: float = 0.05

  def sample_counts(self) -> SampleCounts:
    return SampleCounts(policy=self.num_samples, anchor=0)

  def problems(self) -> Iterator[tuple[str, str]]:
    if self.num_samples < 2:
      yield "num_samples", "at least 2 (the leave-one-out baseline needs two samples per prompt)"

  def loss(self, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    return losses.reinforce_loss(inputs.policy_log_probs, inputs.ref_log_probs, inputs.policy_rewards,
                                 kl_coef=self.kl_coef)


_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
  """Makes `cls` selectable as `config.algorithm = cls.name`, its fields' defaults the group `config.<name>` of
  every config `run_config.base_config()` makes from then on. Usable as a class decorator; registering a name
  again replaces the earlier class (a config module imported twice).

  Example:
    >>> from bond_jax import run_config
    >>> @register
    ... @dataclasses.dataclass(frozen=True)
    ... class BestOfTwoFineTuning(JBond):   # J-BOND without its backward term: fine-tuning on Best-of-2 samples
    ...   name: ClassVar[str] = "bo2_sft"
    ...   beta: float = 0.0
    >>> config = run_config.base_config()
    >>> config.algorithm = "bo2_sft"
    >>> run_config.validate(config)
    >>> from_config(config).beta, from_config(config).target_n()
    (0.0, 2)
    >>> unregister("bo2_sft")
  """
  if not (isinstance(cls, type) and issubclass(cls, Algorithm) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"register needs a dataclass subclass of Algorithm, got {cls!r}.")
  _REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Forgets the algorithm registered as `name` (`KeyError` if none is)."""
  get(name)
  del _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> type[Algorithm]:
  """The registered class of `name`; `KeyError` naming the registered ones otherwise."""
  if name not in _REGISTRY:
    raise KeyError(f"no algorithm is registered as {name!r}; registered: {names()}.")
  return _REGISTRY[name]


def hyperparameter_names(cls: type[Algorithm]) -> tuple[str, ...]:
  """The fields of `cls` that its config group holds (every dataclass field but the anchor)."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.name != "anchor")


def config_defaults(cls: type[Algorithm]) -> ml_collections.ConfigDict:
  """The config group of `cls`: its hyperparameters with their defaults."""
  fields = {f.name: f.default for f in dataclasses.fields(cls)}
  return ml_collections.ConfigDict({name: fields[name] for name in hyperparameter_names(cls)})


def from_config(config: ml_collections.ConfigDict) -> Algorithm:
  """The algorithm `config.algorithm` names, with the hyperparameters of its group and `config.anchor`.

  Assumes a validated config (`run_config.validate`), which checks every field first.
  """
  cls = get(config.algorithm)
  group = config[cls.name]
  hyperparameters = {name: group[name] for name in hyperparameter_names(cls)}
  algorithm = cls(**hyperparameters)
  if algorithm.has_anchor:
    algorithm = dataclasses.replace(algorithm, anchor=anchor_lib.AnchorSchedule(**config.anchor))
  return algorithm


for _cls in (JBond, Bond, Reinforce):
  register(_cls)
