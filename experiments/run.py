r"""Runs a BOND / J-BOND / REINFORCE experiment from a config file.

  python experiments/run.py --config=configs/default.py --workdir=/tmp/bond_default \
      [--config.num_steps=100 --config.bond.beta=0.5 ...]

Running again with the same workdir resumes from its last checkpoint. The workdir may be a bucket
(`--workdir=gs://bucket/run`, with `pip install -e ".[gcs]"`); a path that cannot be written stops the run first.
"""

import logging as std_logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report: a local path or "
                                "a bucket URI (gs://bucket/run).")
flags.mark_flags_as_required(["config", "workdir"])


class _OwnInfoOnly(std_logging.Filter):
  """Keeps our INFO lines and everyone's warnings; orbax and jax log every checkpoint step at INFO."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "bond_jax" in record.pathname or "experiments" in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad `--config.*` override reported in one line like every other config error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except AttributeError as e:  # config_flags' answer to an override of a field the config does not have.
    detail = e.args[0].args[0] if e.args and isinstance(e.args[0], KeyError) else str(e)
    sys.exit(f"error: a --config.* override names a field the config does not have: {' '.join(detail.split())}")


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from bond_jax import checkpointing, memory_estimate, paths, rewards, run_config, trainer
  from bond_jax.data import prompt_batches  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if config.distributed.coordinator_address:
    jax.distributed.initialize(coordinator_address=config.distributed.coordinator_address,
                               num_processes=config.distributed.num_processes,
                               process_id=config.distributed.process_id)
  logging.info("Devices: %d (%d local) on %d process(es).", jax.device_count(), jax.local_device_count(),
               jax.process_count())
  try:
    trainer.train(config, _WORKDIR.value)
  except (run_config.ConfigError, checkpointing.CheckpointMismatchError, trainer.NonFiniteLossError,
          rewards.RewardError, memory_estimate.MemoryBudgetError, prompt_batches.PromptError, paths.PathError,
          FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
