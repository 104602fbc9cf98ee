"""Faulty reward functions in a run: wrong shape or type stops it before compiling, a NaN or inf reward stops it
naming the step, the batch index and the prompt, with the state before that step checkpointed and resumable."""

import math
import os

import jax
import numpy as np
import pytest

from bond_jax import rewards
from bond_jax import run_components
from bond_jax import trainer
from bond_jax.tasks import default_assets
import faulty_rewards
import tiny_run


def user_reward_config(policy_dir, data_dir, kind, function, **overrides):
  return tiny_run.tiny_config(policy_dir, data_dir, **{"reward.kind": kind, "reward.function": function},
                              **overrides)


@pytest.mark.parametrize("kind,function,message", [
    ("python", "one_value", r"the text reward returned values of shape \(1,\); expected one per generation, \(16,\)"),
    ("python", "words", "the text reward returned values of dtype <U4; expected numbers"),
    ("python_tokens", "two_per_generation",
     r"the token reward returned an array of shape \(16, 2\); expected one reward per \(prompt, generation\) "
     r"pair, shape \(16,\)"),
])
def test_a_reward_of_the_wrong_shape_or_type_stops_the_run_before_compiling(
    kind, function, message, tiny_policy_dir, prompt_data_dir, tmp_path, fault_tally):
  fault = f"reward: {'wrong shape' if 'shape' in message else 'wrong type'} ({kind})"
  fault_tally.record(fault, injected=1, survived=0)
  config = user_reward_config(tiny_policy_dir, prompt_data_dir, kind, f"faulty_rewards:{function}")
  workdir = str(tmp_path / "run")
  with pytest.raises(rewards.RewardError, match=message):
    trainer.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # Nothing was allocated, compiled or saved.
  fault_tally.record(fault, injected=0, survived=1)


def test_the_run_script_reports_a_bad_reward_in_one_line(tiny_policy_dir, prompt_data_dir, tmp_path):
  config = user_reward_config(tiny_policy_dir, prompt_data_dir, "python", "faulty_rewards:one_value")
  last_line = tiny_run.run_script_error(str(tmp_path / "run"), tiny_run.command_line_flags(config))
  assert last_line.startswith("error: the text reward returned values of shape (1,)"), last_line


def first_train_batch(config, workdir):
  """The first training batch the trainer will see (same config, seed and data), with its decoded prompts."""
  _, model_config, tokenizer = run_components.load_policy(config)
  train_prompts, _ = run_components.load_prompts(config, tokenizer, model_config, workdir)
  batch = next(train_prompts)
  decoded = [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
             for ids, mask in zip(batch["prompts"], batch["prompt_mask"])]
  return batch, decoded


@pytest.fixture
def poisoned_prompts():
  yield faulty_rewards.POISONED_PROMPTS
  faulty_rewards.POISONED_PROMPTS.clear()


def test_a_nan_or_inf_reward_stops_the_run_naming_the_prompt_and_the_run_resumes(
    tiny_policy_dir, prompt_data_dir, tmp_path, poisoned_prompts, fault_tally):
  fault_tally.record("reward: NaN and inf in training", injected=1, survived=0)
  config = user_reward_config(tiny_policy_dir, prompt_data_dir, "python", "faulty_rewards:poisoned")
  workdir = str(tmp_path / "run")
  batch, decoded = first_train_batch(config, workdir)
  # Prompts 3 and 5 of the first step's batch (never among the held-out prompts the reward is first checked on).
  poisoned_prompts.update({decoded[3]: math.nan, decoded[5]: math.inf})
  assert len(set(decoded)) == len(decoded)

  with pytest.raises(rewards.RewardError) as error:
    trainer.train(config, workdir)
  assert str(error.value).startswith(
      "step 1: the reward function returned a non-finite value (NaN or inf) for 2 prompt(s) of the batch, the "
      f"first at batch index 3 (prompt {batch['text'][3]!r}). The step was skipped")

  # A step's metrics are read before it is checkpointed (here every step), so the run stopped at step 1, which was
  # skipped: its checkpoint, the only one, holds the reference itself.
  checkpoints = tiny_run.restore_every_checkpoint(workdir, config)
  assert sorted(checkpoints) == [1]
  reference, _, _ = run_components.load_policy(config)
  jax.tree.map(np.testing.assert_array_equal, checkpoints[1][0].params, jax.device_get(reference))
  assert int(checkpoints[1][0].step) == 1

  poisoned_prompts.clear()  # The reward is fixed: the run resumes from step 1 and finishes.
  trainer.train(config, workdir)
  assert sorted(tiny_run.train_records(workdir)) == [2, 3]
  assert int(tiny_run.restore_train_state(workdir, config)[0].step) == config.num_steps
  fault_tally.record("reward: NaN and inf in training", injected=0, survived=1)


def test_check_reward_fn_scores_the_prompts_and_names_bad_batch_indices(poisoned_prompts):
  tokenizer = default_assets.load_tokenizer()
  ids = [tokenizer.encode(t) for t in ("the food was good", "the room was", "we stayed there")]
  decoded = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
  width = max(len(i) for i in ids) + 1
  prompts = np.zeros((3, width), np.int32)
  prompt_mask = np.zeros((3, width), bool)
  for row, row_ids in enumerate(ids):  # Right-padded: check_reward_fn must handle any padding.
    prompts[row, :len(row_ids)], prompt_mask[row, :len(row_ids)] = row_ids, True
  reward_fn = rewards.text_reward(lambda ps, gs: [len(p) + 100 * (p == g) for p, g in zip(ps, gs)], tokenizer)
  # Each prompt is scored as its own generation, twice: the rewards are 100 + len(prompt).
  np.testing.assert_array_equal(rewards.check_reward_fn(reward_fn, prompts, prompt_mask),
                                [[100 + len(d)] * 2 for d in decoded])

  poisoned_prompts[decoded[2]] = -math.inf
  with pytest.raises(rewards.RewardError, match=r"not finite at batch indices \[2\]"):
    rewards.check_reward_fn(rewards.text_reward(faulty_rewards.poisoned, tokenizer), prompts, prompt_mask)
