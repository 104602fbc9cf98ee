r"""The paper's comparison: reward quantile and reward against KL(π || π_ref) for the `configs/pareto.py` runs, over
seeds.

  for s in 0 1 2; do for m in jbond bond_beta0 bond_beta05 bond_beta1 reinforce_0.01 reinforce_0.1 reinforce_0.5; do
    python experiments/run.py --config=configs/pareto.py:$m --workdir=/tmp/pareto/$m/seed$s --config.seed=$s
  done; done
  python experiments/run.py --config=configs/pareto.py:bon --workdir=/tmp/pareto/bon/seed0
  python experiments/plot.py --workdir=/tmp/pareto --out=docs

Reads `<workdir>/<method>/seed<s>/metrics.jsonl` for every method and seed present: the held-out evaluations along
training, starting at the reference. Each method is drawn as the mean over its seeds at each evaluation, with error
bars of one standard error over seeds (a single seed: over its evaluation's prompts). Best-of-N (its empirical
reward and quantile at its exact KL) and the frontier
(Best-of-N's quantile against its exact KL) come from the final evaluation of the `bon` run (128 reference samples
per held-out prompt; empirical Best-of-N up to N = 64). Writes `<out>/pareto_quantile.png`, `<out>/pareto_reward.png`
and the numbers in `<out>/pareto.json`, and prints them.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from matplotlib.figure import Figure

from bond_jax import paths  # pylint: disable=g-import-not-at-top
from bond_jax import plots

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding <method>/seed<s> run workdirs.")
_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs and pareto.json; default: --workdir.")
_METHODS = flags.DEFINE_list(
    "methods", ["jbond", "bond_beta0", "bond_beta05", "bond_beta1", "reinforce_0.01", "reinforce_0.1",
                "reinforce_0.5"], "Run subdirectories to draw (missing ones are skipped).")
_BON = flags.DEFINE_string("bon", "bon", "Method whose final evaluation gives the Best-of-N points and frontier "
                           "(absent: the first seed of the first method drawn).")
flags.mark_flag_as_required("workdir")

TITLES = {"quantile": "Reward quantile vs KL to the reference (default task)",
          "reward": "Reward vs KL to the reference (default task)"}


def label(method: str) -> str:
  """A legend label for a `configs/pareto.py` method name."""
  if method == "jbond":
    return "J-BOND (β = 0.5, η = 0.02)"
  if method.startswith("bond_beta"):
    beta = {"0": "0", "05": "0.5", "1": "1"}.get(method[len("bond_beta"):], method[len("bond_beta"):])
    return f"BOND, N = 8, β = {beta}"
  if method.startswith("reinforce_"):
    return f"REINFORCE, β_KL = {method[len('reinforce_'):]}"
  return method


def seed_dirs(method_dir: paths.Path) -> list[paths.Path]:
  """The run workdirs `<method_dir>/seed<s>` that hold evaluations, in seed order."""
  if not method_dir.is_dir():
    return []
  seeds = [d for d in method_dir.iterdir() if d.name.startswith("seed") and d.name[len("seed"):].isdigit()]
  return sorted((d for d in seeds if (d / "metrics.jsonl").exists()), key=lambda d: int(d.name[len("seed"):]))


def main(argv):
  del argv
  out = paths.as_path(_OUT.value or _WORKDIR.value)
  out.mkdir(parents=True, exist_ok=True)
  runs = {m: seed_dirs(paths.as_path(_WORKDIR.value) / m) for m in _METHODS.value}
  curves = {m: plots.mean_curve([plots.eval_curve(plots.read_eval_records(d)) for d in dirs])
            for m, dirs in runs.items() if dirs}
  # Every evaluation holds Best-of-N and the frontier on its prompts; the `bon` run's have more reference samples.
  bon_dirs = seed_dirs(paths.as_path(_WORKDIR.value) / _BON.value) or next(iter(d for d in runs.values() if d), [])
  final = plots.read_eval_records(bon_dirs[0])[-1] if bon_dirs else None
  bon = plots.best_of_n_points(final) if final else []
  frontier = plots.frontier_points(final) if final else []

  written = []
  for metric, title in TITLES.items():
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    legend = {f"{label(m)} ({len(runs[m])} seed{'s' * (len(runs[m]) > 1)})": c for m, c in curves.items()}
    plots.draw(ax, metric, legend, bon, frontier)
    ax.set_title(title)
    fig.tight_layout()
    written.append(out / f"pareto_{metric}.png")
    with written[-1].open("wb") as f:
      fig.savefig(f, format="png", dpi=120)

  paths.write_whole(out / "pareto.json", json.dumps({"seeds": {m: len(d) for m, d in runs.items()}, "runs": curves,
                                                     "best_of_n": bon, "frontier": frontier}, indent=2))
  print(f"{'method':<16} {'seeds':>5} {'step':>5} {'KL(.||ref)':>13} {'reward':>13} {'quantile':>13} "
        f"{'gap to frontier':>16}")
  for m, rows in curves.items():
    for r in rows[1:]:
      cells = " ".join(f"{r[k]:>6.3f} ± {r[k + '_se']:.3f}" for k in ("kl", "reward", "quantile", "gap"))
      print(f"{m:<16} {len(runs[m]):>5} {r['step']:>5} {cells}")
  for p in bon:
    print(f"{'best_of_' + str(p['n']):<16} {'':>5} {'':>5} {p['kl']:>6.3f}         {p['reward']:>6.3f} ± "
          f"{p['reward_se']:.3f} {p['quantile']:>6.3f} ± {p['quantile_se']:.3f}  (tie-free KL {p['kl_bound']:.3f})")
  print("\n".join(f"wrote {p}" for p in written))


if __name__ == "__main__":
  app.run(main)
