"""The algorithm objects: what each shipped method declares, and a new method registered from outside the package
running through validation, the train step, the memory estimate and the exact evaluation, untouched."""

import dataclasses
import math
import os
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import algorithms
from bond_jax import exact_evaluation
from bond_jax import losses
from bond_jax import memory_estimate
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state
from bond_jax import train_step
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,counts,target_n,best,reference_in_loss", [
    ("jbond", (1, 2), 2, 1, False),  # The paper's J-BOND: 1 policy and 2 anchor samples, Best-of-2 of the anchor.
    ("bond", (2, 16), 8, 2, False),  # bond.n = 8 from k = 16 anchor samples: two disjoint groups of 8.
    ("reinforce", (2, 0), None, 0, True),
])
def test_shipped_methods_declare_their_samples_target_and_anchor(name, counts, target_n, best, reference_in_loss):
  config = run_config.base_config()
  config.algorithm = name
  algorithm = algorithms.from_config(config)
  assert (tuple(algorithm.sample_counts()), algorithm.target_n(), algorithm.num_best_of_n()) == (
      counts, target_n, best)
  assert algorithm.reference_in_loss == reference_in_loss
  assert algorithm.anchor_moves == (name != "reinforce")  # config.anchor.mode is "ema" by default


def test_jbond_with_anchor_pairs_averages_the_paper_reward_over_the_pairs():
  config = run_config.base_config()
  config.jbond.num_policy_samples, config.jbond.num_anchor_samples, config.jbond.baseline = 2, 4, "samples"
  run_config.validate(config)
  algorithm = algorithms.from_config(config)
  assert (tuple(algorithm.sample_counts()), algorithm.num_best_of_n()) == ((2, 4), 2)  # Two Best-of-2 samples.
  # The first policy sample loses to both samples of the first pair only, the second to neither pair.
  reward = algorithm.reward(jnp.array([[1.0, 4.0]]), jnp.array([[2.0, 3.0, 0.0, 5.0]]))
  np.testing.assert_allclose(reward, [[-math.log(16) / 2, 0.0]], rtol=1e-6)
  config.jbond.num_policy_samples = 1
  with pytest.raises(run_config.ConfigError, match="jbond.baseline"):
    run_config.validate(config)


def test_no_module_compares_the_algorithm_name():
  """The methods' differences live in their objects: nothing else branches on `config.algorithm`."""
  pattern = re.compile(r"""config(\.algorithm|\[["']algorithm["']\])\s*(==|!=|(not )?in\s*[([{])""")
  offenders = []
  for folder in ("bond_jax", "experiments", "benchmarks", "tests"):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        path = os.path.join(root, name)
        if name.endswith(".py") and path != os.path.join(REPO, "bond_jax", "algorithms.py"):
          with open(path, encoding="utf-8") as f:
            offenders += [f"{path}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
  assert not offenders, offenders


@dataclasses.dataclass(frozen=True)
class BestOfNFineTuning(algorithms.Algorithm):
  """A method defined outside the package: fine-tuning on the Best-of-n of n anchor samples (no backward term)."""

  name: ClassVar[str] = "bon_sft"
  field_rules: ClassVar[dict] = {"n": (lambda v: isinstance(v, int) and v > 0, "a positive integer")}

  n: int = 4

  def sample_counts(self) -> algorithms.SampleCounts:
    return algorithms.SampleCounts(policy=1, anchor=self.n)

  def target_n(self) -> int:
    return self.n

  def loss(self, inputs: algorithms.LossInputs):
    return losses.forward_kl_loss(inputs.best_log_probs)


@pytest.fixture
def registered():
  algorithms.register(BestOfNFineTuning)
  yield
  algorithms.unregister(BestOfNFineTuning.name)


MODEL = ModelConfig(vocab_size=8, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
                    max_seq_len=8)
TOKEN_REWARD = rewards.token_reward(lambda p, pm, g, gm: jnp.sum(g * gm, axis=-1).astype(jnp.float32))


def test_a_registered_method_runs_everywhere_unchanged(registered):
  del registered
  config = run_config.base_config()
  config.algorithm = "bon_sft"
  config.bon_sft.n = 3
  config.sampling.max_new_tokens = 2
  config.batch_size = 4
  config.exact.every = 1
  config.anchor.eta = 0.5
  with pytest.raises(run_config.ConfigError, match=r"^config\.bon_sft\.n = 0 "):
    bad = run_config.base_config()
    bad.algorithm, bad.bon_sft.n = "bon_sft", 0
    run_config.validate(bad)
  run_config.validate(config)

  params = transformer.init_params(MODEL, jax.random.PRNGKey(0))
  optimizer = train_state.make_optimizer(config.optimizer)
  state = train_state.create_train_state(params, optimizer, seed=0)
  batch = {"prompts": jnp.array([[1, 2], [3, 4], [5, 6], [7, 1]]), "prompt_mask": jnp.ones((4, 2), bool)}
  step = train_step.make_train_step(config, MODEL, TOKEN_REWARD, optimizer)
  new_state, metrics = jax.jit(step)(state, params, batch)

  # The oracle: the same anchor samples (the step's own rng split), the best picked by numpy (first index on
  # ties), and its negative log-likelihood under the policy.
  samples = step.sample(state, batch, jax.random.split(state.rng)[1])
  anchor_rewards = np.asarray(step.score(batch, samples).anchor)
  best = np.argmax(anchor_rewards, axis=1)
  best_samples = jax.tree.map(lambda x: x[np.arange(4), best][:, None], samples.anchor)
  expected_nll = -np.mean(sampling.sample_log_probs(
      params, MODEL, batch["prompts"], batch["prompt_mask"], best_samples,
      sampling.make_sampling_config(config.sampling, MODEL, 1)))
  np.testing.assert_allclose(metrics["loss/total"], expected_nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward/anchor_best"], anchor_rewards.max(axis=1).mean(), rtol=1e-6)
  # The anchor moved by its EMA, and the new policy differs from the old.
  expected_anchor = jax.tree.map(lambda a, p: 0.5 * a + 0.5 * p, state.anchor_params, new_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new_state.anchor_params, expected_anchor)

  # Its anchor moves, so the update holds a new anchor beside the old.
  estimate = memory_estimate.estimate_train_memory(config, MODEL, params, optimizer, sharding.make_mesh((-1, 1, 1)))
  assert estimate.steps[memory_estimate.TRAIN_STEP].optimizer_update == (
      estimate.policy_params + estimate.optimizer_state + estimate.anchor_params)

  # Its target, Best-of-3 of the reference, has a KL to it of at most log 3 - 2/3.
  exact = jax.jit(exact_evaluation.make_exact_step(config, MODEL, TOKEN_REWARD))(
      new_state.params, new_state.anchor_params, params, batch)
  assert 0 < exact["exact/kl_bon_ref"] <= np.log(3) - 2 / 3 + 1e-6 and "exact/kl_pi_anchor_bon" in exact
