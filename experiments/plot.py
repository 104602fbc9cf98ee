r"""The paper's comparison: reward quantile and reward against KL(π || π_ref) for the `configs/pareto.py` runs.

  for m in jbond bond_beta0 bond_beta05 bond_beta1 reinforce_0.01 reinforce_0.1 reinforce_0.5 bon; do
    python experiments/run.py --config=configs/pareto.py:$m --workdir=/tmp/pareto/$m
  done
  python experiments/plot.py --workdir=/tmp/pareto --out=docs

Reads `<workdir>/<method>/metrics.jsonl` for every method present (one line each, the held-out evaluations along
training, starting at the reference) and the Best-of-N points from the `bon` run's final evaluation (empirical
reward and quantile from 64 reference samples per prompt, at the analytic KL `log N - (N-1)/N`; and the analytic
quantile `N/(N+1)`). Writes `<out>/pareto_quantile.png`, `<out>/pareto_reward.png` and the numbers in
`<out>/pareto.json`, and prints them.
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

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one run workdir per method.")
_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs and pareto.json; default: --workdir.")
_METHODS = flags.DEFINE_list(
    "methods", ["jbond", "bond_beta0", "bond_beta05", "bond_beta1", "reinforce_0.01", "reinforce_0.1",
                "reinforce_0.5"], "Run subdirectories to draw (missing ones are skipped).")
_BON = flags.DEFINE_string("bon", "bon", "Run subdirectory whose final evaluation gives the Best-of-N points.")
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


def main(argv):
  del argv
  out = paths.as_path(_OUT.value or _WORKDIR.value)
  out.mkdir(parents=True, exist_ok=True)
  run_dir = lambda m: paths.as_path(_WORKDIR.value) / m
  methods = [m for m in _METHODS.value if (run_dir(m) / "metrics.jsonl").exists()]
  curves = {m: plots.eval_curve(plots.read_eval_records(run_dir(m))) for m in methods}
  bon_run = run_dir(_BON.value)
  bon = plots.best_of_n_points(plots.read_eval_records(bon_run)[-1]) if (bon_run / "metrics.jsonl").exists() else []

  written = []
  for metric, title in TITLES.items():
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    plots.draw(ax, metric, {label(m): c for m, c in curves.items()}, bon)
    ax.set_title(title)
    fig.tight_layout()
    written.append(out / f"pareto_{metric}.png")
    with written[-1].open("wb") as f:
      fig.savefig(f, format="png", dpi=120)

  paths.write_whole(out / "pareto.json", json.dumps({"runs": curves, "best_of_n": bon}, indent=2))
  print(f"{'method':<16} {'step':>5} {'KL(.||ref)':>10} {'reward':>8} {'quantile':>8}")
  for m, rows in curves.items():
    for r in rows[1:]:
      print(f"{m:<16} {r['step']:>5} {r['kl']:>10.3f} {r['reward']:>8.3f} {r['quantile']:>8.3f}")
  for p in bon:
    print(f"{'best_of_' + str(p['n']):<16} {'':>5} {p['kl']:>10.3f} {p['reward']:>8.3f} {p['quantile']:>8.3f}"
          f"  (analytic quantile {p['analytic_quantile']:.3f})")
  print("\n".join(f"wrote {p}" for p in written))


if __name__ == "__main__":
  app.run(main)
