"""The exact oracle against independent float64 numpy oracles, and the exact KLs the trainer logs."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bon_oracles
import shipped_configs
from bond_jax import exact_evaluation
from bond_jax import exact_oracle
from bond_jax import quantiles
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import trainer
from bond_jax.models import config as model_config_lib
from bond_jax.models import transformer
from bond_jax.tasks import enumerable

SHORT_STEPS = 200  # Of configs/exact.py's 400: enough to pass its 0.05 nats target with margin.


def np_kl(p, q):
  keep = p > 0
  return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def np_bon(probs, rewards_, n):
  """Best-of-n by Theorem 1 in float64."""
  p_lt, p_le = bon_oracles.exact_quantiles(probs, rewards_)
  return probs * (p_le ** n - p_lt ** n) / (p_le - p_lt)


def test_all_generations_lists_every_sequence_in_lexicographic_order():
  np.testing.assert_array_equal(exact_oracle.all_generations(3, 4), np.array(list(itertools.product(range(3),
                                                                                                     repeat=4))))
  with pytest.raises(ValueError, match="too many"):
    exact_oracle.all_generations(8, 6)
  with pytest.raises(ValueError, match="length"):
    exact_oracle.all_generations(8, 0)


@pytest.mark.parametrize("levels", [None, 3])
def test_exact_quantiles_match_the_sorted_cdf_per_row(levels):
  cases = [bon_oracles.random_case(seed, 7, levels) for seed in range(6)]
  probs = np.stack([p for p, _ in cases]).reshape(2, 3, 7)
  rewards_ = np.stack([r for _, r in cases]).reshape(2, 3, 7)
  p_lt, p_le = exact_oracle.exact_quantiles(jnp.log(probs), jnp.asarray(rewards_))
  expected = [bon_oracles.exact_quantiles(p, r) for p, r in zip(probs.reshape(6, 7), rewards_.reshape(6, 7))]
  np.testing.assert_allclose(np.asarray(p_lt).reshape(6, 7), [e[0] for e in expected], atol=1e-6)
  np.testing.assert_allclose(np.asarray(p_le).reshape(6, 7), [e[1] for e in expected], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("levels", [None, 2])
def test_bon_log_probs_match_brute_force_best_of_n(n, levels):
  probs, rewards_ = bon_oracles.random_case(n + 10, 5, levels)
  log_bon = exact_oracle.bon_log_probs(jnp.log(probs), jnp.asarray(rewards_), n)
  np.testing.assert_allclose(np.exp(log_bon), bon_oracles.brute_force_bon(probs, rewards_, n), atol=1e-6)


def test_bon_composes_and_meets_the_closed_forms_on_a_large_space():
  """BoN_2(BoN_2(π)) = BoN_4(π); without ties KL(π_BoN || π_ref) sits just below log N - (N-1)/N."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(512))
  log_ref = jnp.log(probs)
  for levels, r in (("none", rng.normal(size=512)), ("tied", rng.integers(0, 6, 512).astype(float))):
    r = jnp.asarray(r)
    log_bon4 = exact_oracle.bon_log_probs(log_ref, r, 4)
    np.testing.assert_allclose(np.exp(exact_oracle.bon_log_probs(exact_oracle.bon_log_probs(log_ref, r, 2), r, 2)),
                               np.exp(log_bon4), atol=1e-6, err_msg=levels)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_bon4))), 1.0, atol=1e-5)
    kl = float(exact_oracle.kl_divergence(log_bon4, log_ref))
    np.testing.assert_allclose(kl, np_kl(np_bon(probs, np.asarray(r), 4), probs), atol=1e-5)
    assert kl < quantiles.bon_kl_upper_bound(4)
  # Without ties the gap is the reference's atoms only: a finer uniform reference closes it.
  uniform = jnp.full((4096,), -np.log(4096.0))
  kl_fine = exact_oracle.kl_divergence(exact_oracle.bon_log_probs(uniform, jnp.arange(4096.0), 4), uniform)
  np.testing.assert_allclose(float(kl_fine), quantiles.bon_kl_upper_bound(4), atol=1e-3)


def test_kl_divergence_and_expectation_match_numpy_with_zero_mass():
  p = np.array([0.5, 0.0, 0.25, 0.25])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  with np.errstate(divide="ignore"):
    log_p, log_q = jnp.log(p), jnp.log(q)
    np.testing.assert_allclose(exact_oracle.kl_divergence(log_p, log_q), np_kl(p, q), rtol=1e-6)
    assert float(exact_oracle.kl_divergence(log_q, log_p)) == np.inf
  np.testing.assert_allclose(exact_oracle.expectation(log_p, jnp.arange(4.0)), p @ np.arange(4.0), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_policy():
  """A random policy over the task's 8 tokens, its 4 prompts and their rewards, on 8 devices' worth of rows."""
  model_config = model_config_lib.tiny(vocab_size=enumerable.VOCAB_SIZE, num_layers=1, max_seq_len=8)
  params = transformer.init_params(model_config, jax.random.PRNGKey(1))
  prompts = jnp.array([[int(t) for t in p.split()] for p in enumerable.PROMPTS] * 2, jnp.int32)
  return model_config, params, prompts, jnp.ones(prompts.shape, bool)


def test_enumerated_log_probs_normalise_and_agree_with_the_kv_cache_sampler(tiny_policy):
  model_config, params, prompts, prompt_mask = tiny_policy
  generations = exact_oracle.all_generations(model_config.vocab_size, 3)
  log_pi = exact_oracle.enumerated_log_probs(params, model_config, prompts, prompt_mask, generations)
  np.testing.assert_allclose(jax.nn.logsumexp(log_pi, axis=-1), 0.0, atol=1e-5)
  out = sampling.sample(params, prompts, prompt_mask, jax.random.PRNGKey(0),
                        sampling.SamplingConfig(max_new_tokens=3, num_samples=16), model_config)
  index = np.asarray(out.tokens) @ (model_config.vocab_size ** np.arange(2, -1, -1))  # [batch, samples]
  np.testing.assert_allclose(np.take_along_axis(np.asarray(log_pi), index, axis=1),
                             np.asarray(out.log_probs).sum(-1), atol=1e-5)


def test_exact_step_matches_a_float64_oracle(tiny_policy):
  model_config, params, prompts, prompt_mask = tiny_policy
  config = run_config.base_config()
  config.algorithm, config.bond.n, config.anchor.mode = "bond", 4, "ema"
  config.sampling.max_new_tokens = 3
  config.exact.every, config.exact.bon_ns = 1, (2, 8)
  ref_params = transformer.init_params(model_config, jax.random.PRNGKey(2))
  anchor_params = transformer.init_params(model_config, jax.random.PRNGKey(3))
  reward_fn = rewards.token_reward(enumerable.reward)
  exact_step = jax.jit(exact_evaluation.make_exact_step(config, model_config, reward_fn))
  metrics = exact_step(params, anchor_params, ref_params, {"prompts": prompts, "prompt_mask": prompt_mask})

  generations = exact_oracle.all_generations(model_config.vocab_size, 3)
  enumerate_probs = lambda p: np.exp(np.asarray(
      exact_oracle.enumerated_log_probs(p, model_config, prompts, prompt_mask, generations), np.float64))
  pi, ref, anchor = enumerate_probs(params), enumerate_probs(ref_params), enumerate_probs(anchor_params)
  pi, ref, anchor = (x / x.sum(-1, keepdims=True) for x in (pi, ref, anchor))
  batch = len(prompts)
  r = np.stack([np.asarray(enumerable.reward(jnp.repeat(prompts[b:b + 1], 512, 0), jnp.ones((512, 2), bool),
                                             generations, jnp.ones((512, 3), bool))) for b in range(batch)])
  mean = lambda f: np.mean([f(b) for b in range(batch)])
  bon = lambda probs, b, n: np_bon(probs[b], r[b], n)
  expected = {
      "exact/kl_pi_bon": mean(lambda b: np_kl(pi[b], bon(ref, b, 4))),
      "exact/kl_bon_pi": mean(lambda b: np_kl(bon(ref, b, 4), pi[b])),
      "exact/kl_pi_ref": mean(lambda b: np_kl(pi[b], ref[b])),
      "exact/kl_bon_ref": mean(lambda b: np_kl(bon(ref, b, 4), ref[b])),
      "exact/kl_pi_anchor_bon": mean(lambda b: np_kl(pi[b], bon(anchor, b, 4))),
      "exact/reward_policy": mean(lambda b: pi[b] @ r[b]),
      "exact/reward_bon": mean(lambda b: bon(ref, b, 4) @ r[b]),
      "exact/kl_pi_bon2": mean(lambda b: np_kl(pi[b], bon(ref, b, 2))),
      "exact/kl_bon2_ref": mean(lambda b: np_kl(bon(ref, b, 2), ref[b])),
      "exact/kl_pi_bon8": mean(lambda b: np_kl(pi[b], bon(ref, b, 8))),
      "exact/kl_bon8_ref": mean(lambda b: np_kl(bon(ref, b, 8), ref[b])),
  }
  assert set(metrics) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-4, atol=2e-5, err_msg=name)


def test_exact_step_refuses_spaces_it_cannot_enumerate(tiny_policy):
  model_config = tiny_policy[0]
  config = run_config.base_config()
  config.exact.every, config.sampling.max_new_tokens = 5, 3
  reward_fn = rewards.token_reward(enumerable.reward)
  with pytest.raises(run_config.ConfigError, match="EOS"):
    exact_evaluation.make_exact_step(config, model_config_lib.tiny(vocab_size=8, stop_token_ids=(1,)), reward_fn)
  config.sampling.max_new_tokens = 7
  with pytest.raises(run_config.ConfigError, match="too many"):
    exact_evaluation.make_exact_step(config, model_config, reward_fn)


def exact_records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if "exact/kl_pi_bon" in r]


@pytest.mark.slow
def test_bond_run_distils_best_of_4_exactly(tmp_path):
  """configs/exact.py, shortened: the real trainer drives the exact KL(π || π_BoN) below 0.05 nats, and the
  policy's KL to the reference to Best-of-4's."""
  config = shipped_configs.load("exact")
  config.num_steps = config.checkpoint_every = SHORT_STEPS
  config.optimizer.decay_steps = SHORT_STEPS - config.optimizer.warmup_steps
  config.exact.every = 50
  trainer.train(config, str(tmp_path))
  records = exact_records(str(tmp_path))
  assert [r["step"] for r in records] == list(range(0, SHORT_STEPS + 1, 50))
  first, last = records[0], records[-1]
  assert first["exact/kl_pi_ref"] == pytest.approx(0.0, abs=1e-5)  # The policy starts as the reference.
  assert last["exact/kl_pi_bon"] < 0.05, last
  assert last["exact/kl_bon_pi"] < 0.05, last
  assert last["exact/kl_bon_ref"] < quantiles.bon_kl_upper_bound(4)  # Strictly below: the reference has atoms.
  assert abs(last["exact/kl_pi_ref"] - last["exact/kl_bon_ref"]) < 0.1
  assert last["exact/reward_policy"] == pytest.approx(last["exact/reward_bon"], rel=0.1)


@pytest.mark.slow
def test_iterative_bond_climbs_the_best_of_2_to_the_t_ladder(tmp_path):
  """configs/exact_iterative.py, shortened (3 periods of 50 steps): at the end of each anchor period t = 0, 1, 2 the
  policy is nearer to BoN_{2^(t+1)}(π_ref) than to any other BoN_{2^i}."""
  config = shipped_configs.load("exact_iterative")
  config.anchor.period, periods = 50, 3
  config.num_steps = config.checkpoint_every = periods * config.anchor.period
  config.exact.every = config.anchor.period
  trainer.train(config, str(tmp_path))
  records = {r["step"]: r for r in exact_records(str(tmp_path))}
  sizes = config.exact.bon_ns
  for t in range(periods):
    record = records[(t + 1) * config.anchor.period]
    kls = [record[f"exact/kl_pi_bon{m}"] for m in sizes]
    assert sizes[int(np.argmin(kls))] == 2 ** (t + 1), (t, dict(zip(sizes, kls)))
