"""Train-state checkpoints with orbax: periodic (async) saves, keep-last-k, and a restore that skips bad ones.

A checkpoint holds two items: `state` (the `TrainState` pytree, sharded arrays included) and `data` (the
prompt iterator's JSON position), so a resumed run sees exactly the prompts an uninterrupted one would.
Orbax writes each step into a temporary directory and renames it when complete, so a save cut short by a crash
never looks like a checkpoint; one that is still unreadable (truncated files, another model's shapes) is
reported and the previous one is used.
"""

import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp



class CheckpointMismatchError(ValueError):
  """Every checkpoint in the directory is unreadable or does not match the run's train state."""


class Checkpointer:
  """Saves and restores `(train_state, data_state)` under `directory`.

  Example:
    >>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3)
    >>> ckpt.save(100, state, {"epoch": 0, "index": 1600})
    >>> state, data_state = ckpt.restore_latest(abstract_state)   # None when there is no checkpoint
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self._directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_names=("state", "data"),
    )

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving `state` and `data_state` as `step` (asynchronously: call `wait` before relying on it)."""
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=True)

  def wait(self) -> None:
    """Blocks until any save in flight is on disk."""
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable checkpoint; None if there are none.

    Args:
      abstract_state: the train state's structure as `jax.ShapeDtypeStruct`s carrying the target shardings
        (e.g. `jax.eval_shape` of the init with `sharding` set).

    Raises:
      CheckpointMismatchError: checkpoints exist but none can be restored into `abstract_state`; the message
        names each step and why.
    """
    failures, unreadable_steps = [], []
    for step in reversed(self.steps()):
      # Orbax re-raises TensorStore read errors (truncated or missing array files) as a bare `Exception`, so an
      # unreadable checkpoint can surface as any exception type; each one is logged and, if none restores,
      # reported in full.
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-exception-caught
        logging.warning("Checkpoint at step %d is unreadable (%s: %s); trying the previous one.",
                        step, type(e).__name__, e)
        failures.append(f"step {step}: {type(e).__name__}: {e}")
        unreadable_steps.append(step)
        continue
      if unreadable_steps:
        self._set_aside(unreadable_steps)
      return restored["state"], restored["data"]
    if failures:
      raise CheckpointMismatchError(
          "No checkpoint could be restored into this run's train state:\n  " + "\n  ".join(failures))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable step directories to `<directory>_unreadable/` (kept for inspection, never deleted).

    The resumed run saves those steps again, and orbax never overwrites an existing step.
    """
    if jax.process_index() == 0:
      for step in steps:
        target = os.path.join(f"{self._directory}_unreadable", f"{step}.{time.time_ns()}")
        logging.warning("Moving the unreadable checkpoint at step %d to %s.", step, target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self._directory, str(step)), target)
    multihost_utils.sync_global_devices("bond_jax_checkpoints_set_aside")
    self._manager.reload()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the shapes, dtypes and shardings of `tree`'s arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
