"""Two processes on 127.0.0.1 (4 CPU devices each, gloo collectives) train in lock step with one 8-device process,
each having read only its half of the policy checkpoint."""

import os
import re
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

import tiny_run

NUM_PROCESSES = 2
TIMEOUT_S = 480


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_policy_dir, tmp_path, request):
  # fsdp spans the two processes: each holds half of every sharded parameter and half of each batch. The data
  # directory is left empty, so both processes prepare the prompts in the shared workdir.
  config = tiny_run.tiny_config(tiny_policy_dir, **tiny_run.FULL_RUN)
  workdir = str(tmp_path / "two_processes")
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  logs = [str(tmp_path / f"process_{i}.log") for i in range(NUM_PROCESSES)]
  processes = []
  for i, log in enumerate(logs):
    with open(log, "w", encoding="utf-8") as out:
      processes.append(subprocess.Popen(
          tiny_run.run_script_args(workdir, [
              *tiny_run.command_line_flags(config), f"--config.distributed.coordinator_address={address}",
              f"--config.distributed.num_processes={NUM_PROCESSES}", f"--config.distributed.process_id={i}"]),
          cwd=tiny_run.REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    # The same run in this process (8 devices), while the two processes work (unless an earlier test made it).
    _, reference, summary, _ = request.getfixturevalue("full_run")
    deadline = time.monotonic() + TIMEOUT_S
    # Stop at the first failure: its peer would wait in a collective forever.
    while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
      assert time.monotonic() < deadline, "the processes did not finish in time"
      time.sleep(0.5)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for log in logs:
    with open(log, encoding="utf-8") as f:
      outputs.append(f.read())
  for i, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i}:\n{output[-4000:]}"
  assert "sampler" in outputs[0] and "sampler" not in outputs[1]  # Only process 0 prints the report.
  # Each process read the checkpoint's header and its devices' bands of rows of each tensor: about half the bytes.
  reads = [re.findall(r"Read (\d+) of the (\d+) bytes of \S+ on process (\d)", output) for output in outputs]
  assert [[int(i) for *_, i in read] for read in reads] == [[0], [1]], reads
  (read_0, total, _), (read_1, _, _) = [[int(n) for n in read[0]] for read in reads]
  assert max(read_0, read_1) < 0.55 * total and read_0 + read_1 >= total, reads

  expected, actual = tiny_run.train_records(reference), tiny_run.train_records(workdir)
  assert sorted(actual) == list(range(1, config.num_steps + 1))
  for step, record in expected.items():
    assert actual[step] == pytest.approx(record, rel=1e-4, abs=1e-5), step
  report = tiny_run.read_report(workdir)
  for name, row in summary.items():
    assert report[name] == pytest.approx(row, rel=1e-4, abs=1e-5), name
  # Each process wrote its own shards of the final state: together they equal the one-process state.
  (state, _), (expected_state, _) = (tiny_run.restore_train_state(workdir, config),
                                     tiny_run.restore_train_state(reference, config))
  assert int(state.step) == config.num_steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (state.params, state.anchor_params), (expected_state.params, expected_state.anchor_params))
