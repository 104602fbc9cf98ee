"""Reward and reward quantile against KL(π || π_ref) along training, with Best-of-N of the reference.

Reads the held-out evaluation records a run writes to `metrics.jsonl` (`eval/kl/policy_ref`,
`eval/reward/policy`, `eval/quantile/policy`, `eval/reward/bon_N`, `eval/quantile/bon_N`). Best-of-N sits at the
analytic `KL(π_BoN || π_ref) = log N - (N-1)/N` (exact without ties; ties are rare on the default task) with its
empirical reward and quantile, and the analytic quantile `N/(N+1)`. Uses matplotlib's object API (no pyplot), so
importing this module changes no global backend.

Example:
  >>> plot_run("/tmp/bond_default")   # writes /tmp/bond_default/tradeoff.png
"""

from collections.abc import Mapping, Sequence
import json
import re

from matplotlib.axes import Axes
from matplotlib.figure import Figure
import numpy as np

from bond_jax import paths
from bond_jax import quantiles

METRICS = {"quantile": "reward quantile against the reference (held-out)",
           "reward": "reward (held-out)"}
_BON_KEY = re.compile(r"eval/reward/bon_(\d+)$")


def read_eval_records(workdir: paths.PathLike) -> list[dict]:
  """The evaluation records (those with `eval/reward/policy`) of `workdir/metrics.jsonl`, in order (`workdir`: any
  path `paths` speaks)."""
  text = (paths.as_path(workdir) / "metrics.jsonl").read_text()
  records = [r for r in map(json.loads, text.splitlines()) if "eval/reward/policy" in r]
  if not records:
    raise ValueError(f"{workdir}/metrics.jsonl has no evaluation records (eval/reward/policy).")
  return records


def eval_curve(records: Sequence[dict]) -> list[dict[str, float]]:
  """`[{step, kl, reward, quantile}]` of the policy at each evaluation, led by the reference at step 0, KL 0."""
  first = records[0]
  curve = [{"step": 0, "kl": 0.0, "reward": first["eval/reward/reference"],
            "quantile": first["eval/quantile/reference"]}]
  return curve + [{"step": r["step"], "kl": r["eval/kl/policy_ref"], "reward": r["eval/reward/policy"],
                   "quantile": r["eval/quantile/policy"]} for r in records]


def best_of_n_points(record: Mapping[str, float]) -> list[dict[str, float]]:
  """`[{n, kl, reward, quantile, analytic_quantile}]` for N = 1 and every `eval/reward/bon_N` of an eval record.

  Best-of-1 is the reference itself (`eval/reward/reference`, `eval/quantile/reference`) unless logged as `bon_1`.
  """
  key = lambda n, metric: f"eval/{metric}/bon_{n}" if f"eval/reward/bon_{n}" in record else f"eval/{metric}/reference"
  ns = sorted({1} | {int(m.group(1)) for m in map(_BON_KEY.match, record) if m})
  return [{"n": n, "kl": quantiles.bon_kl_upper_bound(n), "reward": record[key(n, "reward")],
           "quantile": record[key(n, "quantile")], "analytic_quantile": quantiles.bon_expected_quantile(n)}
          for n in ns]


def draw(ax: Axes, metric: str, curves: Mapping[str, Sequence[Mapping[str, float]]],
         bon: Sequence[Mapping[str, float]], max_analytic_n: int = 64) -> None:
  """Draws `metric` ("quantile" or "reward") against KL: one line per curve, Best-of-N points, labels, legend.

  Args:
    ax: the axes to draw on.
    metric: "quantile" or "reward".
    curves: label -> `eval_curve(...)` rows.
    bon: `best_of_n_points(...)` rows (empirical); for "quantile" the analytic `N/(N+1)` curve for
      N = 1..max_analytic_n is drawn too.
    max_analytic_n: largest N of the analytic curve.
  """
  if metric not in METRICS:
    raise ValueError(f"metric = {metric!r} is not allowed: expected one of {tuple(METRICS)}.")
  for label, rows in curves.items():
    ax.plot([r["kl"] for r in rows], [r[metric] for r in rows], marker="o", markersize=3, label=label)
  if metric == "quantile":
    ns = np.arange(1, max_analytic_n + 1)
    ax.plot(np.log(ns) - (ns - 1) / ns, ns / (ns + 1), "k:", label=f"Best-of-N, analytic N/(N+1), N = 1..{ns[-1]}")
  if bon:
    ax.plot([p["kl"] for p in bon], [p[metric] for p in bon], "ks--", markersize=4,
            label="Best-of-N of the reference, empirical")
    for p in bon:
      ax.annotate(f"{p['n']}", (p["kl"], p[metric]), textcoords="offset points", xytext=(4, -10), fontsize=7)
  ax.set_xlabel("KL(π || π_ref), nats (held-out prompts; Best-of-N: log N - (N-1)/N)")
  ax.set_ylabel(METRICS[metric])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")


def plot_run(workdir: paths.PathLike) -> str:
  """Writes `workdir/tradeoff.png` (quantile and reward against KL over the run, with Best-of-N); returns its path.

  Best-of-N comes from the run's last evaluation (`config.eval.bon_ns`).
  """
  records = read_eval_records(workdir)
  curves, bon = {"policy": eval_curve(records)}, best_of_n_points(records[-1])
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  for ax, metric in zip(axes, METRICS):
    draw(ax, metric, curves, bon, max_analytic_n=max([p["n"] for p in bon], default=16))
  workdir = paths.as_path(workdir)
  fig.suptitle(f"{workdir.name}: policy along training vs Best-of-N of the "
               "reference")
  fig.tight_layout()
  path = workdir / "tradeoff.png"
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return str(path)
