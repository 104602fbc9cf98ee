"""Regenerates the embedded default task's shipped files under bond_jax/assets/ (deterministic).

    python experiments/make_default_assets.py            # rewrites bond_jax/assets/
    python experiments/make_default_assets.py --out_dir=/tmp/assets

Writes reviews.txt (the corpus the default tiny LM is trained on), prompts.jsonl (BOND prompts, built into TFDS
by the `bond_prompts` builder at run time) and tokenizer/ (loadable with transformers.AutoTokenizer). A re-run
reproduces the committed files byte for byte; tests/test_default_task.py checks it.
"""

from absl import app
from absl import flags

from bond_jax.tasks import default_assets

_OUT_DIR = flags.DEFINE_string("out_dir", default_assets.ASSETS_DIR, "Directory to write the assets to.")


def main(argv):
  del argv
  default_assets.write_assets(_OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
