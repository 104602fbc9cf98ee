"""Losses, baselines, KL estimators and the EMA anchor against exact enumeration and hand cases.

Score-function gradients are checked *in expectation*: every joint outcome of the sampled
quantities is enumerated, the loss gradient is taken for each and weighted by its probability,
and the result must equal autodiff of the exactly enumerated objective.
"""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bond_jax
from bond_jax import anchor
from bond_jax import kl
from bond_jax import losses
from bon_oracles import all_tuples, brute_force_bon, exact_quantiles, random_case, softmax

SETTINGS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)


def expected_gradient(row_loss, theta, rows, weights):
  """`(Σ_rows w · loss(row), Σ_rows w · ∇loss(row))` over enumerated sample configurations."""
  values, grads = jax.vmap(jax.value_and_grad(row_loss), in_axes=(None, 0))(theta, rows)
  weights = jnp.asarray(weights, jnp.float32)
  return weights @ values, weights @ grads


def relative_error(got, expected):
  return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def log_softmax(theta):
  return jax.nn.log_softmax(theta)


def make_tabular(levels):
  """8 outcomes: π_ref, rewards, exact quantiles, exact BoN_3, and policy logits θ."""
  probs, rewards = random_case(seed=11, num=8, levels=levels)
  p_lt, p_le = exact_quantiles(probs, rewards)
  theta = np.random.default_rng(5).normal(size=8).astype(np.float32)
  return dict(
      n=3, probs=probs, rewards=rewards, p_lt=p_lt, p_le=p_le, theta=jnp.asarray(theta),
      log_ref=np.log(probs), log_bon=np.log(brute_force_bon(probs, rewards, 3)),
  )


@pytest.fixture(scope="module", params=[None, 2, 3], ids=["distinct_rewards", "binary", "three_level"])
def tabular(request):
  return make_tabular(request.param)


def backward_expectation(case, reward_form, baseline):
  """Expected backward loss and gradient over two samples y ~ π_θ, plus the exact KL gradient."""
  rows = all_tuples(8, 2)
  shape = (2, 1) if baseline == "batch" else (1, 2)
  f32 = lambda name: jnp.asarray(case[name], jnp.float32)

  def row_loss(theta, row):
    take = lambda table: table[row].reshape(shape)
    return losses.backward_kl_loss(
        take(log_softmax(theta)), take(f32("log_ref")), take(f32("p_lt")), take(f32("p_le")),
        case["n"], floor=0.0, reward_form=reward_form, baseline=baseline,
    )[0]

  def exact_kl(theta):
    log_pi = log_softmax(theta)
    return jnp.sum(jnp.exp(log_pi) * (log_pi - f32("log_bon")))

  pi = softmax(np.asarray(case["theta"], np.float64))
  value, grad = expected_gradient(row_loss, case["theta"], rows, np.prod(pi[rows], axis=1))
  return value, grad, jax.value_and_grad(exact_kl)(case["theta"])


@pytest.mark.parametrize("baseline", ["samples", "batch", "none"])
def test_backward_kl_tie_aware_gradient_is_exact(tabular, baseline):
  value, grad, (exact_value, exact_grad) = backward_expectation(tabular, "tie_aware", baseline)
  np.testing.assert_allclose(value, exact_value, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad, exact_grad, atol=2e-5)


def test_backward_kl_log_quantile_is_biased_under_ties():
  _, grad, (_, exact_grad) = backward_expectation(make_tabular(2), "log_quantile", "samples")
  assert relative_error(grad, exact_grad) > 0.1


def test_backward_kl_log_quantile_gradient_in_no_tie_limit():
  """Many outcomes of tiny mass: `log n + (n-1) log p_le` becomes the exact log ratio."""
  num, n = 4096, 4
  probs, rewards = random_case(seed=2, num=num)
  p_lt, p_le = (jnp.asarray(p, jnp.float32) for p in exact_quantiles(probs, rewards))
  log_ref = jnp.log(jnp.asarray(probs, jnp.float32))
  theta = jnp.asarray(np.random.default_rng(0).normal(size=num) * 0.5, jnp.float32)
  log_bon = bond_jax.bon_log_prob(log_ref, p_lt, p_le, n)

  def expected(reward_form):
    # One sample per prompt, baseline 0: E[∇ loss] is linear, so weight each outcome's term.
    def loss(theta):
      log_pi = log_softmax(theta)
      surrogate = jax.vmap(
          lambda lp, lr, lt, le: losses.backward_kl_loss(
              lp[None, None], lr[None, None], lt[None, None], le[None, None], n,
              floor=0.0, reward_form=reward_form, baseline="none",
          )[0]
      )(log_pi, log_ref, p_lt, p_le)
      return jnp.sum(jax.lax.stop_gradient(jnp.exp(log_pi)) * surrogate)

    return jax.grad(loss)(theta)

  def exact_kl(theta):
    log_pi = log_softmax(theta)
    return jnp.sum(jnp.exp(log_pi) * (log_pi - log_bon))

  exact = jax.grad(exact_kl)(theta)
  np.testing.assert_allclose(expected("tie_aware"), exact, atol=1e-4 * np.abs(exact).max())
  # The dropped tie term costs O(max π_ref / p_le); here 1.5% of the gradient norm.
  assert relative_error(expected("log_quantile"), exact) < 3e-2


def test_forward_kl_gradient_is_exact(tabular):
  bon = np.exp(tabular["log_bon"])
  rows = np.arange(8)[:, None]

  def row_loss(theta, row):
    # A masked padding entry with -inf log-prob must change nothing.
    log_pi = jnp.stack([log_softmax(theta)[row[0]], -jnp.inf])[None]
    return losses.forward_kl_loss(log_pi, jnp.array([[True, False]]))[0]

  def exact_kl(theta):
    return jnp.sum(bon * (tabular["log_bon"] - log_softmax(theta)))

  value, grad = expected_gradient(row_loss, tabular["theta"], rows, bon)
  exact_value, exact_grad = jax.value_and_grad(exact_kl)(tabular["theta"])
  entropy = -np.sum(bon * tabular["log_bon"])
  np.testing.assert_allclose(value, exact_value + entropy, rtol=1e-5)
  np.testing.assert_allclose(grad, exact_grad, atol=1e-5)


def test_reinforce_leave_one_out_gradient_is_exact(tabular):
  kl_coef, rows = 0.3, all_tuples(8, 2)
  log_ref, rewards = (jnp.asarray(tabular[k], jnp.float32) for k in ("log_ref", "rewards"))

  def row_loss(theta, row):
    log_pi = log_softmax(theta)
    return losses.reinforce_loss(
        log_pi[row][None], log_ref[row][None], rewards[row][None], kl_coef=kl_coef
    )[0]

  def objective(theta):
    log_pi = log_softmax(theta)
    pi = jnp.exp(log_pi)
    return -pi @ rewards + kl_coef * jnp.sum(pi * (log_pi - log_ref))

  pi = softmax(np.asarray(tabular["theta"], np.float64))
  value, grad = expected_gradient(row_loss, tabular["theta"], rows, np.prod(pi[rows], axis=1))
  exact_value, exact_grad = jax.value_and_grad(objective)(tabular["theta"])
  np.testing.assert_allclose(value, exact_value, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad, exact_grad, atol=2e-5)


def expected_jbond_reward(anchor_probs, rewards, reward_form, penalty, ties_lose):
  """`E_{y'_1, y'_2 ~ π_anchor}[reward(y)]` for every outcome y, by a loop over anchor pairs."""
  expected = np.zeros(len(rewards))
  for y, a1, a2 in all_tuples(len(rewards), 3):
    anchors = rewards[[a1, a2]]
    if reward_form == "tie_aware":  # log of the mean win (2) / tie (1) / loss (0) score, floored at 1/4.
      score = np.mean(2.0 * (anchors < rewards[y]) + (anchors == rewards[y]))
      value = math.log(max(score, 0.25))
    else:
      loses = np.all(anchors >= rewards[y]) if ties_lose else np.all(anchors > rewards[y])
      value = -penalty * loses
    expected[y] += anchor_probs[a1] * anchor_probs[a2] * value
  return expected


@pytest.mark.parametrize(
    "reward_form, ties_lose",
    [("penalty", False), ("penalty", True), ("tie_aware", False)],
    ids=["paper_strict", "paper_ties_lose", "tie_aware"],
)
def test_jbond_loss_gradient_is_exact(reward_form, ties_lose):
  """Two prompts, each with y ~ π_θ and two anchor samples: all 3**6 configurations."""
  beta, gamma, penalty, num = 0.5, 0.3, math.log(16), 3
  anchor_probs, rewards = random_case(seed=4, num=num, levels=2)
  theta = jnp.asarray(np.random.default_rng(1).normal(size=num), jnp.float32)
  log_anchor, rewards_f32 = jnp.log(jnp.asarray(anchor_probs, jnp.float32)), jnp.asarray(rewards)
  rows = all_tuples(num, 6).reshape(-1, 2, 3)

  def row_loss(theta, row):
    log_pi = log_softmax(theta)
    y, anchors = row[:, :1], row[:, 1:]
    best = jnp.take_along_axis(anchors, bond_jax.best_of_n(rewards_f32[anchors])[:, None], 1)
    return losses.jbond_loss(
        log_pi[y], log_anchor[y], rewards_f32[y], rewards_f32[anchors], log_pi[best],
        beta=beta, gamma=gamma, penalty=penalty, ties_lose=ties_lose, reward_form=reward_form,
    )[0]

  reward = expected_jbond_reward(anchor_probs, rewards, reward_form, penalty, ties_lose)
  bon2 = brute_force_bon(anchor_probs, rewards, 2)

  def objective(theta):
    log_pi = log_softmax(theta)
    pi = jnp.exp(log_pi)
    kl_anchor = jnp.sum(pi * (log_pi - log_anchor))
    backward = kl_anchor - pi @ jnp.asarray(reward, jnp.float32)
    return (1 - beta) * -(bon2 @ log_pi) + beta * backward + gamma * kl_anchor

  pi = softmax(np.asarray(theta, np.float64))
  slot_probs = np.stack([pi, anchor_probs, anchor_probs])  # [slot, outcome]
  weights = np.prod(slot_probs[np.arange(3), rows], axis=(1, 2))
  value, grad = expected_gradient(row_loss, theta, rows, weights)
  exact_value, exact_grad = jax.value_and_grad(objective)(theta)
  np.testing.assert_allclose(value, exact_value, rtol=1e-4)
  np.testing.assert_allclose(grad, exact_grad, atol=3e-5)


def test_jbond_reward_hand_cases():
  policy = jnp.array([[0.0], [1.0], [1.0], [2.0], [3.0]])
  anchors = jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 1.0], [1.0, 2.0], [1.0, 2.0]])
  strict = losses.jbond_reward(policy, anchors)
  np.testing.assert_allclose(strict[:, 0], [-math.log(16), 0, 0, 0, 0], rtol=1e-6)
  lenient = losses.jbond_reward(policy, anchors, penalty=2.0, ties_lose=True)
  np.testing.assert_allclose(lenient[:, 0], [-2, -2, -2, 0, 0])


def test_jbond_tie_aware_reward_hand_cases():
  policy = jnp.array([[1.0], [1.0], [1.0], [1.0], [1.0], [0.0]])
  anchors = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0], [1.0, 1.0]])
  got = losses.jbond_tie_aware_reward(policy, anchors)[:, 0]
  np.testing.assert_allclose(np.exp(got), [2.0, 1.5, 1.0, 1.0, 0.5, 0.25], rtol=1e-6)
  # A masked anchor never counts; a lower floor only moves the two-loss case.
  masked = losses.jbond_tie_aware_reward(policy, anchors, jnp.array([[True, False]] * 6), floor=0.1)
  np.testing.assert_allclose(np.exp(masked[:, 0]), [2.0, 2.0, 1.0, 2.0, 1.0, 0.1], rtol=1e-6)


def test_jbond_loss_hand_case():
  """Three prompts, one sample each: terms and per-sample gradients by hand."""
  beta, gamma, penalty = 0.25, 0.5, 3.0
  log_pi = jnp.array([[-1.0], [-2.0], [-0.5]])
  log_anchor = jnp.array([[-1.5], [-1.0], [-0.5]])
  policy_rewards = jnp.array([[0.0], [5.0], [1.0]])
  anchor_rewards = jnp.array([[1.0, 2.0], [0.0, 0.0], [1.0, 4.0]])  # lose, win, tie
  bon_log_pi = jnp.array([-0.7, -0.9, -1.1])

  def loss(log_pi, bon_log_pi):
    return losses.jbond_loss(
        log_pi, log_anchor, policy_rewards, anchor_rewards, bon_log_pi,
        beta=beta, gamma=gamma, penalty=penalty,
    )

  (value, metrics), (grad, bon_grad) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      log_pi, bon_log_pi
  )
  kl_anchor = np.array([0.5, -1.0, 0.0])
  reward = np.array([-penalty, 0.0, 0.0])
  cost = kl_anchor - reward
  loo = lambda c: (c.sum() - c) / 2
  np.testing.assert_allclose(metrics["forward"], 0.9, rtol=1e-6)
  np.testing.assert_allclose(metrics["backward"], cost.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], kl_anchor.mean(), atol=1e-7)
  np.testing.assert_allclose(metrics["reward"], reward.mean(), rtol=1e-6)
  np.testing.assert_allclose(
      value, (1 - beta) * 0.9 + beta * cost.mean() + gamma * kl_anchor.mean(), rtol=1e-6
  )
  expected = (beta * (cost - loo(cost)) + gamma * (kl_anchor - loo(kl_anchor))) / 3
  np.testing.assert_allclose(grad[:, 0], expected, rtol=1e-5)
  np.testing.assert_allclose(bon_grad, np.full(3, -(1 - beta) / 3), rtol=1e-6)


def test_jeffreys_mixes_the_two_terms():
  forward = (jnp.float32(2.0), {"nll": jnp.float32(2.0)})
  backward = (jnp.float32(-1.0), {"kl_bon": jnp.float32(-1.0)})
  loss, metrics = losses.jeffreys_loss(forward, backward, beta=0.25)
  np.testing.assert_allclose(loss, 0.75 * 2.0 + 0.25 * -1.0)
  assert metrics == {"forward/nll": 2.0, "backward/kl_bon": -1.0}


@functools.partial(jax.jit, static_argnames="baseline")
def score_function_value_and_grad(log_probs, costs, mask, baseline):
  return jax.value_and_grad(losses.score_function_loss)(log_probs, costs, mask, baseline=baseline)


@SETTINGS
@hypothesis.given(
    data=st.data(),
    over=st.sampled_from(["samples", "batch", "none"]),
)
def test_score_function_loss_matches_loop_oracle(data, over):
  """Masked entries (here -inf log-probs and NaN costs) drop out; others get LOO advantages.

  Fixed `[3, 4]` shape (one compile); the masks cover rows with 0, 1 or more valid samples.
  """
  batch, samples = 3, 4
  finite = st.floats(-5, 5, width=32)
  log_probs = data.draw(hnp.arrays(np.float32, (batch, samples), elements=finite))
  costs = data.draw(hnp.arrays(np.float32, (batch, samples), elements=finite))
  mask = data.draw(hnp.arrays(np.bool_, (batch, samples)))
  log_probs[~mask], costs[~mask] = -np.inf, np.nan
  value, grad = score_function_value_and_grad(log_probs, costs, mask, over)
  count = max(mask.sum(), 1)
  expected_grad = np.zeros((batch, samples))
  for b, i in zip(*np.nonzero(mask)):
    group = mask[b] if over == "samples" else mask
    others = [c for c, m in zip(costs[b] if over == "samples" else costs.ravel(),
                                group.ravel()) if m]
    others_total = sum(others) - costs[b, i]
    baseline = others_total / (len(others) - 1) if over != "none" and len(others) > 1 else 0.0
    expected_grad[b, i] = (costs[b, i] - baseline) / count
  np.testing.assert_allclose(value, costs[mask].sum() / count, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_leave_one_out_baseline_hand_case():
  values = jnp.array([[1.0, 2.0, 6.0], [4.0, 100.0, 8.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])
  np.testing.assert_allclose(
      losses.leave_one_out_baseline(values, mask), [[4.0, 3.5, 1.5], [0.0, 0.0, 0.0]]
  )
  np.testing.assert_allclose(
      losses.leave_one_out_baseline(values, mask, over="batch")[0], [4.0, 11 / 3, 7 / 3]
  )


def test_backward_kl_loss_with_floor_and_one_sample():
  """All-lost Monte Carlo quantiles are floored; one sample per prompt gives a zero baseline."""
  p_lt = p_le = jnp.zeros((2, 1))
  log_pi, log_ref = jnp.array([[-1.0], [-2.0]]), jnp.array([[-1.5], [-2.5]])
  floor = losses.quantile_floor(8)
  assert floor == 1 / 16
  for reward_form, ratio in [("log_quantile", math.log(4) + 3 * math.log(floor)),
                             ("tie_aware", 3 * math.log(floor))]:
    with pytest.warns(losses.BaselineWarning, match="1 sample per prompt"):
      (value, metrics), grad = jax.value_and_grad(losses.backward_kl_loss, has_aux=True)(
          log_pi, log_ref, p_lt, p_le, 4, floor=floor, reward_form=reward_form
      )
    np.testing.assert_allclose(metrics["bond_reward"], ratio, rtol=1e-6)
    np.testing.assert_allclose(value, 0.5 - ratio, rtol=1e-6)
    np.testing.assert_allclose(grad, np.full((2, 1), (0.5 - ratio) / 2), rtol=1e-6)
  np.testing.assert_allclose(losses.bond_reward(jnp.array([0.0, 0.5]), floor), [math.log(floor),
                                                                               math.log(0.5)])


@pytest.mark.parametrize("n", [2, 10_000])
def test_backward_kl_loss_all_rewards_equal_is_pure_kl(n):
  """With every reward tied the exact BoN is π_ref, so the cost is log π - log π_ref."""
  log_pi, log_ref = jnp.array([[-1.0, -3.0]]), jnp.array([[-2.0, -2.5]])
  p_lt, p_le = bond_jax.reward_quantiles(jnp.zeros((1, 2)), jnp.zeros((1, 5)))
  loss, metrics = losses.backward_kl_loss(log_pi, log_ref, p_lt, p_le, n, floor=0.0)
  np.testing.assert_allclose(loss, 0.25, rtol=1e-6)
  assert metrics["bond_reward"] == 0.0


def test_sequence_log_probs_matches_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, size=(2, 3, 4))
  mask = rng.random((2, 3, 4)) < 0.7
  got = losses.sequence_log_probs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  expected = np.zeros((2, 3))
  for idx in np.ndindex(2, 3):
    for t in range(4):
      if mask[idx + (t,)]:
        row = logits[idx + (t,)].astype(np.float64)
        expected[idx] += row[tokens[idx + (t,)]] - np.log(np.exp(row).sum())
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      losses.sequence_log_probs(jnp.asarray(logits), jnp.asarray(tokens)),
      losses.sequence_log_probs(jnp.asarray(logits), jnp.asarray(tokens), jnp.ones_like(mask)),
  )


def test_kl_estimators_are_unbiased_on_a_categorical():
  rng = np.random.default_rng(3)
  p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
  exact = np.sum(p * np.log(p / q))
  log_p, log_q = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
  k3 = np.asarray(kl.kl_k3(log_p, log_q))
  np.testing.assert_allclose(p @ np.asarray(kl.kl_k1(log_p, log_q)), exact, rtol=1e-5)
  np.testing.assert_allclose(p @ k3, exact, rtol=1e-5)
  assert np.all(k3 >= 0)


def test_per_token_kl_estimators_sum_to_the_sequence_kl():
  """Two autoregressive tokens over 4 symbols plus a masked pad position holding -inf."""
  rng = np.random.default_rng(4)
  p1, q1 = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
  p2, q2 = rng.dirichlet(np.ones(4), size=4), rng.dirichlet(np.ones(4), size=4)
  seqs = all_tuples(4, 2)
  weights = p1[seqs[:, 0]] * p2[seqs[:, 0], seqs[:, 1]]
  exact = np.sum(weights * np.log(weights / (q1[seqs[:, 0]] * q2[seqs[:, 0], seqs[:, 1]])))
  pad = np.full(16, -np.inf)
  log_p = np.stack([np.log(p1[seqs[:, 0]]), np.log(p2[seqs[:, 0], seqs[:, 1]]), pad], -1)
  log_q = np.stack([np.log(q1[seqs[:, 0]]), np.log(q2[seqs[:, 0], seqs[:, 1]]), pad], -1)
  log_p, log_q = jnp.asarray(log_p, jnp.float32), jnp.asarray(log_q, jnp.float32)
  mask = jnp.array([True, True, False])[None].repeat(16, 0)
  for estimator in (kl.kl_k1, kl.kl_k3):
    per_token = estimator(log_p, log_q, mask)
    per_sequence = estimator(log_p.sum(-1, where=mask), log_q.sum(-1, where=mask))
    np.testing.assert_allclose(weights @ np.asarray(per_token.sum(-1)), exact, rtol=1e-5)
    np.testing.assert_allclose(weights @ np.asarray(per_sequence), exact, rtol=1e-5)


def test_ema_update_matches_closed_form():
  old = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2), jnp.bfloat16)}}
  new = {"a": jnp.array([4.0, 5.0, 6.0]), "b": {"c": jnp.full((2, 2), 3.0, jnp.bfloat16)}}
  out = anchor.ema_update(old, new, 0.25)
  np.testing.assert_allclose(out["a"], 0.75 * np.arange(3.0) + 0.25 * np.array([4, 5, 6]))
  np.testing.assert_allclose(np.float32(out["b"]["c"]), 1.5)
  assert out["b"]["c"].dtype == jnp.bfloat16
  assert jax.tree.map(np.asarray, anchor.ema_update(old, new, 1.0))["a"].tolist() == [4, 5, 6]
  jitted = jax.jit(anchor.ema_update)(old, new, jnp.float32(0.25))
  np.testing.assert_allclose(jitted["a"], out["a"])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: anchor.ema_update({}, {}, 0.0), "`eta` must be in"),
        (lambda: anchor.ema_update({}, {}, 1.5), "`eta` must be in"),
        (lambda: losses.jeffreys_loss((0.0, {}), (0.0, {}), beta=1.5), "`beta` must be in"),
        (lambda: losses.jbond_loss(*[jnp.zeros((1, 1))] * 3, jnp.zeros((1, 2)), jnp.zeros(1),
                                   beta=-0.1), "`beta` must be in"),
        (lambda: losses.jbond_loss(*[jnp.zeros((1, 1))] * 3, jnp.zeros((1, 2)), jnp.zeros(1),
                                   gamma=-1.0), "`gamma` must be in"),
        (lambda: losses.jbond_loss(*[jnp.zeros((1, 1))] * 3, jnp.zeros((1, 2)), jnp.zeros(1),
                                   reward_form="exact"), "`reward_form` must be one of"),
        (lambda: losses.jbond_reward(jnp.zeros((1, 1)), jnp.zeros((1, 2)), penalty=-1.0),
         "`penalty` must be in"),
        (lambda: losses.reinforce_loss(*[jnp.zeros((1, 2))] * 3, kl_coef=-0.1),
         "`kl_coef` must be in"),
        (lambda: losses.bond_reward(jnp.zeros(2), floor=2.0), "`floor` must be in"),
        (lambda: losses.quantile_floor(0), "`num_refs` must be an integer"),
        (lambda: losses.bond_log_ratio(jnp.zeros(2), jnp.ones(2), 2, floor=0.0,
                                       reward_form="quantile"), "`reward_form` must be one of"),
        (lambda: losses.backward_kl_loss(*[jnp.zeros((1, 2))] * 4, 0, floor=0.0),
         "`n` must be an integer"),
        (lambda: losses.leave_one_out_baseline(jnp.zeros((1, 2)), over="prompt"),
         "`over` must be one of"),
    ],
)
def test_invalid_arguments_are_rejected(call, match):
  with pytest.raises(ValueError, match=match):
    call()


X, X_TOKENS, TOKEN_MASK = jnp.zeros((2, 3)), jnp.zeros((2, 3, 7)), jnp.ones((2, 3, 7), bool)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.backward_kl_loss(X, X, X, jnp.zeros((2, 4)), 2, floor=0.0),
     r"`p_le` must have shape \[batch, samples\] = \(2, 3\), got \(2, 4\)"),
    (lambda: losses.backward_kl_loss(X_TOKENS, X, X, X, 2, floor=0.0),
     r"`policy_log_probs` must have shape \[batch, samples\] \(per-token .* need `token_mask`\), got \(2, 3, 7\)"),
    (lambda: losses.backward_kl_loss(X_TOKENS, jnp.zeros((2, 3, 6)), X, X, 2, floor=0.0, token_mask=TOKEN_MASK),
     r"`ref_log_probs` must have shape \[batch, samples\] = \(2, 3\) or per-token \(2, 3, 7\)"),
    (lambda: losses.backward_kl_loss(X, X, X, X, 2), "`floor` is required"),
    (lambda: losses.backward_kl_loss(X, X, X, X, 2, floor=0.0, bon_log_ratio=X), "not both"),
    (lambda: losses.backward_kl_loss(X, X, X), "pass the quantiles"),
    (lambda: losses.reinforce_loss(X, X, jnp.zeros((3, 2)), kl_coef=0.1), "`rewards` must have shape"),
    (lambda: losses.jbond_loss(X, X, X, jnp.zeros((3, 2)), X), r"`anchor_rewards` must have shape \[batch, k\]"),
    (lambda: losses.jbond_loss(X, X, X, jnp.zeros((2, 2)), X, reward=X), "not both"),
    (lambda: losses.jbond_loss(X, X, X, jnp.zeros((2, 2))), "`bon_policy_log_probs` .* is required"),
    (lambda: losses.jbond_loss(X, X, X, jnp.zeros((2, 2)), X, mask=jnp.ones((2, 2), bool)),
     "`mask` must have shape"),
    (lambda: losses.forward_kl_loss(X_TOKENS), r"`bon_policy_log_probs` must have shape \[batch\] or"),
    (lambda: losses.sequence_log_probs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32)),
     "`logits` must have"),
    (lambda: losses.score_function_loss(X, jnp.zeros((2, 2))), "`policy_log_probs` must have shape"),
])
def test_shape_errors_name_the_argument_and_the_shape(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_kl_estimators_reject_mismatched_shapes():
  with pytest.raises(AssertionError):
    kl.kl_k1(X, jnp.zeros(3))


@functools.partial(jax.jit, static_argnames=("n", "reward_form"))
def backward_value_and_grad(log_pi, log_ref, rewards, ref_rewards, ref_mask, mask, floor, *, n, reward_form):
  p_lt, p_le = bond_jax.reward_quantiles(rewards, ref_rewards, ref_mask)
  return jax.value_and_grad(losses.backward_kl_loss, has_aux=True)(
      log_pi, log_ref, p_lt, p_le, n, floor=floor, reward_form=reward_form, mask=mask
  )


@SETTINGS
@hypothesis.given(
    data=st.data(),
    n=st.sampled_from([1, 2, 16, 10_000]),
    reward_form=st.sampled_from(losses.REWARD_FORMS),
)
def test_backward_kl_loss_stays_finite_with_monte_carlo_quantiles(data, n, reward_form):
  """Any rewards (ties, all lost, no valid refs), masked -inf log-probs, n up to 1e4."""
  levels = st.integers(-2, 2).map(float)
  rewards = data.draw(hnp.arrays(np.float32, (2, 3), elements=levels))
  ref_rewards = data.draw(hnp.arrays(np.float32, (2, 4), elements=levels))
  ref_mask = data.draw(hnp.arrays(np.bool_, (2, 4)))
  mask = data.draw(hnp.arrays(np.bool_, (2, 3)))
  log_pi = data.draw(hnp.arrays(np.float32, (2, 3), elements=st.floats(-20, 0, width=32)))
  log_pi[~mask] = -np.inf
  (loss, metrics), grad = backward_value_and_grad(
      log_pi, np.zeros((2, 3), np.float32), rewards, ref_rewards, ref_mask, mask, losses.quantile_floor(4),
      n=n, reward_form=reward_form,
  )
  assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
  # The loss value is the mean cost, log π(y) - log π_ref(y) - log ratio, over valid samples.
  if mask.any():
    np.testing.assert_allclose(loss, np.mean(log_pi[mask]) - metrics["bond_reward"], rtol=1e-4,
                               atol=1e-3)


def per_token_case(seed=0, batch=2, samples=3, time=4):
  """Per-token log-probs whose masked positions hold -inf, their token mask, and the per-sequence sums."""
  rng = np.random.default_rng(seed)
  token_mask = rng.random((batch, samples, time)) < 0.7
  per_token = [np.where(token_mask, -rng.uniform(0.1, 2, (batch, samples, time)), -np.inf).astype(np.float32)
               for _ in range(2)]
  per_sequence = [np.where(token_mask, x, 0).sum(-1) for x in per_token]
  return [jnp.asarray(x) for x in per_token], [jnp.asarray(x) for x in per_sequence], jnp.asarray(token_mask)


def test_per_token_inputs_equal_per_sequence_ones():
  """Every loss sums per-token log-probs over the token mask itself: same value, same gradient."""
  (pi_t, ref_t), (pi_s, ref_s), token_mask = per_token_case()
  rng = np.random.default_rng(1)
  rewards, anchor_rewards = jnp.asarray(rng.integers(0, 3, (2, 3)), jnp.float32), jnp.asarray(
      rng.integers(0, 3, (2, 2)), jnp.float32)
  p_lt, p_le = bond_jax.reward_quantiles(rewards, anchor_rewards)
  calls = {
      "backward": lambda pi, ref, tm: losses.backward_kl_loss(pi, ref, p_lt, p_le, 4, floor=0.25, token_mask=tm)[0],
      "reinforce": lambda pi, ref, tm: losses.reinforce_loss(pi, ref, rewards, kl_coef=0.3, token_mask=tm)[0],
      "jbond": lambda pi, ref, tm: losses.jbond_loss(
          pi, ref, rewards, anchor_rewards, pi[:, :1], gamma=0.2, token_mask=tm,
          bon_token_mask=None if tm is None else tm[:, :1])[0],
      "forward": lambda pi, ref, tm: losses.forward_kl_loss(pi, token_mask=tm)[0],
      "score_function": lambda pi, ref, tm: losses.score_function_loss(pi, rewards, token_mask=tm),
  }
  for name, call in calls.items():
    seq_value, seq_grad = jax.value_and_grad(call)(pi_s, ref_s, None)
    tok_value, tok_grad = jax.value_and_grad(call)(pi_t, ref_t, token_mask)
    np.testing.assert_allclose(tok_value, seq_value, rtol=1e-6, err_msg=name)
    # d loss / d log p(token) is the sequence's gradient on valid tokens and 0 on masked ones.
    expected = np.where(token_mask, np.asarray(seq_grad)[..., None], 0.0)
    np.testing.assert_allclose(tok_grad, expected, rtol=1e-6, atol=1e-7, err_msg=name)
  # A per-sequence reference beside per-token policy log-probs is accepted too.
  mixed = losses.backward_kl_loss(pi_t, ref_s, p_lt, p_le, 4, floor=0.25, token_mask=token_mask)[0]
  np.testing.assert_allclose(mixed, calls["backward"](pi_s, ref_s, None), rtol=1e-6)


def test_token_log_probs_sum_to_sequence_log_probs():
  rng = np.random.default_rng(2)
  logits, tokens = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32), jnp.asarray(rng.integers(0, 5, (2, 3)))
  mask = jnp.array([[True, True, False], [True, False, False]])
  expected = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  expected = np.take_along_axis(expected, np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.token_log_probs(logits, tokens), expected, rtol=1e-5)
  np.testing.assert_allclose(losses.sequence_log_probs(logits, tokens, mask), (expected * mask).sum(-1), rtol=1e-5)


@jax.jit
def jbond_with_traced_hyperparameters(log_pi, log_anchor, rewards, anchor_rewards, bon, beta, gamma, penalty):
  return jax.value_and_grad(lambda lp: losses.jbond_loss(
      lp, log_anchor, rewards, anchor_rewards, bon, beta=beta, gamma=gamma, penalty=penalty)[0])(log_pi)


def test_hyperparameters_can_be_traced():
  """beta, gamma, penalty, floor and kl_coef inside jit give what their Python values give outside it."""
  rng = np.random.default_rng(3)
  log_pi, log_anchor = (jnp.asarray(-rng.uniform(1, 3, (4, 1)), jnp.float32) for _ in range(2))
  rewards, anchor_rewards = jnp.asarray(rng.normal(size=(4, 1))), jnp.asarray(rng.normal(size=(4, 2)))
  bon = jnp.asarray(-rng.uniform(1, 3, 4), jnp.float32)
  traced = jbond_with_traced_hyperparameters(log_pi, log_anchor, rewards, anchor_rewards, bon, 0.3, 0.2, 1.5)
  eager = jax.value_and_grad(lambda lp: losses.jbond_loss(
      lp, log_anchor, rewards, anchor_rewards, bon, beta=0.3, gamma=0.2, penalty=1.5)[0])(log_pi)
  for got, expected in zip(traced, eager):
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  reinforce = jax.jit(lambda c: losses.reinforce_loss(log_pi.T, log_anchor.T, rewards.T, kl_coef=c)[0])
  np.testing.assert_allclose(reinforce(0.5), losses.reinforce_loss(log_pi.T, log_anchor.T, rewards.T,
                                                                   kl_coef=0.5)[0], rtol=1e-6)


def test_precomputed_rewards_and_log_ratios_equal_computed_ones():
  rng = np.random.default_rng(4)
  log_pi, log_ref = (jnp.asarray(-rng.uniform(1, 3, (3, 2)), jnp.float32) for _ in range(2))
  rewards, anchor_rewards = jnp.asarray(rng.integers(0, 3, (3, 2)), jnp.float32), jnp.asarray(
      rng.integers(0, 3, (3, 2)), jnp.float32)
  p_lt, p_le = bond_jax.reward_quantiles(rewards, anchor_rewards)
  ratio = losses.bond_log_ratio(p_lt, p_le, 4, floor=0.25)
  from_quantiles = jax.value_and_grad(lambda lp: losses.backward_kl_loss(lp, log_ref, p_lt, p_le, 4, floor=0.25)[0])
  from_ratio = jax.value_and_grad(lambda lp: losses.backward_kl_loss(lp, log_ref, bon_log_ratio=ratio)[0])
  for got, expected in zip(from_ratio(log_pi), from_quantiles(log_pi)):
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  reward = losses.jbond_tie_aware_reward(rewards, anchor_rewards)
  bon = log_pi[:, 0]
  computed = losses.jbond_loss(log_pi, log_ref, rewards, anchor_rewards, bon, reward_form="tie_aware")
  precomputed = losses.jbond_loss(log_pi, log_ref, bon_policy_log_probs=bon, reward=reward)
  np.testing.assert_allclose(precomputed[0], computed[0], rtol=1e-6)
  np.testing.assert_allclose(precomputed[1]["reward"], computed[1]["reward"], rtol=1e-6)


def test_jbond_masks_and_baselines():
  """An absent anchor sample never counts, an absent policy sample never moves the loss."""
  policy, anchors = jnp.array([[0.0], [0.0]]), jnp.array([[1.0, -1.0], [1.0, 1.0]])
  anchor_mask = jnp.array([[True, False], [False, False]])
  np.testing.assert_allclose(losses.jbond_reward(policy, anchors, anchor_mask=anchor_mask)[:, 0],
                             [-math.log(16), 0.0], rtol=1e-6)
  log_pi, log_anchor = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
  rewards, anchor_rewards, bon = jnp.array([[0.0, 3.0]]), jnp.array([[1.0, 2.0]]), jnp.array([-0.5])
  mask = jnp.array([[True, False]])
  grad = jax.grad(lambda lp: losses.jbond_loss(lp, log_anchor, rewards, anchor_rewards, bon, mask=mask,
                                               baseline="samples")[0])(log_pi)
  # The one valid sample: backward weight 0.5 times its cost 0.5 + log 16; no other sample, no baseline.
  np.testing.assert_allclose(grad, [[0.5 * (0.5 + math.log(16)), 0.0]], rtol=1e-6)


def test_one_sample_per_prompt_warns_about_the_missing_baseline():
  with pytest.warns(losses.BaselineWarning, match="baseline='batch'"):
    losses.score_function_loss(jnp.zeros((3, 1)), jnp.ones((3, 1)))
