"""bond_jax: Best-of-N Distillation (BOND, J-BOND) in JAX/Flax."""

# BOND maths: quantiles, Best-of-N distribution, losses, KL estimators, EMA anchor.
from bond_jax.anchor import ema_update
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
)
from bond_jax.quantiles import (
    best_of_n,
    bon_expected_quantile,
    bon_kl_upper_bound,
    bon_log_density_ratio,
    bon_log_density_ratio_no_ties,
    bon_log_prob,
    reward_quantiles,
)
