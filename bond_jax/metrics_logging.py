"""Metric sinks: a JSONL file (one object per logged step, with `step`) and TensorBoard event files.

Only process 0 writes, so multi-host runs produce one record per step.
"""

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter


def to_python_scalars(metrics: Mapping[str, object]) -> dict[str, float]:
  """Converts 0-d arrays and numpy scalars to floats (non-finite values become None in JSON)."""
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def drop_records_after(path: str, step: int) -> None:
  """Keeps the records of the JSONL file at `path` (if any) whose `step` is at most `step`."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # A line cut short when the process was killed.
        continue
      if record["step"] <= step:
        kept.append(line)
  # Written aside and renamed over the file: a kill half-way must not lose the records the resumed run keeps.
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(f"{path}.tmp", path)


class MetricsWriter:
  """Appends metric records to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`.

  Example:
    >>> writer = MetricsWriter("/tmp/run")
    >>> writer.write(10, {"reward/policy": 0.3})
    >>> writer.close()
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    """Opens the sinks; `resume_step` drops records past it (logged after the checkpoint a run resumes from): from
    metrics.jsonl, and from what TensorBoard shows of the event files."""
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      drop_records_after(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self._active:
      return
    values = to_python_scalars(metrics)
    record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
