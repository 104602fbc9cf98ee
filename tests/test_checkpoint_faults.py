"""Damaged and foreign checkpoints: files cut short or missing fall back to the previous checkpoint with nothing
lost; another model's checkpoint or one without the anchor stops the run with an error naming what differs."""

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest

from bond_jax import checkpointing
from bond_jax import run_components
from bond_jax import train_state as train_state_lib
from bond_jax.models import transformer
import tiny_run


def _train_state(config, model_config=None):
  """A train state of `config`'s policy (or of a model of `model_config`) at step 1, as host arrays."""
  params, policy_config, _ = run_components.load_policy(config)
  if model_config is not None:
    params = transformer.init_params(model_config, jax.random.PRNGKey(1))
  state = train_state_lib.create_train_state(params, train_state_lib.make_optimizer(config.optimizer), config.seed)
  return jax.device_get(state.replace(step=np.int32(1))), policy_config


def _save(directory: str, states: dict[int, object]) -> None:
  checkpointer = checkpointing.Checkpointer(directory, keep=10, async_save=False)
  for step, state in states.items():
    checkpointer.save(step, state, {"train": {"step": step}})
  checkpointer.close()


def _files_and_sizes(directory: str) -> dict[str, int]:
  return {path: os.path.getsize(path) for path in glob.glob(os.path.join(directory, "**"), recursive=True)
          if os.path.isfile(path)}


@pytest.fixture(scope="module")
def tiny(tiny_policy_dir, prompt_data_dir):
  """The tiny run's config, its abstract train state, a state at step 1 and its model config."""
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir)
  state, model_config = _train_state(config)
  return config, tiny_run.abstract_train_state(config), state, model_config


def _cut_short(path: str) -> None:
  os.truncate(path, os.path.getsize(path) // 2)


# Each damage a crash or a disk can leave in a finalised step directory; the checkpoint's tree still matches.
DAMAGES = {
    "truncated array files": lambda step_dir: [_cut_short(p) for p in glob.glob(f"{step_dir}/state/**/d/*",
                                                                                  recursive=True)],
    "missing array files": lambda step_dir: [os.remove(p) for p in glob.glob(f"{step_dir}/state/**/d/*",
                                                                              recursive=True)],
    "truncated tree metadata": lambda step_dir: _cut_short(f"{step_dir}/state/_METADATA"),
    "missing tree metadata": lambda step_dir: os.remove(f"{step_dir}/state/_METADATA"),
    "truncated data position": lambda step_dir: _cut_short(f"{step_dir}/data/metadata"),
}


# Orbax's reader of a damaged checkpoint leaves a callback for an event loop it has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(damage, tiny, tmp_path, caplog,
                                                                         fault_tally):
  _, abstract, state, _ = tiny
  later = state.replace(step=np.int32(2), params=jax.tree.map(lambda x: x + 1, state.params))
  directory = str(tmp_path / "checkpoints")
  _save(directory, {1: state, 2: later})
  DAMAGES[damage](os.path.join(directory, "2"))
  fault_tally.record(f"checkpoint: {damage}", injected=1, survived=0)

  checkpointer = checkpointing.Checkpointer(directory, keep=10)
  with caplog.at_level("WARNING"):
    restored, data_state = jax.device_get(checkpointer.restore_latest(abstract))
  checkpointer.close()
  assert "Checkpoint at step 2 is unreadable" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert data_state == {"train": {"step": 1}}
  assert checkpointing.Checkpointer(directory, keep=10, read_only=True).steps() == [1]
  # Kept for inspection, not deleted.
  assert [name.split(".")[0] for name in os.listdir(f"{directory}_unreadable")] == ["2"]
  fault_tally.record(f"checkpoint: {damage}", injected=0, survived=1)


def test_every_checkpoint_unreadable_is_an_error_naming_each(tiny, tmp_path):
  _, abstract, state, _ = tiny
  directory = str(tmp_path / "checkpoints")
  _save(directory, {1: state, 2: state.replace(step=np.int32(2))})
  for step in (1, 2):
    DAMAGES["missing tree metadata"](os.path.join(directory, str(step)))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="can be read: step 2: .*; step 1: "):
    checkpointing.Checkpointer(directory, keep=10).restore_latest(abstract)


def _expect_refusal(directory: str, abstract, fault_tally, kind: str, *messages: str) -> str:
  """Asserts that restoring `directory` into `abstract` raises a mismatch naming `messages` and changes nothing."""
  fault_tally.record(kind, injected=1, survived=0)
  before = _files_and_sizes(directory)
  checkpointer = checkpointing.Checkpointer(directory, keep=10)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpointer.restore_latest(abstract)
  checkpointer.close()
  for message in messages:
    assert message in str(error.value)
  assert "\n" not in str(error.value)
  # Nothing is set aside or deleted: the checkpoints are still there for the run they belong to.
  assert _files_and_sizes(directory) == before
  assert not os.path.exists(f"{directory}_unreadable")
  return str(error.value)


@pytest.fixture(scope="module")
def other_model_state(tiny):
  """A train state at step 1 of a wider model (4 heads of 8 over d_model 32) on the tiny run's vocabulary."""
  config, _, _, model_config = tiny
  return _train_state(config, dataclasses.replace(model_config, d_model=32, num_heads=4, num_kv_heads=4))[0]


def test_another_models_checkpoint_is_refused_naming_the_shapes(tiny, other_model_state, tmp_path, fault_tally):
  _, abstract, _, _ = tiny
  directory = str(tmp_path / "checkpoints")
  _save(directory, {1: other_model_state})
  message = _expect_refusal(
      directory, abstract, fault_tally, "checkpoint: another model's shapes",
      "the checkpoint at step 1 in ", "does not match this run's train state",
      "params/embedder/embedding: checkpoint (405, 32) vs this run (405, 16)",
      "params/layer_0/attn/q/kernel: checkpoint (32, 4, 8) vs this run (16, 2, 8)", "more")
  assert "anchor_params" not in message  # The first few differences are named, not all 47.
  restored, _ = checkpointing.Checkpointer(directory, keep=10, read_only=True).restore(
      1, checkpointing.abstract_like(jax.device_put(other_model_state)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), other_model_state)
  fault_tally.record("checkpoint: another model's shapes", injected=0, survived=1)


def test_a_checkpoint_without_the_anchor_is_refused(tiny, tmp_path, fault_tally):
  _, abstract, state, _ = tiny
  directory = str(tmp_path / "checkpoints")
  without_anchor = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
                    if field.name != "anchor_params"}
  _save(directory, {1: without_anchor})
  message = _expect_refusal(directory, abstract, fault_tally, "checkpoint: anchor missing",
                            "anchor_params is missing from the checkpoint")
  assert message.endswith(": anchor_params is missing from the checkpoint")  # One subtree, not its 12 leaves.
  fault_tally.record("checkpoint: anchor missing", injected=0, survived=1)


def test_a_checkpoint_of_another_optimizer_is_refused(tiny, tmp_path, fault_tally):
  config, abstract, state, _ = tiny
  directory = str(tmp_path / "checkpoints")
  # Without gradient clipping the optimizer chain has one stage less: another opt_state tree.
  config = tiny_run.tiny_config(config.policy.path, **{"optimizer.grad_clip": 0.0})
  _save(directory, {1: _train_state(config)[0]})
  _expect_refusal(directory, abstract, fault_tally, "checkpoint: changed optimizer",
                  "opt_state/1 is missing from the checkpoint", "opt_state/0 is in the checkpoint but not in this run")
  fault_tally.record("checkpoint: changed optimizer", injected=0, survived=1)


@pytest.mark.slow
def test_run_script_reports_another_models_checkpoint_in_one_line(tiny, other_model_state, tmp_path, fault_tally):
  config, _, _, _ = tiny
  workdir = str(tmp_path / "run")
  directory = os.path.join(workdir, "checkpoints")
  _save(directory, {1: other_model_state})
  before = _files_and_sizes(directory)
  fault_tally.record("checkpoint: another model's shapes", injected=1, survived=0)
  error = tiny_run.run_script_error(workdir, tiny_run.command_line_flags(config))
  assert error.startswith("error: the checkpoint at step 1 in ")
  assert "params/layer_0/attn/q/kernel: checkpoint (32, 4, 8) vs this run (16, 2, 8)" in error
  assert _files_and_sizes(directory) == before
  fault_tally.record("checkpoint: another model's shapes", injected=0, survived=1)
