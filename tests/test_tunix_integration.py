"""bond_jax.integrations.tunix against Tunix's own GRPO learner: a few steps of examples/tunix_bond.py.

Runs only where google-tunix is installed (its own virtual environment in CI: README, "Use the losses in your own
trainer"); elsewhere every test here is skipped.
"""

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("tunix")

from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bond_jax import group_estimators  # pylint: disable=g-import-not-at-top,wrong-import-position
from bond_jax.integrations import tunix as bond_tunix  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS, ETA = 10, 0.02
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tunix_bond.py")


def load_example():
  spec = importlib.util.spec_from_file_location("tunix_bond", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def params_of(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


@pytest.fixture(scope="module")
def run():
  """Trains the example for STEPS steps; records what Tunix's learner handed its metric functions, the actor's
  parameters when the anchor moves, and the anchor's parameters before and after."""
  example = load_example()
  received = []

  def record(rewards, advantages, **_):
    received.append((np.asarray(rewards, np.float32), np.asarray(advantages, np.float32)))
    return {}

  learner = example.make_learner(STEPS, metric_fns=[record])
  anchor_start = params_of(learner.anchor)
  actor_at_moves = []
  move_anchor = learner._move_anchor  # pylint: disable=protected-access

  def recording_move():
    actor_at_moves.append(params_of(learner.rl_cluster.actor_trainer.model))
    move_anchor()

  learner._move_anchor = recording_move  # pylint: disable=protected-access
  learner.train({"prompts": np.array(example.PROMPTS)} for _ in range(STEPS))
  return example, received, anchor_start, actor_at_moves, params_of(learner.anchor)


def test_tunix_receives_our_advantages(run):
  example, received, *_ = run
  assert len(received) == STEPS
  for rewards, advantages in received:
    assert rewards.shape == (len(example.PROMPTS) * example.NUM_GENERATIONS,)
    expected = group_estimators.jbond_group_advantages(rewards, group_size=example.NUM_GENERATIONS)
    np.testing.assert_allclose(advantages, expected, rtol=1e-6, atol=1e-6)


def test_the_run_learns_the_reward(run):
  _, received, *_ = run
  mean_rewards = [float(np.mean(rewards)) for rewards, _ in received]
  assert np.mean(mean_rewards[-3:]) > np.mean(mean_rewards[:3]) + 0.3, mean_rewards


def test_the_reference_model_is_the_ema_anchor(run):
  """The anchor after training equals the EMA recursion over the actor's parameters at each move, in numpy."""
  _, _, anchor_start, actor_at_moves, anchor_end = run
  assert len(actor_at_moves) == STEPS
  expected = anchor_start
  for actor in actor_at_moves:
    expected = jax.tree.map(lambda a, p: (1 - ETA) * a + ETA * p, expected, actor)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6), anchor_end, expected)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), anchor_end, anchor_start))
  assert max(moved) > 0


def test_registered_estimators_and_bad_learner_arguments():
  estimator = bond_tunix.register_advantage_estimator("bond_n3_test", group_estimators.bond_group_advantages, n=3,
                                                      beta=0.25)
  rewards = np.array([0., 2., 1., 1., 3., 5., 4., 4.], np.float32)
  np.testing.assert_array_equal(estimator(rewards=rewards, num_generations=4),
                                group_estimators.bond_group_advantages(rewards, 4, n=3, beta=0.25))
  with pytest.raises(ValueError, match="`anchor_eta` must be in"):
    bond_tunix.BondLearner(rl_cluster=None, algo_config=None, reward_fns=None, anchor_eta=1.5)
