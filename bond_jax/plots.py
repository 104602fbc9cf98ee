"""Reward and reward quantile against KL(π || π_ref) along training, with Best-of-N of the reference and its frontier.

Reads the held-out evaluation records a run writes to `metrics.jsonl` (`evaluation.summarize`: `eval/kl/policy_ref`,
`eval/reward/policy`, `eval/quantile/policy`, `eval/reward/bon_N`, `eval/quantile/bon_N`, `eval/kl/bon_N`, each
with its standard error `.../se`, and the frontier `eval/frontier/{kl,quantile}/bon_N`). Points carry error bars of
one standard error. Best-of-N sits at its exact KL (ties included) with its empirical reward and quantile, and the
frontier, Best-of-N's expected quantile against its KL for N up to 8192, is drawn as a line in every quantile plot.
Uses matplotlib's object API (no pyplot), so importing this module changes no global backend.

Example:
  >>> import json, math, os, tempfile
  >>> workdir = tempfile.mkdtemp()
  >>> frontier = {f"eval/frontier/{metric}/bon_{n}": value for n in evaluation.FRONTIER_NS
  ...             for metric, value in (("kl", math.log(n) - (n - 1) / n), ("quantile", n / (n + 1)))}
  >>> record = {"step": 100, "eval/reward/policy": 0.7, "eval/quantile/policy": 0.8, "eval/kl/policy_ref": 1.0,
  ...           "eval/reward/reference": 0.1, "eval/quantile/reference": 0.5, "eval/frontier/gap": -0.06,
  ...           "eval/frontier/gap/se": 0.01, **frontier}
  >>> with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
  ...   _ = f.write(json.dumps(record) + "\\n")
  >>> os.path.basename(plot_run(workdir))
  'tradeoff.png'
"""

from collections.abc import Mapping, Sequence
import json
import re

from matplotlib.axes import Axes
from matplotlib.figure import Figure
import numpy as np

from bond_jax import evaluation
from bond_jax import paths
from bond_jax import quantiles

METRICS = {"quantile": "reward quantile against the reference (held-out)",
           "reward": "reward (held-out)"}
_BON_KEY = re.compile(r"eval/reward/bon_(\d+)$")
_SE = evaluation.SE_SUFFIX


def read_eval_records(workdir: paths.PathLike) -> list[dict]:
  """The evaluation records (those with `eval/reward/policy`) of `workdir/metrics.jsonl`, in order (`workdir`: any
  path `paths` speaks)."""
  text = (paths.as_path(workdir) / "metrics.jsonl").read_text()
  records = [r for r in map(json.loads, text.splitlines()) if "eval/reward/policy" in r]
  if not records:
    raise ValueError(f"{workdir}/metrics.jsonl has no evaluation records (eval/reward/policy).")
  return records


def _point(record: Mapping[str, float], reward: str, quantile: str, kl: str | None) -> dict[str, float]:
  """`{kl, reward, quantile}` and their standard errors (`kl_se`, ...) from an eval record's keys (`kl` None: 0)."""
  point = {}
  for field, key in (("kl", kl), ("reward", reward), ("quantile", quantile)):
    point[field] = 0.0 if key is None else record[key]
    point[field + "_se"] = 0.0 if key is None else record.get(key + _SE, 0.0)
  return point


def eval_curve(records: Sequence[dict]) -> list[dict[str, float]]:
  """`[{step, kl, reward, quantile, gap, kl_se, reward_se, quantile_se, gap_se}]` of the policy at each evaluation
  (`gap`: its quantile minus the frontier's at its KL), led by the reference at step 0, KL 0, gap 0."""
  first = records[0]
  curve = [{"step": 0, **_point(first, "eval/reward/reference", "eval/quantile/reference", None), "gap": 0.0,
            "gap_se": 0.0}]
  return curve + [{"step": r["step"], **_point(r, "eval/reward/policy", "eval/quantile/policy", "eval/kl/policy_ref"),
                   "gap": r["eval/frontier/gap"], "gap_se": r["eval/frontier/gap" + _SE]} for r in records]


def mean_curve(curves: Sequence[Sequence[Mapping[str, float]]]) -> list[dict[str, float]]:
  """The mean over seeds of `eval_curve`s at the steps they all have, each `..._se` the standard error over seeds;
  a single curve is returned as it is (its `..._se` are its evaluations' standard errors over prompts).

  Example:
    >>> mean_curve([[{"step": 0, "kl": 1.0}], [{"step": 0, "kl": 2.0}, {"step": 5, "kl": 3.0}]])
    [{'step': 0, 'kl': 1.5, 'kl_se': 0.5}]
    >>> mean_curve([[{"step": 0, "kl": 1.0, "kl_se": 0.1}]])  # One seed: the evaluation's standard error.
    [{'step': 0, 'kl': 1.0, 'kl_se': 0.1}]
  """
  if len(curves) == 1:
    return [dict(row) for row in curves[0]]
  by_step = [{row["step"]: row for row in curve} for curve in curves]
  steps = sorted(set.intersection(*(set(rows) for rows in by_step)))
  fields = [f for f in curves[0][0] if f != "step" and not f.endswith("_se")]
  return [{"step": step, **{name: value for field in fields for name, value in (
              (field, float(np.mean([rows[step][field] for rows in by_step]))),
              (field + "_se", evaluation.standard_error([rows[step][field] for rows in by_step])))}}
          for step in steps]


def best_of_n_points(record: Mapping[str, float]) -> list[dict[str, float]]:
  """`[{n, kl, reward, quantile, ..._se, kl_bound}]` for N = 1 and every `eval/reward/bon_N` of an eval record.

  `kl` is Best-of-N's exact KL with ties (`eval/kl/bon_N`), `kl_bound` the tie-free `log N - (N-1)/N`. Best-of-1
  is the reference itself (`eval/reward/reference`, `eval/quantile/reference`) unless logged as `bon_1`.
  """
  ns = sorted({1} | {int(m.group(1)) for m in map(_BON_KEY.match, record) if m})
  points = []
  for n in ns:
    name = f"bon_{n}" if f"eval/reward/bon_{n}" in record else "reference"
    kl = f"eval/kl/bon_{n}" if f"eval/kl/bon_{n}" in record else None
    points.append({"n": n, **_point(record, f"eval/reward/{name}", f"eval/quantile/{name}", kl),
                   "kl_bound": quantiles.bon_kl_upper_bound(n)})
  return points


def frontier_points(record: Mapping[str, float]) -> list[dict[str, float]]:
  """`[{n, kl, quantile}]`: the Best-of-N frontier of an eval record (`evaluation.frontier_points`)."""
  return evaluation.frontier_points({key[len("eval/"):]: value for key, value in record.items()
                                     if key.startswith("eval/frontier/")})


def draw(ax: Axes, metric: str, curves: Mapping[str, Sequence[Mapping[str, float]]],
         bon: Sequence[Mapping[str, float]], frontier: Sequence[Mapping[str, float]] = ()) -> None:
  """Draws `metric` ("quantile" or "reward") against KL: one line per curve with error bars, Best-of-N points, the
  frontier (quantile only), labels, legend.

  Args:
    ax: the axes to draw on.
    metric: "quantile" or "reward".
    curves: label -> `eval_curve(...)` rows (`kl_se` and `{metric}_se` give the error bars when present).
    bon: `best_of_n_points(...)` rows (empirical reward and quantile at the exact KL).
    frontier: `frontier_points(...)` rows, drawn as a line for "quantile" and bounding the x axis's range.
  """
  if metric not in METRICS:
    raise ValueError(f"metric = {metric!r} is not allowed: expected one of {tuple(METRICS)}.")
  for label, rows in curves.items():
    ax.errorbar([r["kl"] for r in rows], [r[metric] for r in rows], xerr=[r.get("kl_se", 0.0) for r in rows],
                yerr=[r.get(f"{metric}_se", 0.0) for r in rows], marker="o", markersize=3, capsize=2, label=label)
  if bon:
    ax.errorbar([p["kl"] for p in bon], [p[metric] for p in bon], yerr=[p.get(f"{metric}_se", 0.0) for p in bon],
                fmt="ks--", markersize=4, capsize=2, label="Best-of-N of the reference, empirical")
    for p in bon:
      ax.annotate(f"{p['n']}", (p["kl"], p[metric]), textcoords="offset points", xytext=(4, -10), fontsize=7)
  if frontier and metric == "quantile":
    most_kl = max([r["kl"] for rows in curves.values() for r in rows] + [p["kl"] for p in bon] + [1.0])
    shown = [p for p in frontier if p["kl"] <= 1.15 * most_kl + 0.2]
    ax.plot([p["kl"] for p in shown], [p["quantile"] for p in shown], "k-", linewidth=1, alpha=0.6,
            label=f"Best-of-N frontier, exact (N = 1..{shown[-1]['n']})")
  ax.set_xlabel("KL(π || π_ref), nats (held-out prompts; Best-of-N: exact, ties included)")
  ax.set_ylabel(METRICS[metric])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")


def plot_run(workdir: paths.PathLike) -> str:
  """Writes `workdir/tradeoff.png` (quantile and reward against KL over the run, with Best-of-N and its frontier);
  returns its path.

  Best-of-N and the frontier come from the run's last evaluation (`config.eval.bon_ns`).
  """
  records = read_eval_records(workdir)
  curves, bon, frontier = {"policy": eval_curve(records)}, best_of_n_points(records[-1]), frontier_points(records[-1])
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  for ax, metric in zip(axes, METRICS):
    draw(ax, metric, curves, bon, frontier)
  workdir = paths.as_path(workdir)
  fig.suptitle(f"{workdir.name}: policy along training vs Best-of-N of the "
               "reference")
  fig.tight_layout()
  path = workdir / "tradeoff.png"
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return str(path)
