r"""Iterative BOND (n = 2, anchor moved to the policy periodically) on the enumerable task, with exact KLs.

  python experiments/run.py --config=configs/exact_iterative.py --workdir=/tmp/bond_exact_iterative

Each period distils Best-of-2 of the anchor; moving the anchor to the distilled policy then makes the next
target Best-of-2 of Best-of-2 = Best-of-4 of π_ref, and so on: after t anchor moves the policy should be closest
to BoN_{2^(t+1)}(π_ref) by the end of the period. `metrics.jsonl` gets the exact KL(π || BoN_M(π_ref)) for
M in `exact.bon_ns` (`exact/kl_pi_bon{M}`); `experiments/plot_exact.py --iterative=...` plots them. The same
exact metrics for J-BOND with its EMA anchor (not tuned here):

  python experiments/run.py --config=configs/exact_iterative.py --workdir=/tmp/bond_exact_jbond \
      --config.algorithm=jbond --config.anchor.mode=ema --config.anchor.eta=0.02

The task and policy are those of `configs/exact.py` (`bond_jax/tasks/enumerable.py`).
"""

from bond_jax import run_config
from bond_jax.tasks import enumerable


def get_config():
  config = enumerable.configure(run_config.base_config())
  config.algorithm = "bond"
  config.num_steps = 500  # Five periods: targets BoN_2, 4, 8, 16, 32 of π_ref.
  config.checkpoint_every = 500
  config.bond.n = 2
  config.bond.beta = 0.5
  config.anchor.mode = "periodic"
  config.anchor.period = 100
  config.exact.bon_ns = (2, 4, 8, 16, 32, 64)
  return config
