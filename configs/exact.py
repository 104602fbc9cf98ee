r"""BOND (N = 4) on the enumerable task, with the exact KLs to Best-of-4 of the reference logged as it trains.

  python experiments/run.py --config=configs/exact.py --workdir=/tmp/bond_exact_beta0.5 --config.bond.beta=0.5

Run it for beta in {0, 0.5, 1} (each a few minutes on 2 CPU cores), then plot with `experiments/plot_exact.py`.
The task (`bond_jax/tasks/enumerable.py`): a random 2-layer transformer over 8 tokens as the reference, 4 prompts
of 2 tokens, 3 generated tokens (8**3 = 512 generations per prompt), a seeded random reward on token ids with
no ties. Every `exact.every` steps `metrics.jsonl` gets `exact/kl_pi_bon` = KL(π || π_BoN), `exact/kl_bon_pi`,
`exact/kl_pi_ref` and `exact/kl_bon_ref` = KL(π_BoN || π_ref) (below log 4 - 3/4 = 0.636 only by the
reference's atoms). The anchor is fixed at the reference, so the loss distils Best-of-4 of π_ref itself, with
quantiles estimated from k anchor samples as in any BOND run. The learning rate decays to 0 by the last step,
so the final policy is not left at the noise level of the last few gradients.
"""

from bond_jax import run_config
from bond_jax.tasks import enumerable


def get_config():
  config = enumerable.configure(run_config.base_config())
  config.algorithm = "bond"
  config.num_steps = 400
  config.checkpoint_every = 400
  config.optimizer.decay_steps = 390  # Warm-up (10) + decay ends at the last step.
  config.bond.n = 4
  config.bond.num_anchor_samples = 16  # k: its Monte Carlo bias shifts the target by ~0.001 nats here.
  config.bond.beta = 0.5
  config.anchor.mode = "fixed"
  return config
