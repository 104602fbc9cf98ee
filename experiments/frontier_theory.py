r"""Where BOND and J-BOND would land without optimisation noise: their fixed points and dynamics in quantile space.

  python experiments/frontier_theory.py

With a continuous reward, a policy is a density over the reference's reward quantile u in [0, 1] (the reference is
uniform), `KL(π || π_ref)` and the mean quantile follow from it, and Best-of-N is `N u^(N-1)`, on the frontier by
definition. On a grid of u this script:
- solves BOND's Jeffreys objective at N = 8, β = 0.5 exactly (mirror descent), with the backward reward
  `log N + (N-1) log p_le` exact and as the trainer estimates it (the mean of `log max(p̂_le, 1/(2k))` over
  `p̂_le ~ Binomial(k, u) / k`): how far the quantile estimate's bias moves the fixed point from Best-of-8;
- iterates ideal J-BOND (β = 0.5, the paper's penalty reward in expectation): each step the policy is the exact
  minimiser given the anchor, and the anchor moves to `(1-η) anchor + η policy` (in distribution, not parameter,
  space): how far the algorithm itself stays from the frontier.
"""

import numpy as np
from scipy import stats

GRID = 2000
U = (np.arange(GRID) + 0.5) / GRID  # The reference's quantile of each bin.


def solve(log_target_weights, forward_target, beta, start=None, iterations=3000, rate=200.0):
  """The density minimising `(1-β) KL(forward_target || π) + β KL(π || exp(log_target_weights) / Z)` (mirror
  descent on the logits)."""
  logits = np.array(log_target_weights if start is None else np.log(start))
  for _ in range(iterations):
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    cost = np.log(pi) - log_target_weights
    logits -= rate * (-(1 - beta) * (forward_target - pi) + beta * pi * (cost - np.sum(pi * cost)))
  return pi


def kl_and_quantile(pi):
  return float(np.sum(pi * np.log(pi * GRID))), float(np.sum(pi * U))


def frontier_quantile(kl):
  ns = np.exp(np.linspace(0, 12, 4000))
  return float(np.interp(kl, np.log(ns) - (ns - 1) / ns, ns / (ns + 1)))


def bond_fixed_points(n=8, beta=0.5):
  best_of_n = n * U ** (n - 1) / GRID
  print(f"BOND N = {n}, beta = {beta}: Best-of-{n} KL {np.log(n) - (n - 1) / n:.3f}, quantile {n / (n + 1):.4f}")
  rewards = {"exact log p_le": np.log(U)}
  for k in (16, 32):
    counts = np.arange(k + 1)
    pmf = stats.binom.pmf(counts[None, :], k, U[:, None])
    rewards[f"k = {k}, floor 1/2k"] = pmf @ np.log(np.maximum(counts / k, 1 / (2 * k)))
  for name, reward in rewards.items():
    kl, q = kl_and_quantile(solve(np.log(n) + (n - 1) * reward + np.log(1 / GRID), best_of_n, beta))
    print(f"  reward {name:<20} fixed point KL {kl:.3f} quantile {q:.4f}")


def ideal_jbond(beta=0.5, eta=0.02, steps=150, penalty=np.log(16)):
  print(f"Ideal J-BOND, beta = {beta}, eta = {eta} (the penalty reward in expectation):")
  anchor, pi = np.full(GRID, 1 / GRID), None
  for t in range(1, steps + 1):
    cdf = np.cumsum(anchor)
    p_le, p_lt = cdf, cdf - anchor
    best_of_2 = anchor * (p_le + p_lt)
    expected_reward = -penalty * (1 - (p_le + p_lt) / 2) ** 2  # Losing to both anchor samples.
    pi = solve(np.log(anchor) + expected_reward, best_of_2, beta, start=pi, iterations=1000)
    anchor = (1 - eta) * anchor + eta * pi
    if t % 25 == 0:
      kl, q = kl_and_quantile(pi)
      print(f"  step {t}: KL {kl:.3f} quantile {q:.4f}, frontier at that KL {frontier_quantile(kl):.4f}")


if __name__ == "__main__":
  bond_fixed_points()
  ideal_jbond()
