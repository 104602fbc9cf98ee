"""bond_jax: Best-of-N Distillation (BOND, J-BOND) in JAX/Flax (Sessa et al., arXiv 2407.14622).

The pure BOND mathematics (quantiles, the Best-of-N distribution, losses, group advantages, KL estimators, the
EMA anchor) is importable from the package itself. Every submodule (`bond_jax.rewards`, `bond_jax.sampling`,
`bond_jax.exact_oracle`, `bond_jax.trainer`, ...) is also an attribute of the package, imported on first use, so
`import bond_jax` stays light: it imports neither TensorFlow Datasets nor transformers.

Example:
  >>> import bond_jax
  >>> bond_jax.bon_kl_upper_bound(2) == bond_jax.quantiles.bon_kl_upper_bound(2)
  True
"""

import importlib
import pkgutil

from bond_jax.anchor import ema_update
from bond_jax.group_estimators import bond_group_advantages, jbond_group_advantages
from bond_jax.kl import kl_k1, kl_k3
from bond_jax.losses import (
    backward_kl_loss,
    bond_log_ratio,
    bond_reward,
    forward_kl_loss,
    jbond_loss,
    jbond_reward,
    jbond_tie_aware_reward,
    jeffreys_loss,
    leave_one_out_baseline,
    quantile_floor,
    reinforce_loss,
    score_function_loss,
    sequence_log_probs,
    token_log_probs,
)
from bond_jax.quantiles import (
    best_of_n,
    bon_density_ratio_estimate,
    bon_expected_quantile,
    bon_kl_upper_bound,
    bon_log_density_ratio,
    bon_log_density_ratio_no_ties,
    bon_log_prob,
    group_quantiles,
    reward_quantiles,
    take_samples,
)

__version__ = "0.2.0"  # The one home of the version: setup.py reads it from here.

__all__ = [
    "backward_kl_loss", "best_of_n", "bon_density_ratio_estimate", "bon_expected_quantile", "bon_kl_upper_bound",
    "bon_log_density_ratio", "bon_log_density_ratio_no_ties", "bon_log_prob", "bond_group_advantages",
    "bond_log_ratio", "bond_reward", "ema_update", "forward_kl_loss", "group_quantiles", "jbond_group_advantages",
    "jbond_loss", "jbond_reward", "jbond_tie_aware_reward", "jeffreys_loss", "kl_k1", "kl_k3",
    "leave_one_out_baseline", "quantile_floor", "reinforce_loss", "reward_quantiles", "score_function_loss",
    "sequence_log_probs", "take_samples", "token_log_probs",
]


def _submodules() -> list[str]:
  return sorted(module.name for module in pkgutil.iter_modules(__path__))


def __getattr__(name: str):
  """Imports the submodule `name` on first access (PEP 562)."""
  if name in _submodules():
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_submodules()))
