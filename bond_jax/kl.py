"""Sample-based KL estimators (J. Schulman, "Approximating KL divergence", 2020).

For `y ~ p` and `log_ratio = log q(y) - log p(y)`:
  k1 = -log_ratio                       unbiased for KL(p || q), can be negative;
  k3 = (exp(log_ratio) - 1) - log_ratio  unbiased for KL(p || q), always >= 0, lower variance.

Both are elementwise. Per-token estimates summed over time are unbiased for the sequence KL
(chain rule of KL), and so are the estimates computed on per-sequence log-probabilities.
"""

import chex
import jax.numpy as jnp


def _log_ratio(log_p: chex.Array, log_q: chex.Array, mask: chex.Array | None) -> chex.Array:
  chex.assert_equal_shape([log_p, log_q])
  if mask is None:
    return log_q - log_p
  chex.assert_equal_shape([log_p, mask])
  # Padding may hold -inf log-probs; zeroing both sides keeps it out of every sum and gradient.
  return jnp.where(mask, log_q, 0.0) - jnp.where(mask, log_p, 0.0)


def kl_k1(log_p: chex.Array, log_q: chex.Array, mask: chex.Array | None = None) -> chex.Array:
  """k1 estimate `log p(y) - log q(y)` of `KL(p || q)` on samples `y ~ p`.

  Args:
    log_p: `[...]` log-probabilities under the sampling distribution p, per token
      (e.g. `[batch, samples, time]`) or per sequence (`[batch, samples]`).
    log_q: `[...]` log-probabilities of the same samples under q.
    mask: optional `[...]` boolean; masked entries give 0.

  Returns:
    `[...]` estimates; reduce over time for a per-sequence KL, then average.

  Example:
    >>> p, q = jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75])
    >>> round(float(p @ kl_k1(jnp.log(p), jnp.log(q))), 4), round(float(jnp.sum(p * jnp.log(p / q))), 4)
    (0.1438, 0.1438)
  """
  return -_log_ratio(log_p, log_q, mask)


def kl_k3(log_p: chex.Array, log_q: chex.Array, mask: chex.Array | None = None) -> chex.Array:
  """k3 estimate `(q/p - 1) - log(q/p)` of `KL(p || q)` on samples `y ~ p`; always >= 0.

  Args:
    log_p: `[...]` log-probabilities under the sampling distribution p, per token or sequence.
    log_q: `[...]` log-probabilities of the same samples under q.
    mask: optional `[...]` boolean; masked entries give 0.

  Returns:
    `[...]` non-negative estimates.

  Example:
    >>> p, q = jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75])
    >>> round(float(p @ kl_k3(jnp.log(p), jnp.log(q))), 4), round(float(jnp.sum(p * jnp.log(p / q))), 4)
    (0.1438, 0.1438)
  """
  log_ratio = _log_ratio(log_p, log_q, mask)
  return jnp.expm1(log_ratio) - log_ratio
