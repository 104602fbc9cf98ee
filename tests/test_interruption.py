"""A training run (`experiments/run.py` in a subprocess, one device) killed again and again, stopped by SIGTERM
twice, and killed while deleting an old checkpoint: every restart resumes from the last complete checkpoint,
every checkpoint on disk stays readable, and the end state equals an uninterrupted run's exactly."""

import collections
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bond_jax import checkpointing
from bond_jax import trainer
import tiny_run

# Where the kills of the loop land, in order; the run then finishes undisturbed. The first kill lands while the
# run builds its prompt dataset in the workdir; the others after the run made progress since its restart.
KILL_PLAN = ["dataset"] + ["random", "write"] * 4
KILL_KINDS = {"dataset": "SIGKILL: while building the prompt dataset", "random": "SIGKILL: at a random moment",
              "write": "SIGKILL: during a checkpoint write"}
NUM_STEPS = 30  # Enough for every planned kill to find steps left to run.


@pytest.fixture(scope="module")
def run_env(tmp_path_factory) -> dict[str, str]:
  """The environment of the runs here: one device, `tiny_run` importable, a persistent compilation cache.

  With a reward that runs no host callback, every program goes into the cache, so a restart compiles nothing.
  """
  return tiny_run.script_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("compilation_cache")),
                             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def interruptible_config(policy_dir: str, data_dir: str = "", **overrides):
  """The tiny run with the jittable `tiny_run.even_token_reward`, checkpointing every step."""
  return tiny_run.tiny_config(policy_dir, data_dir, **{
      "reward.kind": "python_tokens", "reward.function": "tiny_run:even_token_reward", **overrides})


def start_run(config, workdir: str, log_path: str, env: dict[str, str]) -> subprocess.Popen:
  with open(log_path, "w", encoding="utf-8") as log:
    return subprocess.Popen(tiny_run.run_script_args(workdir, tiny_run.command_line_flags(config)), cwd=tiny_run.REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 120, poll: float = 0.001):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f"the run ended before {what}"
    assert time.monotonic() < deadline, f"not {what} after {timeout} s"
    time.sleep(poll)


def entries(directory: str) -> list[str]:
  return os.listdir(directory) if os.path.isdir(directory) else []


def finalised_steps(workdir: str) -> list[int]:
  return sorted(int(name) for name in entries(os.path.join(workdir, "checkpoints")) if name.isdigit())


def saves_in_flight(workdir: str) -> list[str]:
  """Orbax's temporary directories of saves not yet complete (renamed to the step when they are)."""
  return [name for name in entries(os.path.join(workdir, "checkpoints")) if ".orbax-checkpoint-tmp" in name]


def dataset_half_built(workdir: str) -> bool:
  """TFDS builds into `incomplete.*` and renames it to the version directory when complete."""
  names = entries(os.path.join(workdir, "tfds", "bond_prompts"))
  return any(name.startswith("incomplete") for name in names) and "1.0.0" not in names


def has_checkpoint_after(workdir: str, step: int) -> bool:
  return max(finalised_steps(workdir), default=0) > step


def train_steps_logged(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(line)["step"] for line in read(path).splitlines(keepends=True)
          if line.endswith("\n") and "loss/total" in line]


def check_every_checkpoint_restores(workdir: str, config) -> None:
  """Every finalised step directory restores (not only the newest) into the step and data position it names."""
  restored = tiny_run.restore_every_checkpoint(workdir, config)
  assert sorted(restored) == finalised_steps(workdir)  # And orbax takes nothing else (`deleting/`) for a step.
  for step, (state, data_state) in restored.items():
    assert int(state.step) == step
    assert data_state["train"]["counts"]["yielded"] == step * config.batch_size


def assert_same_train_state(workdir: str, expected_workdir: str, config) -> None:
  (state, data_state), (expected, expected_data_state) = (tiny_run.restore_train_state(workdir, config),
                                                          tiny_run.restore_train_state(expected_workdir, config))
  assert int(state.step) == config.num_steps
  jax.tree.map(np.testing.assert_array_equal, state, expected)  # step, params, anchor, opt_state, rng: exactly.
  assert data_state == expected_data_state


def kill_at(moment: str, process: subprocess.Popen, workdir: str, newest: int, rng: random.Random) -> str:
  """SIGKILLs the run at `moment` of `KILL_PLAN` (the run restarted with `newest` the newest finalised step);
  returns the kind of kill, a dataset build or a checkpoint write only if the kill left it unfinished."""
  if moment == "dataset":
    wait_until(functools.partial(dataset_half_built, workdir), process, "building its prompt dataset")
  else:
    wait_until(functools.partial(has_checkpoint_after, workdir, newest), process,
               "saving a checkpoint since its restart", poll=0.01)
    if moment == "random":
      time.sleep(rng.uniform(0, 0.6))
    else:
      wait_until(functools.partial(saves_in_flight, workdir), process, "starting a checkpoint write")
  process.kill()
  process.wait()
  if (moment == "dataset" and dataset_half_built(workdir)) or (moment == "write" and saves_in_flight(workdir)):
    return KILL_KINDS[moment]
  return KILL_KINDS["random"]


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_an_uninterrupted_runs_state(tiny_policy_dir, run_env, tmp_path,
                                                                         fault_tally):
  config = interruptible_config(tiny_policy_dir, num_steps=NUM_STEPS, keep_checkpoints=2)
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
  # The uninterrupted run goes alongside (a restart spends seconds on one core importing modules) and compiles
  # every program once, into the cache the restarts load them from.
  reference_process = start_run(config, reference, str(tmp_path / "reference.log"), run_env)
  processes = [reference_process]
  rng = random.Random(0)
  kills = collections.Counter()
  newest = 0  # The newest finalised step when the run (re)starts.
  try:
    for life, moment in enumerate([*KILL_PLAN, None]):
      log = str(tmp_path / f"life_{life}.log")
      if moment != "dataset":  # This start trains: not before the programs are in the cache.
        wait_until(functools.partial(train_steps_logged, reference), reference_process,
                   "the uninterrupted run logging a step", poll=0.05)
      processes.append(start_run(config, workdir, log, run_env))
      if moment is None:
        assert processes[-1].wait(timeout=300) == 0, read(log)[-3000:]
      else:
        kind = kill_at(moment, processes[-1], workdir, newest, rng)
        kills[kind] += 1
        fault_tally.record(kind, injected=1, survived=0)
      # The restart resumed from the newest finalised step before it, whatever the kill before it hit.
      output = read(log)
      if newest:
        assert f"Resumed from the checkpoint at step {newest}." in output, output[-3000:]
      else:
        assert "Resumed from" not in output
      assert "is unreadable" not in output
      check_every_checkpoint_restores(workdir, config)
      newest = max(finalised_steps(workdir), default=0)
    assert reference_process.wait(timeout=300) == 0, read(str(tmp_path / "reference.log"))[-3000:]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  assert sum(kills.values()) == len(KILL_PLAN)
  assert kills[KILL_KINDS["write"]] >= 2, kills
  # No step lost or logged twice (`train_records` checks), every metric as in the uninterrupted run.
  records = tiny_run.train_records(workdir)
  assert sorted(records) == list(range(1, NUM_STEPS + 1))
  assert records == tiny_run.train_records(reference)
  assert_same_train_state(workdir, reference, config)
  assert tiny_run.read_report(workdir) == tiny_run.read_report(reference)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert saves_in_flight(workdir) == [] and entries(os.path.join(checkpoints, checkpointing.DELETING_SUBDIR)) == []
  assert not os.path.exists(f"{checkpoints}_unreadable")
  for kind, count in kills.items():
    fault_tally.record(kind, injected=0, survived=count)


# Saves two checkpoints keeping one, and dies (SIGKILL) half-way through the recursive delete of the old one.
_DIE_WHILE_DELETING = """
import os, shutil, signal, sys
import jax.numpy as jnp
from bond_jax import checkpointing

def rmtree_then_die(path, *args, **kwargs):
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
  assert len(files) > 2, files
  for file in files[:len(files) // 2]:
    os.remove(file)
  os.kill(os.getpid(), signal.SIGKILL)

checkpointer = checkpointing.Checkpointer(sys.argv[1], keep=1, async_save=False)
checkpointer.save(1, {"w": jnp.arange(1000.0), "b": jnp.ones(3)}, {"step": 1})
shutil.rmtree = rmtree_then_die
checkpointer.save(2, {"w": jnp.arange(1000.0) + 1, "b": jnp.ones(3) + 1}, {"step": 2})
checkpointer.close()
"""


def test_sigkill_while_deleting_an_old_checkpoint_leaves_every_step_readable(tmp_path, fault_tally):
  directory = str(tmp_path / "checkpoints")
  process = subprocess.run([sys.executable, "-c", _DIE_WHILE_DELETING, directory], cwd=tiny_run.REPO,
                           env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                           capture_output=True, text=True, timeout=120, check=False)
  assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
  kind = "SIGKILL: while deleting an old checkpoint"
  fault_tally.record(kind, injected=1, survived=0)
  # Only the half-deleted old step is in `deleting/`; the step directories hold exactly the kept, complete step.
  assert [name for name in os.listdir(directory) if name.isdigit()] == ["2"]
  assert os.listdir(os.path.join(directory, checkpointing.DELETING_SUBDIR)) == ["1"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct((1000,), np.float32, sharding=device),
              "b": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}
  checkpointer = checkpointing.Checkpointer(directory, keep=1)  # Empties `deleting/`.
  state, data_state = jax.device_get(checkpointer.restore_latest(abstract))
  checkpointer.close()
  np.testing.assert_array_equal(state["w"], np.arange(1000.0) + 1)
  assert data_state == {"step": 2}
  assert os.listdir(os.path.join(directory, checkpointing.DELETING_SUBDIR)) == []
  fault_tally.record(kind, injected=0, survived=1)


@pytest.mark.slow
def test_sigterm_twice_checkpoints_the_stopped_step_and_a_rerun_resumes(tiny_policy_dir, prompt_data_dir, run_env,
                                                                       tmp_path, caplog, fault_tally):
  workdir = str(tmp_path / "run")
  # No periodic checkpoint: the only save after the first SIGTERM is the one of the stop.
  config = interruptible_config(tiny_policy_dir, prompt_data_dir, num_steps=100_000, checkpoint_every=100_000)
  log = str(tmp_path / "run.log")
  process = start_run(config, workdir, log, run_env)
  kind = "SIGTERM, then SIGTERM during the save"
  try:
    wait_until(functools.partial(train_steps_logged, workdir), process, "logging a step", poll=0.01)
    process.send_signal(signal.SIGTERM)
    wait_until(functools.partial(saves_in_flight, workdir), process, "starting the checkpoint of the stop")
    process.send_signal(signal.SIGTERM)
    fault_tally.record(kind, injected=1, survived=0)
    process.wait(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  output = read(log)
  assert process.returncode == 0, output[-3000:]
  assert "SIGTERM received" in output

  stopped_at = train_steps_logged(workdir)[-1]
  assert train_steps_logged(workdir) == list(range(1, stopped_at + 1))
  assert finalised_steps(workdir) == [stopped_at] and saves_in_flight(workdir) == []
  state, data_state = tiny_run.restore_train_state(workdir, config)
  assert int(state.step) == stopped_at
  assert data_state["train"]["counts"]["yielded"] == stopped_at * config.batch_size
  assert not os.path.exists(os.path.join(workdir, "report.json"))

  # The rerun, here on this process's 8 devices.
  config.num_steps = stopped_at + 1
  with caplog.at_level("INFO"):
    trainer.train(config, workdir)
  assert f"Resumed from the checkpoint at step {stopped_at}." in caplog.text
  assert train_steps_logged(workdir) == list(range(1, stopped_at + 2))
  assert os.path.exists(os.path.join(workdir, "report.json"))
  assert int(tiny_run.restore_train_state(workdir, config)[0].step) == stopped_at + 1
  fault_tally.record(kind, injected=0, survived=1)
