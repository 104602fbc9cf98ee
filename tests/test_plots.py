"""The reward/quantile-vs-KL plots (`bond_jax/plots.py`) and the comparison's configs (`configs/pareto.py`)."""

import importlib.util
import json
import math
import os

import matplotlib.image
import pytest

from bond_jax import algorithms
from bond_jax import evaluation
from bond_jax import plots
from bond_jax import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_record(step: int, kl: float) -> dict:
  frontier = {f"eval/frontier/{metric}/bon_{n}": value for n in evaluation.FRONTIER_NS for metric, value in (
      ("kl", math.log(n) - (n - 1) / n), ("quantile", n / (n + 1)))}
  return {"step": step, "eval/kl/policy_ref": kl, "eval/kl/policy_ref/se": 0.05, "eval/reward/policy": 0.1 * step,
          "eval/reward/policy/se": 0.01, "eval/quantile/policy": 0.5 + 0.01 * step, "eval/quantile/policy/se": 0.02,
          "eval/reward/reference": -0.2, "eval/quantile/reference": 0.49, "eval/reward/bon_2": 0.3,
          "eval/quantile/bon_2": 0.66, "eval/quantile/bon_2/se": 0.004, "eval/kl/bon_2": 0.19,
          "eval/reward/bon_16": 0.9, "eval/quantile/bon_16": 0.93, "eval/kl/bon_16": 1.8,
          "eval/frontier/gap": -0.1, "eval/frontier/gap/se": 0.01, **frontier}


@pytest.fixture
def workdir(tmp_path) -> str:
  records = [{"step": 10, "reward/policy": 0.0}, _eval_record(25, 0.3), {"step": 30, "reward/policy": 1.0},
             _eval_record(50, 0.8)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(tmp_path)


def test_curve_starts_at_the_reference_and_follows_the_evaluations(workdir):
  curve = plots.eval_curve(plots.read_eval_records(workdir))
  assert [(r["step"], r["kl"], r["reward"], r["quantile"]) for r in curve] == [
      (0, 0.0, -0.2, 0.49), (25, 0.3, 2.5, 0.75), (50, 0.8, 5.0, 1.0)]
  assert [(r["kl_se"], r["quantile_se"]) for r in curve] == [(0.0, 0.0), (0.05, 0.02), (0.05, 0.02)]


def test_best_of_n_points_sit_at_their_exact_kl(workdir):
  points = plots.best_of_n_points(plots.read_eval_records(workdir)[-1])
  assert [p["n"] for p in points] == [1, 2, 16]
  assert [p["kl"] for p in points] == [0.0, 0.19, 1.8]
  for p in points:
    assert p["kl_bound"] == pytest.approx(math.log(p["n"]) - (p["n"] - 1) / p["n"])
  assert (points[0]["reward"], points[0]["quantile"]) == (-0.2, 0.49)  # Best-of-1 is the reference.
  assert (points[1]["quantile"], points[1]["quantile_se"]) == (0.66, 0.004)
  assert (points[2]["reward"], points[2]["quantile"]) == (0.9, 0.93)


def test_frontier_points_follow_the_record(workdir):
  frontier = plots.frontier_points(plots.read_eval_records(workdir)[-1])
  assert [p["n"] for p in frontier] == list(evaluation.FRONTIER_NS)
  assert frontier[3]["quantile"] == pytest.approx(0.8) and frontier[3]["kl"] == pytest.approx(math.log(4) - 0.75)


def test_plot_run_writes_a_png(workdir):
  path = plots.plot_run(workdir)
  assert path == os.path.join(workdir, "tradeoff.png")
  height, width, _ = matplotlib.image.imread(path).shape
  assert width > height > 100


def test_a_run_without_evaluations_is_named(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/policy": 0.0}) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no evaluation records"):
    plots.read_eval_records(str(tmp_path))


def _pareto(method: str):
  spec = importlib.util.spec_from_file_location("pareto_config", os.path.join(REPO, "configs", "pareto.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(method)


@pytest.mark.parametrize("method,algorithm", [("jbond", algorithms.JBond), ("bond_beta05", algorithms.Bond),
                                              ("reinforce_0.1", algorithms.Reinforce), ("bon", algorithms.JBond)])
def test_pareto_configs_are_valid(method, algorithm):
  config = _pareto(method)
  run_config.validate(config, num_devices=8)
  assert type(algorithms.from_config(config)) is algorithm


@pytest.mark.parametrize("method", ["reinforce_", "reinforce_x", "reinforce_-1", "ppo"])
def test_pareto_rejects_unknown_methods(method):
  with pytest.raises(ValueError, match="configs/pareto.py"):
    _pareto(method)
