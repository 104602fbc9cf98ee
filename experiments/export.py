r"""Writes the policy of a run's checkpoint as a Hugging Face checkpoint directory, for transformers.

  python experiments/run.py --config=configs/default.py --workdir=/tmp/bond_default
  python experiments/export.py --workdir=/tmp/bond_default --out=/tmp/bond_default_policy [--step=200]

The directory holds `config.json` (the policy's family), `generation_config.json` (its stop ids),
`model.safetensors` and the tokenizer's files (`bond_jax.export.export_policy`):

  transformers.AutoModelForCausalLM.from_pretrained("/tmp/bond_default_policy")
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's --workdir (its config.json and checkpoints/), local or a "
                                "bucket URI.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to, local or a bucket URI.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Dtype to write the weights in; default: the parameters' own (float32).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  # pylint: disable-next=g-import-not-at-top
  from bond_jax import checkpointing, export, run_config
  try:
    params, model_config, tokenizer, step = export.restore_run_policy(_WORKDIR.value, _STEP.value)
    export.export_policy(params, model_config, tokenizer, _OUT.value, dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError, run_config.ConfigError, checkpointing.CheckpointMismatchError,
          checkpointing.UnreadableCheckpointError) as e:
    sys.exit(f"error: {e}")
  logging.info("Wrote the policy of step %d (%s) to %s.", step, model_config.family, _OUT.value)


if __name__ == "__main__":
  app.run(main)
