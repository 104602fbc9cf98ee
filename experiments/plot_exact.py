r"""Plots the exact KLs that `configs/exact.py` and `configs/exact_iterative.py` runs log in `metrics.jsonl`.

  for b in 0.0 0.5 1.0; do
    python experiments/run.py --config=configs/exact.py --workdir=/tmp/bond_exact_beta$b --config.bond.beta=$b
  done
  python experiments/run.py --config=configs/exact_iterative.py --workdir=/tmp/bond_exact_iterative
  python experiments/plot_exact.py --runs=/tmp/bond_exact_beta0.0,/tmp/bond_exact_beta0.5,/tmp/bond_exact_beta1.0 \
      --iterative=/tmp/bond_exact_iterative --out=/tmp/bond_exact_plots

Writes, under --out:
- `exact_kl_to_bon.png`: KL(π || π_BoN) and KL(π_BoN || π) over steps, one line per run (β), with the 0.05 nats
  target;
- `exact_kl_to_ref.png`: KL(π || π_ref) over steps against the exact KL(π_BoN || π_ref) and log N - (N-1)/N;
- `exact_iterative.png`: KL(π || BoN_M(π_ref)) over steps for each logged M, anchor moves marked, and
  KL(π || π_ref) climbing the KL(BoN_M || π_ref) levels.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import matplotlib
import ml_collections

from bond_jax import algorithms
from bond_jax import paths

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_RUNS = flags.DEFINE_list("runs", [], "Workdirs of one-shot BOND runs (configs/exact.py), one line each.")
_ITERATIVE = flags.DEFINE_string("iterative", "", "Workdir of an iterative run (configs/exact_iterative.py).")
_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs.")
flags.mark_flag_as_required("out")

TARGET_KL = 0.05  # nats: the exact KL(π || π_BoN) a one-shot run must end below.


def read_run(workdir: str) -> tuple[algorithms.Algorithm, dict[str, list[tuple[int, float]]]]:
  """(the run's algorithm, {metric: [(step, value), ...]}) of a run's exact metrics."""
  run = paths.as_path(workdir)  # Local or in a bucket.
  algorithm = algorithms.from_config(ml_collections.ConfigDict(json.loads((run / "config.json").read_text())))
  series: dict[str, list[tuple[int, float]]] = {}
  for line in (run / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    for key, value in record.items():
      if key.startswith("exact/") and value is not None:
        series.setdefault(key, []).append((record["step"], value))
  if "exact/kl_pi_bon" not in series:
    raise ValueError(f"{workdir}/metrics.jsonl has no exact/* metrics: was it run with config.exact.every > 0?")
  return algorithm, series


def _xy(points):
  return [s for s, _ in points], [v for _, v in points]


def _save(fig, out: str, name: str) -> str:
  """Writes `fig` as `out/name` (a PNG; `out` local or in a bucket), closes it, and returns the path."""
  path = paths.as_path(out) / name
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
  return str(path)


def plot_one_shot(runs: list[tuple[algorithms.Algorithm, dict]], out: str) -> list[str]:
  """The two one-shot figures; returns their paths."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for algorithm, series in runs:
    label = f"β = {algorithm.beta:g}"
    for ax, key in zip(axes, ("exact/kl_pi_bon", "exact/kl_bon_pi")):
      ax.plot(*_xy(series[key]), label=label)
  n = runs[0][0].target_n()
  for ax, title in zip(axes, (f"KL(π || BoN_{n}(π_ref))", f"KL(BoN_{n}(π_ref) || π)")):
    ax.axhline(TARGET_KL, color="k", ls=":", label=f"{TARGET_KL} nats")
    ax.set(yscale="log", xlabel="step", title=f"exact {title}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("nats")
  axes[0].legend()
  written = [_save(fig, out, "exact_kl_to_bon.png")]

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for algorithm, series in runs:
    ax.plot(*_xy(series["exact/kl_pi_ref"]), label=f"KL(π || π_ref), β = {algorithm.beta:g}")
  exact_kl, closed_form = runs[0][1]["exact/kl_bon_ref"][-1][1], math.log(n) - (n - 1) / n
  ax.axhline(exact_kl, color="k", label=f"exact KL(BoN_{n} || π_ref) = {exact_kl:.4f}")
  ax.axhline(closed_form, color="k", ls="--", label=f"log {n} - {n - 1}/{n} = {closed_form:.4f} (no atoms)")
  ax.set(xlabel="step", ylabel="nats", title="policy's KL to the reference vs Best-of-N's")
  ax.grid(alpha=0.3)
  ax.legend()
  return written + [_save(fig, out, "exact_kl_to_ref.png")]


def plot_iterative(algorithm: algorithms.Algorithm, series: dict, out: str) -> str:
  """The iterative figure; returns its path."""
  sizes = sorted(int(key[len("exact/kl_pi_bon"):]) for key in series
                 if key.startswith("exact/kl_pi_bon") and key[len("exact/kl_pi_bon"):].isdigit())
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  colors = plt.cm.viridis([i / max(len(sizes) - 1, 1) for i in range(len(sizes))])
  for m, color in zip(sizes, colors):
    axes[0].plot(*_xy(series[f"exact/kl_pi_bon{m}"]), color=color, label=f"KL(π || BoN_{m})")
    axes[1].axhline(series[f"exact/kl_bon{m}_ref"][-1][1], color=color, ls="--", label=f"KL(BoN_{m} || π_ref)")
  axes[1].plot(*_xy(series["exact/kl_pi_ref"]), color="k", label="KL(π || π_ref)")
  schedule = algorithm.anchor
  if schedule.mode == "periodic":
    last_step = max(step for step, _ in series["exact/kl_pi_ref"])
    for ax in axes:
      for step in range(schedule.period, last_step, schedule.period):
        ax.axvline(step, color="grey", lw=0.8, ls=":")
  anchor = schedule.mode + (f" every {schedule.period} steps" if schedule.mode == "periodic" else "")
  axes[0].set(yscale="log", xlabel="step (dotted: anchor moves)", ylabel="nats",
              title=f"{algorithm.name} n = {algorithm.target_n()}, anchor {anchor}: exact KL to BoN_M(π_ref)")
  axes[1].set(xlabel="step", ylabel="nats", title="policy's KL to the reference vs BoN_M's")
  for ax, corner in zip(axes, ("upper right", "lower right")):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=corner)
  return _save(fig, out, "exact_iterative.png")


def main(argv):
  del argv
  paths.as_path(_OUT.value).mkdir(parents=True, exist_ok=True)
  written = []
  if _RUNS.value:
    written += plot_one_shot([read_run(w) for w in _RUNS.value], _OUT.value)
  if _ITERATIVE.value:
    written.append(plot_iterative(*read_run(_ITERATIVE.value), _OUT.value))
  print("\n".join(written))


if __name__ == "__main__":
  app.run(main)
