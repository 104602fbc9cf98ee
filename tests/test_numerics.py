"""Numerical faults: every loss stays finite, and equals its closed form, when every sample loses (`p_le = 0`), when
all rewards tie and when every sample wins, in float32 and bfloat16; a bfloat16 policy trains through them; a
diverging run skips its non-finite steps, counts them and stops with the last good state checkpointed."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import algorithms
from bond_jax import losses
from bond_jax import quantiles
from bond_jax import rewards
from bond_jax import train_state
from bond_jax import train_step
from bond_jax import trainer
import tiny_run

BATCH, POLICY_SAMPLES, ANCHOR_SAMPLES, N, BETA, KL_COEF = 4, 2, 16, 8, 0.5, 0.1
FLOOR = losses.quantile_floor(ANCHOR_SAMPLES)
# Policy and anchor rewards of each scenario: the policy's samples are all below, equal to or above the anchor's.
SCENARIOS = {"every sample loses": (-1.0, 1.0), "all rewards tie": (0.0, 0.0), "every sample wins": (1.0, -1.0)}

LOSSES = ("jbond_paper", "jbond_tie_aware", "bond_log_quantile", "bond_tie_aware", "reinforce")


def closed_form_reward(name: str, scenario: str, n: int = N, num_anchor_samples: int = ANCHOR_SAMPLES) -> float:
  """The reward loss `name` gives every policy sample in `scenario` (spec sections 2, 3 and 5).

  J-BOND's paper reward is -log 16 only when strictly worse than both anchor samples; its tie-aware reward is
  log(mean of 2/1/0 for a win/tie/loss against each anchor sample), floored at log 1/4. BOND's log ratio is
  log N + (N-1) log p_le (log_quantile) or log((p_le^N - p_lt^N) / (p_le - p_lt)), which tends to log N p^(N-1)
  as p_lt -> p_le (tie_aware), with p_le floored at 1/(2k). REINFORCE's is the raw reward.
  """
  lose, tie = scenario == "every sample loses", scenario == "all rewards tie"
  log_floor = math.log(losses.quantile_floor(num_anchor_samples))
  if name == "jbond_paper":
    return -math.log(16) if lose else 0.0
  if name == "jbond_tie_aware":
    return math.log(1 / 4) if lose else 0.0 if tie else math.log(2)
  if name == "bond_log_quantile":
    return math.log(n) + (n - 1) * (log_floor if lose else 0.0)
  if name == "bond_tie_aware":
    return (n - 1) * log_floor if lose else 0.0 if tie else math.log(n)
  return SCENARIOS[scenario][0]


def loss_of(name, log_pi, log_anchor, log_pi_best, policy_rewards, anchor_rewards):
  """The loss `name` as the train step computes it, from `[batch, samples]` inputs."""
  if name.startswith("jbond"):
    return losses.jbond_loss(log_pi[:, :1], log_anchor[:, :1], policy_rewards[:, :1], anchor_rewards[:, :2],
                             log_pi_best, beta=BETA, reward_form=name.removeprefix("jbond_").replace(
                                 "paper", "penalty"))[0]
  if name.startswith("bond"):
    p_lt, p_le = quantiles.reward_quantiles(policy_rewards, anchor_rewards)
    backward = losses.backward_kl_loss(log_pi, log_anchor, p_lt, p_le, N, floor=FLOOR,
                                       reward_form=name.removeprefix("bond_"))
    return losses.jeffreys_loss(losses.forward_kl_loss(log_pi_best), backward, beta=BETA)[0]
  return losses.reinforce_loss(log_pi, log_anchor, policy_rewards, kl_coef=KL_COEF)[0]


def closed_form_loss(name, scenario, log_pi, log_anchor, log_pi_best):
  """Each loss's value is its mean cost: the forward NLL and the k1 KL minus the reward (spec sections 3, 5)."""
  reward = closed_form_reward(name, scenario)
  if name == "reinforce":
    return KL_COEF * np.mean(log_pi - log_anchor) - reward
  samples = 1 if name.startswith("jbond") else POLICY_SAMPLES
  backward = np.mean(log_pi[:, :samples] - log_anchor[:, :samples]) - reward
  return (1 - BETA) * -np.mean(log_pi_best) + BETA * backward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("name", LOSSES)
def test_losses_are_finite_and_equal_their_closed_forms(name, scenario, dtype):
  rng = np.random.default_rng(0)
  log_pi, log_anchor = (-rng.uniform(1, 30, (BATCH, POLICY_SAMPLES)) for _ in range(2))
  log_pi_best = -rng.uniform(1, 30, (BATCH, 1))
  policy_reward, anchor_reward = SCENARIOS[scenario]
  policy_rewards = jnp.full((BATCH, POLICY_SAMPLES), policy_reward)
  anchor_rewards = jnp.full((BATCH, ANCHOR_SAMPLES), anchor_reward)
  # Low-precision log-probs, as a bfloat16 trainer might pass them; the closed form sees the same rounded values.
  log_pi, log_anchor, log_pi_best = (np.asarray(jnp.asarray(x, dtype), np.float64)
                                     for x in (log_pi, log_anchor, log_pi_best))

  def loss(log_pi, log_pi_best):
    return loss_of(name, log_pi, jnp.asarray(log_anchor, dtype), log_pi_best, policy_rewards, anchor_rewards)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(log_pi, dtype), jnp.asarray(log_pi_best, dtype))
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  expected = closed_form_loss(name, scenario, log_pi, log_anchor, log_pi_best)
  # bfloat16 arithmetic on log-probs of size ~30 rounds to about 30 * 2^-8 per operation.
  tolerance = {"rtol": 2e-2, "atol": 0.25} if dtype == jnp.bfloat16 else {"rtol": 1e-5, "atol": 1e-4}
  np.testing.assert_allclose(float(value), expected, **tolerance)


def policy_and_anchor_reward(policy_value, anchor_value, num_policy_samples: int) -> rewards.RewardFn:
  """A reward telling the policy's samples from the anchor's by their number per prompt (the step scores them
  apart): `policy_value` for the policy's, `anchor_value` for the anchor's. The values are the pytree's leaves,
  so a step taking the reward as an argument compiles once for all values."""

  def reward(policy_value, anchor_value, prompts, prompt_mask, tokens, mask):
    del prompts, prompt_mask, mask
    value = policy_value if tokens.shape[1] == num_policy_samples else anchor_value
    return jnp.full(tokens.shape[:2], value, jnp.float32)

  return jax.tree_util.Partial(reward, jnp.float32(policy_value), jnp.float32(anchor_value))


@pytest.fixture(scope="module")
def bfloat16_components(tiny_policy_dir, prompt_data_dir, tmp_path_factory):
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, **{"policy.dtype": "bfloat16"})
  ref_params, model_config, _, batch = tiny_run.load_components(config, str(tmp_path_factory.mktemp("unused")))
  assert model_config.compute_dtype == jnp.bfloat16
  return ref_params, model_config, batch


@pytest.mark.parametrize("algorithm,reward_form,reward_metric", [
    ("jbond", "penalty", "loss/reward"), ("bond", "tie_aware", "loss/backward/bond_reward")])
def test_a_bfloat16_policy_trains_through_losing_and_tied_batches(
    algorithm, reward_form, reward_metric, tiny_policy_dir, bfloat16_components, fault_tally):
  config = tiny_run.tiny_config(tiny_policy_dir, algorithm=algorithm, **{
      "policy.dtype": "bfloat16", f"{algorithm}.reward_form": reward_form})
  ref_params, model_config, batch = bfloat16_components
  optimizer = train_state.make_optimizer(config.optimizer)
  initial = train_state.create_train_state(ref_params, optimizer, seed=0)
  step = jax.jit(lambda reward, state: train_step.make_train_step(config, model_config, reward, optimizer)(
      state, ref_params, batch))
  num_policy = algorithms.from_config(config).sample_counts().policy
  for scenario in ("every sample loses", "all rewards tie"):
    kind = f"numerics: bfloat16 step, {scenario}"
    fault_tally.record(kind, injected=1, survived=0)
    state, metrics = jax.device_get(step(policy_and_anchor_reward(*SCENARIOS[scenario], num_policy), initial))
    assert metrics["nonfinite"] == 0 and metrics["reward/nonfinite_prompts"] == 0
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
    assert not np.array_equal(state.params["embedder"]["embedding"], initial.params["embedder"]["embedding"])
    assert metrics["quantile/policy_vs_anchor"] == (0.0 if scenario == "every sample loses" else 1.0)
    name = f"{algorithm}_{'paper' if reward_form == 'penalty' else reward_form}"
    expected = closed_form_reward(name, scenario, config.bond.n, config.bond.num_anchor_samples)
    np.testing.assert_allclose(metrics[reward_metric], expected, rtol=1e-6)
    fault_tally.record(kind, injected=0, survived=1)


def test_a_diverging_run_skips_non_finite_steps_and_stops_with_the_last_good_state(
    tiny_policy_dir, prompt_data_dir, tmp_path, fault_tally):
  fault_tally.record("numerics: non-finite loss (diverging run)", injected=1, survived=0)
  # AdamW moves every weight by about the learning rate: 1e30 after step 1, and the forward of step 2 overflows.
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, num_steps=10, max_consecutive_nonfinite=3,
                                keep_checkpoints=10, **{"optimizer.learning_rate": 1e30, "optimizer.grad_clip": 0.0})
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.NonFiniteLossError, match=r"^3 consecutive steps had a non-finite loss or gradient "
                                                       r"\(last at step 4\)"):
    trainer.train(config, workdir)

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert [records[step]["nonfinite"] for step in (1, 2, 3, 4)] == [0, 1, 1, 1]
  checkpoints = tiny_run.restore_every_checkpoint(workdir, config)
  last_step = max(checkpoints)
  assert last_step >= 4
  # Skipped steps leave the state as it was: every checkpoint after step 1 holds step 1's parameters, finite.
  after_step_1 = checkpoints[1][0]
  for step in range(2, last_step + 1):
    state = checkpoints[step][0]
    assert int(state.step) == step
    jax.tree.map(np.testing.assert_array_equal, state.params, after_step_1.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, after_step_1.opt_state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after_step_1.params))
  fault_tally.record("numerics: non-finite loss (diverging run)", injected=0, survived=1)
