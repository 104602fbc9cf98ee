r"""Evaluates a finished run's policy on its held-out or its training prompts, with the run's own evaluation.

  python experiments/evaluate_split.py --config=configs/pareto.py:bond_beta05 --workdir=/tmp/run --split=train \
      [--config.seed=0 ...]   # the flags the run was started with

The policy is the run's exported `policy/` (`trainer.EXPORT_DIR`), the reference the config's. Each split is read
from its start (training prompts in the order of `config.seed`'s first epoch), `config.eval_batches` batches of
`run_config.eval_batch_size(config)` prompts, with the evaluation's random stream: on `--split=heldout` it
reproduces the run's final evaluation. Prints the means with standard errors over prompts, the distance to the
Best-of-N frontier, and the spread over prompts of each prompt's gap to its own frontier at its own KL: whether the
policy trails Best-of-N on prompts it trained on as on unseen ones, and on every prompt or on a few (README,
"Against the Best-of-N frontier").
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The finished run's directory (holds policy/).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "heldout"], "Which prompts to evaluate on.")
flags.mark_flags_as_required(["config", "workdir"])

SHOWN = ("kl/policy_ref", "quantile/policy", "frontier/gap", "frontier/excess_kl", "quantile/bon_8", "kl/bon_8")
PERCENTILES = (10, 25, 50, 75, 90)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from bond_jax import evaluation, run_components, run_config, trainer  # pylint: disable=g-import-not-at-top
  from bond_jax.models import hf  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  ref_params, model_config, tokenizer = run_components.load_policy(config)
  params, _ = hf.load_checkpoint(os.path.join(_WORKDIR.value, trainer.EXPORT_DIR))
  reward_fn = run_components.load_reward(config, tokenizer)
  # Both splits in the evaluation's batches: the train split's iterator takes its size from config.batch_size.
  config.batch_size = run_config.eval_batch_size(config)
  train_prompts, eval_prompts = run_components.load_prompts(config, tokenizer, model_config, _WORKDIR.value)
  prompts = train_prompts if _SPLIT.value == "train" else eval_prompts
  evaluate = jax.jit(evaluation.make_eval_step(config, model_config, reward_fn))
  rng = jax.random.PRNGKey(config.seed + 1)  # The trainer's evaluation stream (`TrainingLoop._evaluate`).
  per_prompt = []
  for i in range(config.eval_batches):
    batch = next(prompts)
    batch = {key: np.asarray(batch[key]) for key in ("prompts", "prompt_mask")}
    per_prompt.append(jax.device_get(evaluate(params, ref_params, batch, jax.random.fold_in(rng, i)).metrics))
  metrics = evaluation.summarize(per_prompt)
  values = {name: np.concatenate([p[name] for p in per_prompt]) for name in per_prompt[0]}
  gaps = np.array([q - np.interp(kl, frontier_kl, frontier_q) for q, kl, frontier_kl, frontier_q in zip(
      values["quantile/policy"], values["kl/policy_ref"], values["frontier/kl"], values["frontier/quantile"])])
  summary = {name: [metrics[name], metrics.get(name + evaluation.SE_SUFFIX)] for name in SHOWN}
  summary["prompts"] = len(gaps)
  summary["per_prompt_gap_percentiles"] = dict(zip(PERCENTILES, np.percentile(gaps, PERCENTILES).round(3).tolist()))
  summary["prompts_within_0.02_of_their_frontier"] = float(np.mean(gaps > -0.02))
  print(json.dumps({_SPLIT.value: summary}, indent=1))


if __name__ == "__main__":
  app.run(main)
