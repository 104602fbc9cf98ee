r"""Ablations against the Best-of-N frontier: runs config variants over seeds, one after the other, and tabulates
where each ends (mean ± standard error over seeds).

  python experiments/ablate.py --study=jbond --workdir=/tmp/ablate [--variants=base,lr_1e-4] [--seeds=0,1,2]
  python experiments/ablate.py --study=jbond --workdir=/tmp/ablate --table_only   # the table of what has run
  python experiments/ablate.py --study=jbond --workdir=/tmp/ablate --table_only --at_step=100   # ... at step 100
  python experiments/ablate.py --study=jbond --workdir=/tmp/ablate --table_only --near_kl=1.2   # ... at about 1.2 nats

Each run is `experiments/run.py --config=<the study's config> --workdir=<workdir>/<study>/<variant>/seed<s>
--config.seed=<s> <the variant's flags>`; a run whose `report.json` exists is not run again, so an interrupted
sweep resumes. The table (printed, and written to `<workdir>/<study>/table.md` and `table.json`, or
`table_step<N>.*`, `table_kl<X>.*`) gives per variant, at its last evaluation (or at `--at_step`, or nearest to
`--near_kl`): `KL(π || π_ref)`, the reward quantile, the gap to the Best-of-N frontier at the policy's KL
(`frontier/gap`: the quantile minus the frontier's), the excess KL (`frontier/excess_kl`: the KL minus the
frontier's at the policy's quantile), the most negative gap over its evaluations up to there, and the wall time of
a run. A study's variants change one factor of its base at a time (`STUDIES`).
"""

from collections.abc import Sequence
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from bond_jax import evaluation  # pylint: disable=g-import-not-at-top
from bond_jax import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The null reward: every generation scores 0, so nothing is learnt and every nat of KL is noise.
NULL_REWARD = ("--config.reward.kind=python", "--config.reward.function=experiments.null_reward:zero")

# Larger batches (prompts a step), each evaluated on the same 10 batches of 16 held-out prompts as the base.
BATCHES = {f"batch_{size}": (f"--config.batch_size={size}", "--config.eval.batch_size=16")
           for size in (64, 128, 256, 512)}

# study -> (config, flags of every run, {variant: flags}); each variant changes one factor of the study's base (the
# empty variant); a variant's flags come last and win.
STUDIES = {
    # J-BOND as the default task was before issue 18 chose 400 steps: 300 steps.
    "jbond": ("configs/default.py", ("--config.num_steps=300",), {
        "base": (),
        "null_reward": NULL_REWARD,
        "lr_1e-4": ("--config.optimizer.learning_rate=1e-4",),
        "lr_1e-3": ("--config.optimizer.learning_rate=1e-3",),
        "cosine": ("--config.optimizer.decay_steps=290",),
        "steps_400": ("--config.num_steps=400",),
        "steps_600": ("--config.num_steps=600",),
        **BATCHES,
        "eta_0.005": ("--config.anchor.eta=0.005",),
        "eta_0.05": ("--config.anchor.eta=0.05",),
        "beta_1": ("--config.jbond.beta=1.0",),
        "beta_0.25": ("--config.jbond.beta=0.25",),
        "gamma_0.5": ("--config.jbond.gamma=0.5",),
        "tie_aware": ("--config.jbond.reward_form=tie_aware",),
        "anchor_4": ("--config.jbond.num_anchor_samples=4",),
        "policy_2": ("--config.jbond.num_policy_samples=2",),
        "policy_2_baseline_samples": ("--config.jbond.num_policy_samples=2", "--config.jbond.baseline=samples"),
    }),
    "bond": ("configs/pareto.py:bond_beta05", (), {
        "base": (),
        "null_reward": NULL_REWARD,
        "lr_1e-4": ("--config.optimizer.learning_rate=1e-4",),
        "lr_1e-3": ("--config.optimizer.learning_rate=1e-3",),
        "cosine": ("--config.optimizer.decay_steps=190",),
        "steps_400": ("--config.num_steps=400",),
        **BATCHES,
        "policy_4": ("--config.bond.num_policy_samples=4",),
        "k_32": ("--config.bond.num_anchor_samples=32",),
        "beta_1": ("--config.bond.beta=1.0",),
        "beta_0": ("--config.bond.beta=0.0",),
    }),
}

_STUDY = flags.DEFINE_enum("study", "jbond", list(STUDIES), "Which study's config and variants.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the runs.")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (default: all of the study's).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each variant.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only tabulate the runs that have finished.")
_EXTRA = flags.DEFINE_list("extra", [], "Flags added to every run, e.g. --config.eval_every=100.")
_AT_STEP = flags.DEFINE_integer("at_step", None, "Tabulate the evaluation at this step (default: each run's last); "
                                "runs without one there are left out.")
_NEAR_KL = flags.DEFINE_float("near_kl", None, "Tabulate each run's evaluation whose KL(π || π_ref) is nearest to "
                              "this (nats): variants compared at about the same KL.")
flags.mark_flag_as_required("workdir")

COLUMNS = {"kl": "eval/kl/policy_ref", "quantile": "eval/quantile/policy", "gap": "eval/frontier/gap",
           "excess_kl": "eval/frontier/excess_kl"}


def run_once(config: str, run_dir: str, seed: str, variant_flags: Sequence[str]) -> None:
  """Runs `experiments/run.py` into `run_dir` unless it has finished there; records its wall time."""
  if os.path.exists(os.path.join(run_dir, "report.json")):
    return
  command = [sys.executable, os.path.join(REPO, "experiments", "run.py"), f"--config={os.path.join(REPO, config)}",
             f"--workdir={run_dir}", f"--config.seed={seed}", *variant_flags, *_EXTRA.value]
  print(" ".join(command[1:]), flush=True)
  start = time.perf_counter()
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(run_dir, "wall_time.json"), "w", encoding="utf-8") as f:
    json.dump({"seconds": time.perf_counter() - start, "load_average": os.getloadavg()}, f)


def summarize_variant(variant_dir: str, at_step: int | None = None, near_kl: float | None = None) -> dict | None:
  """Mean ± standard error over the finished seeds of a variant of the metrics of the evaluation at `at_step`
  (None: the last) or of KL nearest to `near_kl`, and of the most negative gap up to it."""
  finals, worst_gaps, seconds = [], [], []
  for seed in sorted(os.listdir(variant_dir)):
    if not os.path.exists(os.path.join(variant_dir, seed, "report.json")):
      continue
    records = plots.read_eval_records(os.path.join(variant_dir, seed))
    if near_kl is not None:
      nearest = min(records, key=lambda r: abs(r[COLUMNS["kl"]] - near_kl))
      records = records[:records.index(nearest) + 1]
    records = [r for r in records if at_step is None or r["step"] <= at_step]
    if not records or (at_step is not None and records[-1]["step"] != at_step):
      continue
    finals.append(records[-1])
    worst_gaps.append(min(r["eval/frontier/gap"] for r in records))
    with open(os.path.join(variant_dir, seed, "wall_time.json"), encoding="utf-8") as f:
      seconds.append(json.load(f)["seconds"])
  if not finals:
    return None
  steps = sorted({r["step"] for r in finals})
  row = {"seeds": len(finals), "steps": "/".join(map(str, steps)), "seconds": float(np.mean(seconds))}
  for name, key in COLUMNS.items():
    values = [r[key] for r in finals]
    row[name], row[name + "_se"] = float(np.mean(values)), evaluation.standard_error(values)
    row[name + "_eval_se"] = float(np.mean([r.get(key + evaluation.SE_SUFFIX, np.nan) for r in finals]))
  row["worst_gap"], row["worst_gap_se"] = float(np.mean(worst_gaps)), evaluation.standard_error(worst_gaps)
  return row


def format_table(rows: dict[str, dict]) -> str:
  """The table as Markdown: mean ± standard error over seeds; for a single seed, ± its evaluation's standard error
  over prompts, marked `*` (the worst gap of a single seed has none)."""
  def cell(row, name, digits):
    if row["seeds"] > 1:
      return f"{row[name]:.{digits}f} ± {row[name + '_se']:.{digits}f}"
    spread = row.get(name + "_eval_se", float("nan"))
    return f"{row[name]:.{digits}f}" + ("" if np.isnan(spread) else f" ± {spread:.{digits}f}*")
  lines = ["| variant | seeds | steps | KL(π ‖ π_ref) | quantile | gap to frontier | excess KL | worst gap | s/run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for variant, row in rows.items():
    lines.append(f"| {variant} | {row['seeds']} | {row['steps']} | {cell(row, 'kl', 2)} | {cell(row, 'quantile', 3)} | "
                 f"{cell(row, 'gap', 3)} | {cell(row, 'excess_kl', 2)} | {cell(row, 'worst_gap', 3)} | "
                 f"{row['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  config, study_flags, variants = STUDIES[_STUDY.value]
  chosen = _VARIANTS.value or list(variants)
  unknown = [v for v in chosen if v not in variants]
  if unknown:
    raise app.UsageError(f"--variants: {unknown} are not variants of study {_STUDY.value!r}: {list(variants)}.")
  study_dir = os.path.join(_WORKDIR.value, _STUDY.value)
  if not _TABLE_ONLY.value:
    for variant in chosen:
      for seed in _SEEDS.value:
        run_once(config, os.path.join(study_dir, variant, f"seed{seed}"), seed, (*study_flags, *variants[variant]))
  rows = {}
  for variant in variants:
    if os.path.isdir(os.path.join(study_dir, variant)):
      row = summarize_variant(os.path.join(study_dir, variant), _AT_STEP.value, _NEAR_KL.value)
      if row is not None:
        rows[variant] = row
  table = format_table(rows)
  print(table)
  name = "table" + (f"_step{_AT_STEP.value}" if _AT_STEP.value is not None else "") + (
      f"_kl{_NEAR_KL.value:g}" if _NEAR_KL.value is not None else "")
  with open(os.path.join(study_dir, f"{name}.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  with open(os.path.join(study_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
