r"""The embedded default: J-BOND on the shipped tiny review LM, rewarded for positive sentiment, on CPU.

  python experiments/run.py --config=configs/default.py --workdir=/tmp/bond_default

Every field and its meaning: `bond_jax/run_config.py`.
"""

from bond_jax import run_config


def get_config():
  return run_config.base_config()
