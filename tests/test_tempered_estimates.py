"""Every estimate refers to the distributions actually sampled: at temperature T, the KL estimates of the train
step (every algorithm), of evaluation and of the exact evaluation converge to the closed-form KL between the
tempered distributions, computed in numpy over the 8 outcomes of one generated token.

The setting of public bug reports (TRL #3029, #4159): a reference sharper than the policy (its output layer 4x the
policy's), so at T = 0.25 a policy scored at temperature 1 would report a negative KL.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import algorithms
from bond_jax import evaluation
from bond_jax import exact_evaluation
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import train_state
from bond_jax import train_step
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

MODEL = ModelConfig(vocab_size=8, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
                    max_seq_len=16)
BATCH = 512
PROMPTS = jnp.tile(jnp.array([[3, 1, 4, 1]], jnp.int32), (BATCH, 1))
BATCH_INPUTS = {"prompts": PROMPTS, "prompt_mask": jnp.ones(PROMPTS.shape, bool)}
ZERO_REWARD = rewards.token_reward(lambda p, pm, g, gm: jnp.zeros(g.shape[0]))


def _scaled_head(params, scale):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * scale if "lm_head" in jax.tree_util.keystr(path) else x, params)


@pytest.fixture(scope="module")
def models():
  base = transformer.init_params(MODEL, jax.random.PRNGKey(0))
  return _scaled_head(base, 3.0), _scaled_head(base, 12.0)  # policy, and a reference 4x sharper


def _log_softmax(z):
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def closed_form(models, temperature):
  """(KL(π_T || ref_T), the standard deviation of its one-sample k1 estimate), from the next-token logits."""
  logits = [np.asarray(transformer.forward(p, MODEL, PROMPTS[:1], transformer.positions_from_mask(
      BATCH_INPUTS["prompt_mask"][:1]), BATCH_INPUTS["prompt_mask"][:1])[0][0, -1], np.float64) for p in models]
  log_p, log_r = (_log_softmax(z / temperature) for z in logits)
  p = np.exp(log_p)
  kl = float(np.sum(p * (log_p - log_r)))
  return kl, float(np.sqrt(np.sum(p * (log_p - log_r) ** 2) - kl ** 2))


def _config(algorithm, temperature):
  config = run_config.base_config()
  config.algorithm = algorithm
  config.sampling.max_new_tokens = 1
  config.sampling.temperature = temperature
  config.log_every = 1  # J-BOND and BOND compute the reference's log-probs on logged steps.
  config.eval.num_ref_samples, config.eval.bon_ns = 4, (2,)
  config.bond.n, config.bond.num_anchor_samples, config.bond.num_policy_samples = 2, 2, 8
  config.reinforce.num_samples = 8
  run_config.validate(config)
  return config


def _assert_estimates(estimate, kl, std, samples):
  assert abs(estimate - kl) < 5 * std / np.sqrt(samples), (estimate, kl, std / np.sqrt(samples))


@pytest.mark.parametrize("temperature", [0.25, 2.0])
def test_evaluation_kl_is_that_of_the_tempered_distributions(models, temperature):
  kl, std = closed_form(models, temperature)
  assert temperature != 0.25 or kl > 0.1  # At T = 0.25, scoring at T = 1 would give a negative number here.
  metrics = jax.jit(evaluation.make_eval_step(_config("jbond", temperature), MODEL, ZERO_REWARD))(
      *models, BATCH_INPUTS, jax.random.PRNGKey(1)).metrics
  # Evaluation sums the exact KLs of the next-token distributions: exact for a one-token generation.
  np.testing.assert_allclose(np.asarray(metrics["kl/policy_ref"]), kl, rtol=1e-4)
  del std


@pytest.mark.parametrize("algorithm,kl_metric", [
    ("reinforce", "loss/kl_ref"), ("reinforce", "kl/policy_ref"), ("jbond", "kl/policy_anchor"),
    ("jbond", "kl/policy_ref"), ("bond", "kl/policy_anchor")])
def test_train_step_kls_are_those_of_the_tempered_distributions(models, algorithm, kl_metric):
  """The policy is π, the anchor and the reference are ref: every KL the step reports is KL(π_T || ref_T)."""
  temperature = 0.25
  kl, std = closed_form(models, temperature)
  config = _config(algorithm, temperature)
  policy, ref = models
  optimizer = train_state.make_optimizer(config.optimizer)
  state = train_state.create_train_state(ref, optimizer, seed=0).replace(params=policy)
  _, metrics = jax.jit(train_step.make_train_step(config, MODEL, ZERO_REWARD, optimizer))(state, ref, BATCH_INPUTS)
  policy_samples = algorithms.from_config(config).sample_counts().policy
  _assert_estimates(float(metrics[kl_metric]), kl, std, BATCH * policy_samples)


def test_exact_evaluation_enumerates_the_tempered_distributions(models):
  temperature = 0.25
  config = _config("bond", temperature)
  config.exact.every = 1
  metrics = jax.jit(exact_evaluation.make_exact_step(config, MODEL, ZERO_REWARD))(
      models[0], models[1], models[1], {key: value[:1] for key, value in BATCH_INPUTS.items()})
  np.testing.assert_allclose(float(metrics["exact/kl_pi_ref"]), closed_form(models, temperature)[0], rtol=1e-4)
