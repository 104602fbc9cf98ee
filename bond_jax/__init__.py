"""bond_jax: Best-of-N Distillation (BOND, J-BOND) in JAX/Flax."""
