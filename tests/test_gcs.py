"""Runs whose workdir, policy checkpoint and prompts live in a bucket of a real GCS emulator (`gcs_bucket`): killed
mid-checkpoint and mid-training, resumed, they end exactly where the uninterrupted local run (`full_run`) ends;
a workdir that cannot be written stops the run before anything is compiled."""

import os
import struct
import subprocess
import time

import fsspec
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from bond_jax import paths
from bond_jax.data import prompt_sources
from bond_jax.tasks import default_assets
import tiny_run

# The first life is killed while it trains on, writing a checkpoint after the first (so the second resumes from a
# checkpoint in the bucket, and finishes). Kills at random moments are the local suite's (test_interruption.py):
# each life here compiles for half a minute.
KILL_PLAN = ("write", None)


def _bucket_files(fs, directory: str) -> list[str]:
  """The objects under `directory`, relative to it, listed afresh."""
  prefix = directory.removeprefix("gs://").rstrip("/") + "/"
  return [name.removeprefix(prefix) for name in fs.find(directory)] if fs.exists(directory) else []


def _step_dirs(fs, workdir: str) -> dict[int, bool]:
  """Step -> whether orbax committed it (its `commit_success.txt` is there), for every step directory."""
  steps = {}
  for name in _bucket_files(fs, f"{workdir}/checkpoints"):
    step, _, rest = name.partition("/")
    if step.isdigit():
      steps[int(step)] = steps.get(int(step), False) or rest == "commit_success.txt"
  return steps


def _tensorboard_scalars(fs, directory: str, tag: str) -> dict[int, float]:
  """Step -> value of `tag` as TensorBoard shows it: the event files in name order, each record a length, its CRC,
  an `Event` and its CRC, and a session START at step s hiding the earlier files' events from step s on."""
  scalars = {}
  for path in sorted(fs.find(directory)):
    data, offset = fs.cat_file(path), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {step: value for step, value in scalars.items() if step < event.step}
      scalars.update({event.step: value.simple_value for value in event.summary.value if value.tag == tag})
  return scalars


def _wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.01):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      return False
    assert time.monotonic() < deadline, f"not {what} after {timeout} s"
    time.sleep(poll)
  return True


@pytest.mark.slow
def test_run_in_a_bucket_killed_and_resumed_ends_as_the_uninterrupted_local_run(gcs_bucket, full_run, tiny_policy_dir,
                                                                               tmp_path, fault_tally):
  reference_config, reference, summary, _ = full_run
  policy, workdir = f"{gcs_bucket}/policy", f"{gcs_bucket}/run"
  paths.copy_files(tiny_policy_dir, policy)  # The Hugging Face checkpoint and its tokenizer, read from the bucket.
  config = tiny_run.tiny_config(policy, reference_config.data.data_dir, **tiny_run.FULL_RUN)
  # As many simulated devices as this process has, so the runs compute exactly what `full_run` computed.
  env = tiny_run.script_env(XLA_FLAGS=os.environ["XLA_FLAGS"])
  fs = fsspec.filesystem("gs", skip_instance_cache=True, use_listings_cache=False)
  newest = 0  # The newest committed step when the run (re)starts.
  outcomes = []
  for life, moment in enumerate(KILL_PLAN):
    log = tmp_path / f"life_{life}.log"
    with open(log, "w", encoding="utf-8") as out:
      process = subprocess.Popen(tiny_run.run_script_args(workdir, tiny_run.command_line_flags(config)),
                                 cwd=tiny_run.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      if moment == "write":
        in_flight = lambda: any(not done for step, done in _step_dirs(fs, workdir).items() if step > 1)
        if _wait_until(in_flight, process, "writing a checkpoint"):
          process.kill()
      returncode = process.wait(timeout=300)
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
    output = log.read_text()
    steps = _step_dirs(fs, workdir)
    if returncode == 0:
      outcomes.append("finished")
    else:
      assert returncode == -9, output[-3000:]
      kind = ("SIGKILL: during a checkpoint write in a bucket" if not all(steps.values())
              else "SIGKILL: at a random moment, in a bucket")
      outcomes.append(kind)
      fault_tally.record(kind, injected=1, survived=0)
    assert ("Resumed from the checkpoint at step %d." % newest in output) if newest else "Resumed" not in output, \
        output[-3000:]
    # Whatever the kill hit, every committed step restores; an uncommitted one is what a save cut short left.
    committed = sorted(step for step, done in steps.items() if done)
    assert sorted(tiny_run.restore_every_checkpoint(workdir, config)) == committed
    newest = max(committed, default=0)
    if returncode == 0:
      break
  assert outcomes[0] == "SIGKILL: during a checkpoint write in a bucket" and outcomes[-1] == "finished", outcomes

  # Nothing lost, nothing logged twice, and exactly the uninterrupted local run's metrics, state and report.
  assert all(_step_dirs(fs, workdir).values())  # The cut save was deleted on resume.
  assert tiny_run.train_records(workdir) == tiny_run.train_records(reference)
  (state, data_state), (expected, expected_data_state) = (tiny_run.restore_train_state(workdir, config),
                                                          tiny_run.restore_train_state(reference, reference_config))
  assert int(state.step) == config.num_steps
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  assert data_state == expected_data_state
  assert tiny_run.read_report(workdir) == summary
  files = _bucket_files(fs, workdir)
  assert {"config.json", "report.json", "tradeoff.png", "policy/model.safetensors", "policy/tokenizer.json"} <= {
      *files}
  # TensorBoard: whole event files, one per flush (each checkpoint: never one uploaded twice), which show exactly
  # the records of metrics.jsonl, the killed life's steps past its checkpoint hidden.
  assert sum(name.startswith("tensorboard/events.out.tfevents.") for name in files) >= config.num_steps
  assert _tensorboard_scalars(fs, f"{workdir}/tensorboard", "loss/total") == {
      step: np.float32(record["loss/total"]) for step, record in tiny_run.train_records(reference).items()}
  for kind in set(outcomes) - {"finished"}:
    fault_tally.record(kind, injected=0, survived=outcomes.count(kind))


def test_prompts_from_a_bucket_are_the_local_prompts(gcs_bucket, prompt_data_dir):
  """A prompt file and a prepared TFDS data_dir, read from the bucket."""
  paths.copy_files(os.path.dirname(default_assets.PROMPTS_PATH), f"{gcs_bucket}/assets",
                   skip=(".txt", ".safetensors"))
  remote = prompt_sources.load_prompt_splits("prompt_file", path=f"{gcs_bucket}/assets/prompts.jsonl")
  assert remote == prompt_sources.load_prompt_splits("prompt_file", path=default_assets.PROMPTS_PATH)
  paths.copy_files(prompt_data_dir, f"{gcs_bucket}/tfds")
  remote, local = (prompt_sources.load_prompt_splits("tfds", tfds_name="bond_prompts", data_dir=data_dir,
                                                     train_split="train", eval_split="validation")
                   for data_dir in (f"{gcs_bucket}/tfds", prompt_data_dir))
  for remote_split, local_split in zip(remote, local):
    assert len(remote_split) == len(local_split) > 100
    assert [remote_split[i] for i in range(0, len(local_split), 50)] == [local_split[i] for i in
                                                                         range(0, len(local_split), 50)]


def test_a_workdir_that_cannot_be_written_stops_the_run_naming_it(gcs_bucket, tiny_policy_dir):
  flags = tiny_run.command_line_flags(tiny_run.tiny_config(tiny_policy_dir))
  error = tiny_run.run_script_error("gs://no-such-bucket/run", flags)
  assert "'gs://no-such-bucket/run' cannot be written (does the bucket exist?)" in error, error
  with pytest.raises(paths.PathError, match="'gz://bond-test/run': unknown scheme 'gz://'"):
    paths.check_workdir("gz://bond-test/run")
