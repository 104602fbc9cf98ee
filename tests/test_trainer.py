"""The trainer on a tiny random policy: sharded steps against one device, every algorithm and anchor mode, resume
(also past an unreadable checkpoint) and the output files (SIGTERM and kills: test_interruption.py)."""

import functools
import glob
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from bond_jax import sharding
from bond_jax import trainer
from bond_jax.data import prompt_sources
from bond_jax.models import hf
from bond_jax.tasks import default_assets
from bond_jax.tasks import sentiment
import tiny_run


@pytest.fixture(scope="module")
def components(tiny_policy_dir, prompt_data_dir, tmp_path_factory):
  """The reference params, model config, text reward and one training batch of the tiny run."""
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir)
  return tiny_run.load_components(config, str(tmp_path_factory.mktemp("unused")))


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), actual, expected)


@pytest.fixture(scope="module")
def jbond_one_device(tiny_policy_dir, components):
  config = tiny_run.tiny_config(tiny_policy_dir, **{"anchor.eta": 0.5})
  return config, tiny_run.run_steps(config, tiny_run.one_device_mesh(), components, num_steps=2)


def test_step_on_data_fsdp_tensor_mesh_matches_one_device(jbond_one_device, components):
  config, (_, one_device) = jbond_one_device
  _, sharded = tiny_run.run_steps(config, sharding.make_mesh((2, 2, 2)), components, num_steps=2)
  for (state, metrics), (expected_state, expected_metrics) in zip(sharded, one_device):
    assert_trees_close(state.params, expected_state.params)
    assert_trees_close(state.anchor_params, expected_state.anchor_params)
    assert_trees_close(metrics, expected_metrics, rtol=1e-4, atol=1e-5)
  # The second step sees a policy and an anchor that moved apart, so the comparison is not vacuous.
  assert sharded[1][1]["kl/policy_anchor"] != 0


def check_anchor_rule(config, initial, history):
  """The anchor after each step follows `config.anchor` exactly."""
  previous = initial
  for step, (state, _) in enumerate(history, start=1):
    if config.anchor.mode == "ema":
      eta = config.anchor.eta
      expected = jax.tree.map(lambda a, p: (1 - eta) * a + eta * p, previous.anchor_params, state.params)
      assert_trees_close(state.anchor_params, expected, rtol=1e-6, atol=1e-7)
    elif config.anchor.mode == "fixed":
      assert_trees_close(state.anchor_params, initial.params, rtol=0, atol=0)
    elif step % config.anchor.period == 0:
      assert_trees_close(state.anchor_params, state.params, rtol=0, atol=0)
    else:
      assert_trees_close(state.anchor_params, previous.anchor_params, rtol=0, atol=0)
    previous = state


def check_step_metrics(history):
  for _, metrics in history:
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["nonfinite"] == 0
  first_metrics = history[0][1]
  # The first step samples from the reference itself: every KL estimate is exactly zero.
  assert abs(first_metrics["kl/policy_ref"]) < 1e-6
  assert abs(first_metrics.get("kl/policy_anchor", 0.0)) < 1e-6


def test_jbond_steps_and_ema_anchor(jbond_one_device):
  config, (initial, history) = jbond_one_device
  check_step_metrics(history)
  check_anchor_rule(config, initial, history)
  assert not np.allclose(history[-1][0].params["embedder"]["embedding"], initial.params["embedder"]["embedding"])


@pytest.mark.parametrize("algorithm,anchor", [("bond", "ema"), ("bond", "fixed"), ("bond", "periodic"),
                                              ("reinforce", "ema")])
def test_algorithm_steps_and_anchor_modes(algorithm, anchor, tiny_policy_dir, components):
  config = tiny_run.tiny_config(tiny_policy_dir, algorithm=algorithm, **{
      "anchor.mode": anchor, "anchor.period": 2, "anchor.eta": 0.5})
  initial, history = tiny_run.run_steps(config, tiny_run.one_device_mesh(), components, num_steps=2)
  check_step_metrics(history)
  assert not np.allclose(history[-1][0].params["embedder"]["embedding"], initial.params["embedder"]["embedding"])
  if algorithm == "bond":
    check_anchor_rule(config, initial, history)


def test_no_step_compiles_again(full_run):
  """The steps are compiled once, before the loop: a step that compiled again would cost a compile per step."""
  *_, compiles = full_run
  assert compiles == 0


def test_output_files(full_run):
  config, workdir, summary, _ = full_run
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert all(isinstance(r["step"], int) for r in records)
  assert sorted(tiny_run.train_records(workdir)) == list(range(1, config.num_steps + 1))
  (final_eval,) = [r for r in records if "eval/reward/policy" in r]
  assert final_eval["step"] == config.num_steps

  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report == summary
  assert list(report) == ["reference", "bon_2", "bon_4", "policy"]
  for row in report.values():
    assert {"reward_mean", "reward_quantile", "kl_to_ref"} <= set(row)
    assert {f"{field}_se" for field in ("reward_mean", "reward_quantile", "kl_to_ref")} <= set(row)
    assert all(math.isfinite(v) for v in row.values())
  assert report["reference"]["kl_to_ref"] == 0
  for n in (2, 4):
    # Exact with ties, at most the tie-free bound (the tiny policy repeats itself, so its rewards tie).
    assert report[f"bon_{n}"]["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert 0 < report[f"bon_{n}"]["kl_to_ref"] <= report[f"bon_{n}"]["kl_bound"] + 1e-6
    assert report[f"bon_{n}"]["kl_to_ref"] == pytest.approx(final_eval[f"eval/kl/bon_{n}"])
    assert report[f"bon_{n}"]["reward_mean"] == pytest.approx(final_eval[f"eval/reward/bon_{n}"])
    assert report[f"bon_{n}"]["reward_mean_se"] == pytest.approx(final_eval[f"eval/reward/bon_{n}/se"])
  assert report["policy"]["reward_quantile"] == pytest.approx(final_eval["eval/quantile/policy"])
  assert report["policy"]["kl_to_ref_se"] == pytest.approx(final_eval["eval/kl/policy_ref/se"])
  assert report["policy"]["frontier_gap"] == pytest.approx(
      report["policy"]["reward_quantile"] - report["policy"]["frontier_quantile"])
  # Best-of-4 beats Best-of-2 beats a reference sample, on the same pool of reference samples.
  assert report["bon_4"]["reward_mean"] >= report["bon_2"]["reward_mean"] >= report["reference"]["reward_mean"]

  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [1, 2, 3, 4]

  # The trained policy, exported as a Hugging Face checkpoint with its tokenizer: the last checkpoint's weights.
  exported, _ = hf.load_checkpoint(os.path.join(workdir, trainer.EXPORT_DIR))
  final_state, _ = tiny_run.restore_train_state(workdir, config)
  jax.tree.map(np.testing.assert_array_equal, exported, final_state.params)
  assert hf.load_tokenizer(os.path.join(workdir, trainer.EXPORT_DIR)).encode("the film") == (
      hf.load_tokenizer(config.policy.path).encode("the film"))


def test_completions_file(full_run):
  """Every evaluation writes each held-out prompt with a reference, a policy and a Best-of-N sample."""
  config, workdir, _, _ = full_run
  with open(os.path.join(workdir, trainer.COMPLETIONS_FILE), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  # One evaluation, at the end, of the first held-out prompts in order, in batches of eval.batch_size (not the
  # training batch's size).
  _, held_out = prompt_sources.load_prompt_splits("default", data_dir=config.data.data_dir)
  expected = config.eval_batches * config.eval.batch_size
  assert config.eval.batch_size != config.batch_size
  assert [row["prompt"] for row in rows] == [held_out[i].decode() for i in range(expected)]
  assert {row["step"] for row in rows} == {config.num_steps}
  tokenizer = default_assets.load_tokenizer()
  checked = 0
  for row in rows:
    assert row["best_of_n"]["n"] in config.eval.bon_ns
    for sample in ("reference", "policy", "best_of_n"):
      assert 0 <= row[sample]["quantile"] <= 1
      # The reward of the text as written, by the task's own scorer, where the prompt was not truncated.
      if len(tokenizer.encode(row["prompt"])) <= config.data.prompt_len:
        expected = sentiment.sentiment_reward([row["prompt"]], [row[sample]["text"]])[0]
        assert row[sample]["reward"] == pytest.approx(expected, abs=1e-5), (row, sample)
        checked += 1
  assert checked >= 3 * 4


# Orbax's reader of the truncated checkpoint leaves a callback for an event loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_past_an_unreadable_checkpoint_matches_an_uninterrupted_run(full_run, tmp_path, caplog):
  config, workdir, summary, _ = full_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  os.remove(os.path.join(resumed, "report.json"))
  # As if the run was stopped while saving step 3: step 4 never written, step 3's array files cut short.
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  array_files = glob.glob(os.path.join(resumed, "checkpoints", "3", "state", "**", "d", "*"), recursive=True)
  assert array_files
  for path in array_files:
    os.truncate(path, 0)

  with caplog.at_level("INFO"):
    resumed_summary = trainer.train(config, resumed)
  assert "Checkpoint at step 3 is unreadable" in caplog.text
  assert "Resumed from the checkpoint at step 2." in caplog.text
  kept_aside = os.listdir(os.path.join(resumed, "checkpoints_unreadable"))
  assert [name.split(".")[0] for name in kept_aside] == ["3"]  # Set aside for inspection, not deleted.

  expected, actual = tiny_run.train_records(workdir), tiny_run.train_records(resumed)
  assert sorted(actual) == [1, 2, 3, 4]
  for step in (3, 4):
    assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
  for name, row in summary.items():
    assert resumed_summary[name] == pytest.approx(row, rel=1e-5, abs=1e-6), name
  # The completions of the evaluation at the end, once: rows written after the resumed-from step are dropped.
  with open(os.path.join(workdir, trainer.COMPLETIONS_FILE), encoding="utf-8") as f, \
       open(os.path.join(resumed, trainer.COMPLETIONS_FILE), encoding="utf-8") as g:
    assert [json.loads(line) for line in g] == [json.loads(line) for line in f]
  (final_state, _), (expected_state, _) = (tiny_run.restore_train_state(resumed, config),
                                           tiny_run.restore_train_state(workdir, config))
  assert int(final_state.step) == int(expected_state.step) == config.num_steps
  assert_trees_close(final_state.params, expected_state.params)
  assert_trees_close(final_state.anchor_params, expected_state.anchor_params)
