r"""Writes tiny random stand-ins for an instruct run's checkpoints (`bond_jax/tasks/instruct_example.py`).

  python experiments/make_tiny_instruct.py --out=/tmp/tiny_instruct

Then `configs/instruct.py` runs on them (its docstring has the command).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Directory to write policy/, reward_model/ and prompts.jsonl into.")
flags.mark_flag_as_required("out")


def main(argv):
  del argv
  from bond_jax.tasks import instruct_example  # pylint: disable=g-import-not-at-top
  for name, path in instruct_example.write_assets(_OUT.value).items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  app.run(main)
