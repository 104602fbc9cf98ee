"""End-to-end oracles (spec section 6.5): tabular policies trained with the BOND losses.

A policy over 8 outcomes is a vector of logits, so `KL(π_θ || π_BoN)` is computed exactly and
the trained policy is compared against Best-of-N of the reference by brute-force enumeration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bond_jax
from bon_oracles import brute_force_bon, exact_quantiles, random_case, softmax

NUM, BATCH, STEPS = 8, 64, 400


def theorem1_bon(probs, rewards, n):
  """BoN_n by Theorem 1 (checked against brute force in test_quantiles), for n too big to enumerate."""
  p_lt, p_le = exact_quantiles(probs, np.float64(rewards))
  return np.exp(np.float64(bond_jax.bon_log_prob(np.log(probs), p_lt, p_le, n)))


def exact_kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


@functools.partial(jax.jit, static_argnames="n")
def distil(theta, anchor_logits, rewards, beta, key, *, n):
  """Adam steps on `jeffreys_loss` towards Best-of-n of `softmax(anchor_logits)`.

  Each step draws 2 samples per prompt from π_θ (backward term, exact quantiles under the
  anchor) and 1 sample from the exact π_BoN (forward term). `beta` is traced, so forward (0),
  Jeffreys and backward (1) share one compilation.
  """
  log_anchor = jax.nn.log_softmax(anchor_logits)
  anchor_probs = jnp.exp(log_anchor)
  p_lt = (rewards[None, :] < rewards[:, None]) @ anchor_probs
  p_le = (rewards[None, :] <= rewards[:, None]) @ anchor_probs
  log_bon = bond_jax.bon_log_prob(log_anchor, p_lt, p_le, n)
  optimizer = optax.adam(optax.cosine_decay_schedule(0.1, STEPS))

  def step(carry, key):
    theta, opt_state = carry
    policy_key, bon_key = jax.random.split(key)
    y = jax.random.categorical(policy_key, theta, shape=(BATCH, 2))
    y_bon = jax.random.categorical(bon_key, log_bon, shape=(BATCH, 1))

    def loss_fn(theta):
      log_pi = jax.nn.log_softmax(theta)
      forward = bond_jax.forward_kl_loss(log_pi[y_bon])
      backward = bond_jax.backward_kl_loss(
          log_pi[y], log_anchor[y], p_lt[y], p_le[y], n, floor=0.0
      )
      return bond_jax.jeffreys_loss(forward, backward, beta)[0]

    updates, opt_state = optimizer.update(jax.grad(loss_fn)(theta), opt_state)
    return (optax.apply_updates(theta, updates), opt_state), None

  keys = jax.random.split(key, STEPS)
  (theta, _), _ = jax.lax.scan(step, (theta, optimizer.init(theta)), keys)
  return theta


@pytest.fixture(scope="module")
def reference():
  probs, rewards = random_case(seed=3, num=NUM, levels=4)  # ties that matter
  return np.log(probs).astype(np.float32), rewards.astype(np.float32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["forward", "jeffreys", "backward"])
def test_training_reaches_best_of_n(reference, beta):
  ref_logits, rewards = reference
  n = 4
  target = brute_force_bon(softmax(np.float64(ref_logits)), np.float64(rewards), n)
  start = softmax(np.float64(ref_logits))
  theta = distil(ref_logits, ref_logits, rewards, beta, jax.random.key(0), n=n)
  trained = softmax(np.asarray(theta, np.float64))
  assert exact_kl(start, target) > 0.3
  assert exact_kl(trained, target) < 1e-2


def test_iterated_best_of_2_tracks_best_of_2_to_the_t(reference):
  """Distil BoN_2 of the anchor, copy the policy into the anchor (EMA with η = 1), repeat."""
  ref_logits, rewards = reference
  ref_probs = softmax(np.float64(ref_logits))
  theta = anchor = jnp.asarray(ref_logits)
  for t in range(1, 4):
    theta = distil(theta, anchor, rewards, 0.5, jax.random.key(t), n=2)
    anchor = bond_jax.ema_update(anchor, theta, 1.0)
    target, previous = (theorem1_bon(ref_probs, rewards, 2**s) for s in (t, t - 1))
    trained = softmax(np.asarray(theta, np.float64))
    assert exact_kl(trained, target) < 1e-2
    assert exact_kl(trained, target) < exact_kl(trained, previous) / 5

