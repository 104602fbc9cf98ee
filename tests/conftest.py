"""Test fixtures (the 8 simulated CPU devices are set up by the root conftest.py) and a tally of injected faults.

At the end of a run that injected faults, pytest prints how many of each kind were injected and how many the code
survived with nothing lost, and writes them as JSON to the file `$BOND_FAULT_REPORT` names, if set.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> str:
  """A random 1-layer policy on the shipped tokenizer, saved once per session as a Hugging Face checkpoint."""
  import tiny_run  # pylint: disable=g-import-not-at-top  (imports jax, after the root conftest's flags)
  return tiny_run.write_tiny_policy(str(tmp_path_factory.mktemp("tiny_policy")))


@pytest.fixture(scope="session")
def prompt_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the shipped prompts, built once per session and shared by the runs that use it."""
  from bond_jax.data import prompt_tfds  # pylint: disable=g-import-not-at-top
  from bond_jax.tasks import default_assets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prompt_tfds.build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir)
  return data_dir


@pytest.fixture(scope="session")
def full_run(tiny_policy_dir, prompt_data_dir, tmp_path_factory):
  """`(config, workdir, report, compiles)` of an uninterrupted tiny run (`tiny_run.FULL_RUN`) on this process's
  devices; `compiles` counts the XLA compilations from its second step on (`tiny_run.train_counting_compiles`)."""
  import tiny_run  # pylint: disable=g-import-not-at-top
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, **tiny_run.FULL_RUN)
  workdir = str(tmp_path_factory.mktemp("full_run"))
  return config, workdir, *tiny_run.train_counting_compiles(config, workdir)


GCS_BUCKET = "bond-test"


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> str:
  """`gs://bond-test`, a bucket of a real GCS emulator (`gcp-storage-emulator`, in memory, with the header
  `gcs_emulator.py` adds) on a free 127.0.0.1 port, with the clients of this process and of the processes it starts
  pointed at it; stopped at the end of the session."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
  with open(log, "w", encoding="utf-8") as out:
    emulator = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start", "--host=127.0.0.1",
         f"--port={port}", "--in-memory", f"--default-bucket={GCS_BUCKET}"], stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while True:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        break
    assert emulator.poll() is None and time.monotonic() < deadline, log.read_text()
    time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  # gcsfs (and google-cloud-storage), TensorStore (orbax's arrays); gcsfs's experimental bucket-type probe would
  # wait a minute on a gRPC endpoint the emulator lacks.
  variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield f"gs://{GCS_BUCKET}"
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name)
      else:
        os.environ[name] = value
    emulator.terminate()
    emulator.wait(timeout=30)


class FaultTally:
  """Faults injected by the suite, and how many of them were survived with nothing lost, by kind.

  Record a fault as survived only after asserting that nothing was lost. A test may record the injection first
  and the survival once its final checks pass (`injected=0`), so that a failed test shows what it injected.

  Example:
    >>> def test_truncated_array_file(fault_tally):
    ...   ...  # Inject the fault, recover, assert that the restored state equals the saved one.
    ...   fault_tally.record("checkpoint: truncated array files", injected=1, survived=1)
  """

  def __init__(self):
    self.counts: dict[str, dict[str, int]] = {}

  def record(self, kind: str, injected: int, survived: int) -> None:
    counts = self.counts.setdefault(kind, {"injected": 0, "survived": 0})
    counts["injected"] += injected
    counts["survived"] += survived
    if not 0 <= counts["survived"] <= counts["injected"]:
      raise ValueError(f"fault kind {kind!r}: {counts['survived']} survived of {counts['injected']} injected")


_FAULT_TALLY = pytest.StashKey[FaultTally]()


@pytest.fixture(scope="session")
def fault_tally(request) -> FaultTally:
  """The session's `FaultTally`, reported at the end of the run."""
  return request.config.stash.setdefault(_FAULT_TALLY, FaultTally())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  counts = config.stash.get(_FAULT_TALLY, FaultTally()).counts
  path = os.environ.get("BOND_FAULT_REPORT")
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(counts, f, indent=2, sort_keys=True)
  if not counts:
    return
  terminalreporter.section("faults injected / survived with nothing lost")
  width = max(len(kind) for kind in counts)
  terminalreporter.line(f"{'kind':<{width}}  injected  survived")
  for kind, row in sorted(counts.items()):
    lost = "" if row["survived"] == row["injected"] else "  <- not all survived"
    terminalreporter.line(f"{kind:<{width}}  {row['injected']:>8}  {row['survived']:>8}{lost}")
