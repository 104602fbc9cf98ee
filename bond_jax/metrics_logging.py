"""Metric sinks: a JSONL file (one object per logged step, with `step`) and TensorBoard event files, on any file
system `paths` speaks (a local disk or an object store).

Both are written whole, never appended to, since an object store cannot append: `metrics.jsonl` is rewritten at
each write (`paths.write_whole`), and the TensorBoard events go to a local staging file that is written to
`tensorboard/` as a new event file (TensorBoard reads them all, in order) at each `flush`, so no event file is
uploaded twice. Only process 0 writes, so multi-host runs produce one record per step.

Example:
  >>> import tempfile
  >>> workdir = tempfile.mkdtemp()
  >>> writer = MetricsWriter(workdir)
  >>> writer.write(10, {"reward/policy": 0.5})
  >>> writer.close()
  >>> run = paths.as_path(workdir)
  >>> (run / "metrics.jsonl").read_text(), len(list((run / "tensorboard").iterdir()))
  ('{"step": 10, "reward/policy": 0.5}\\n', 1)
"""

import json
import math
import tempfile
import time
from collections.abc import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from bond_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_python_scalars(metrics: Mapping[str, object]) -> dict[str, float]:
  """Converts 0-d arrays and numpy scalars to floats (non-finite values become None in JSON)."""
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


class _EventFiles:
  """TensorBoard events staged in a local file and written to `directory` as one new event file per `flush`.

  `purge_step` goes into the first file: TensorBoard then hides the events of earlier files from that step on.
  """

  def __init__(self, directory: paths.Path, purge_step: int, flush_secs: float):
    self._directory = directory
    self._purge_step = purge_step
    self._flush_secs = flush_secs
    self._staging = tempfile.TemporaryDirectory(prefix="bond_jax_tensorboard_")
    self._writer = None
    self._started = 0.0

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      # The suffix orders the files of one second and keeps them apart.
      self._writer = SummaryWriter(self._staging.name, purge_step=self._purge_step,
                                   filename_suffix=f".{time.time_ns()}")
      self._purge_step, self._started = None, time.monotonic()
    for name, value in values.items():
      self._writer.add_scalar(name, value, step)
    if time.monotonic() - self._started > self._flush_secs:
      self.flush()

  def flush(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    for staged in paths.as_path(self._staging.name).iterdir():
      paths.write_whole(self._directory / staged.name, staged.read_bytes())
      staged.unlink()

  def close(self) -> None:
    self.flush()
    self._staging.cleanup()


class MetricsWriter:
  """Writes metric records to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`.

  What `write` was given is durable after the next `flush` (and `metrics.jsonl` at once); the trainer flushes
  before each checkpoint, so a resumed run finds every record up to its checkpoint.
  """

  def __init__(self, workdir: paths.PathLike, resume_step: int = 0, flush_secs: float = 120.0):
    """Opens the sinks; `resume_step` drops records past it (logged after the checkpoint a run resumes from): from
    metrics.jsonl, and from what TensorBoard shows of the event files. TensorBoard files are written at least
    every `flush_secs` seconds while records come."""
    self._active = jax.process_index() == 0
    if self._active:
      workdir = paths.as_path(workdir)
      self._path = workdir / METRICS_FILE
      self._lines = []
      if self._path.exists():
        self._lines = [line + "\n" for line in self._path.read_text().splitlines()
                       if json.loads(line)["step"] <= resume_step]
        paths.write_whole(self._path, "".join(self._lines))
      self._events = _EventFiles(workdir / TENSORBOARD_DIR, resume_step + 1, flush_secs)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self._active:
      return
    values = to_python_scalars(metrics)
    record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self._lines.append(json.dumps(record) + "\n")
    paths.write_whole(self._path, "".join(self._lines))
    self._events.add_scalars(int(step), values)

  def flush(self) -> None:
    """Makes every TensorBoard event written so far durable."""
    if self._active:
      self._events.flush()

  def close(self) -> None:
    if self._active:
      self._events.close()
