"""Train-state checkpoints with orbax: periodic (async) saves, keep-last-k, and a restore that checks before it reads.

A checkpoint holds two items: `state` (the `TrainState` pytree, sharded arrays included) and `data` (the
prompt iterator's JSON position), so a resumed run sees exactly the prompts an uninterrupted one would. The
directory is any path `paths` speaks: a local disk or an object store (`gs://...`), handed to orbax as it is.

A run killed at any moment leaves only complete checkpoints among the step directories. Orbax marks a step
complete in one atomic act, which a save cut short never reaches (the next run deletes what it left): on a local
disk it renames a temporary directory to the step's, on an object store (no renames there) it writes
`commit_success.txt` into the step's directory last. An old step past `keep` is retired the same way backwards
before it is deleted: its `commit_success.txt` is deleted first (on an object store the step is then no
checkpoint), then orbax renames it into `deleting/` (a local disk; orbax deletes in place on an object store), and
only then are its files deleted, so a deletion cut short leaves a half-deleted directory that is no checkpoint and
that the next run removes.
A checkpoint whose tree and shapes match the run but whose files still cannot be read (truncated or missing array
files) is reported, moved to `<directory>_unreadable/`, and the previous one is used. One whose tree or shapes do
not match (another model's workdir, or a changed config) is the user's to resolve: `restore_latest` raises
`CheckpointMismatchError` naming the differences and changes nothing.
"""

import threading
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from bond_jax import paths

# Orbax's `todelete_subdir`: old steps are renamed into it, then deleted (on a local disk). Not a number, so never
# taken for a step.
DELETING_SUBDIR = "deleting"
# Orbax's mark of a complete step (on an object store, the only one).
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE
_MAX_LISTED_MISMATCHES = 6


class CheckpointMismatchError(ValueError):
  """A checkpoint's tree or shapes do not match the run's train state, or no checkpoint can be read at all."""


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint that matches the run's train state has files that cannot be read (truncated, missing)."""


class Checkpointer:
  """Saves and restores `(train_state, data_state)` under `directory`.

  Example:
    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> ckpt = Checkpointer(directory, keep=2)
    >>> for step in (1, 2, 3):
    ...   ckpt.save(step, {"w": jnp.full(3, step)}, {"index": 16 * step})
    >>> ckpt.close()
    >>> ckpt = Checkpointer(directory, keep=2)
    >>> state, data_state = ckpt.restore_latest(abstract_like({"w": jnp.zeros(3, int)}))  # None: no checkpoint
    >>> ckpt.steps(), state["w"], data_state
    ([2, 3], Array([3, 3, 3], dtype=int32), {'index': 48})
    >>> ckpt.close()
  """

  def __init__(self, directory: paths.PathLike, keep: int, async_save: bool = True, read_only: bool = False):
    """Opens `directory`, deleting what a killed run left unfinished there (unless `read_only`).

    Args:
      directory: where the step directories are: a local path or an object-store URI (`paths`).
      keep: how many recent checkpoints to keep.
      async_save: whether `save` returns before the checkpoint is on disk.
      read_only: only restore, changing nothing on disk (e.g. to inspect the checkpoints of a run in progress).
    """
    self._directory = paths.as_path(directory)
    self._keep = keep
    self._read_only = read_only
    self._primary = jax.process_index() == 0 and not read_only
    self._purge = None
    if self._primary:
      # Before orbax renames any step into `deleting/`: a leftover of the same step there would block the rename.
      self._purge_deleting()
    # Old steps are retired by `_retire`, not by orbax's `max_to_keep`, which deletes without uncommitting first.
    options = (ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0) if read_only else
               ocp.CheckpointManagerOptions(
                   create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                   todelete_subdir=DELETING_SUBDIR, enable_background_delete=True))
    self._manager = ocp.CheckpointManager(
        self._directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving `state` and `data_state` as `step` (asynchronously: call `wait` before relying on it).

    The steps before the newest `keep` complete ones are retired first, so `keep` complete checkpoints remain
    while this one is written.
    """
    self.wait()
    self._retire(self.steps()[:-self._keep])
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=True)

  def wait(self) -> None:
    """Blocks until any save in flight is on disk."""
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the checkpoint at `step`, after checking its tree and shapes against `abstract_state`.

    Args:
      step: a step of `steps()`.
      abstract_state: the train state's structure as `jax.ShapeDtypeStruct`s carrying the target shardings
        (e.g. `jax.eval_shape` of the init with `sharding` set).

    Returns:
      `(state, data_state)`.

    Raises:
      CheckpointMismatchError: the checkpoint's tree or shapes differ from `abstract_state`'s (no array is read);
        the message names the first few differences.
      UnreadableCheckpointError: its files cannot be read.

    Example (inspecting the checkpoints of a run in progress):
      >>> import tempfile
      >>> directory = tempfile.mkdtemp()
      >>> ckpt = Checkpointer(directory, keep=2, async_save=False)
      >>> ckpt.save(1, {"w": jnp.ones(3)}, {"index": 16})
      >>> Checkpointer(directory, keep=2, read_only=True).restore(1, abstract_like({"w": jnp.zeros(3)}))
      ({'w': Array([1., 1., 1.], dtype=float32)}, {'index': 16})
      >>> Checkpointer(directory, keep=2, read_only=True).restore(1, abstract_like({"w": jnp.zeros(4)}))
      Traceback (most recent call last):
      ...
      bond_jax.checkpointing.CheckpointMismatchError: the checkpoint at step 1 in ...: w: checkpoint (3,) vs ...
    """
    # Cut or missing files surface as ValueError (from TensorStore, which reads the arrays' metadata, or from the JSON
    # parser) or OSError, and a checkpoint without a `state` item as KeyError.
    try:
      saved = self._manager.item_metadata(step)["state"]
    except (OSError, ValueError, KeyError) as e:
      raise UnreadableCheckpointError(f"step {step}: {type(e).__name__}: {e}") from e
    if saved is None:
      raise UnreadableCheckpointError(f"step {step}: the train state's tree metadata is missing")
    mismatches = _mismatches(_shapes(saved), _shapes(abstract_state))
    if mismatches:
      listed = mismatches[:_MAX_LISTED_MISMATCHES]
      more = len(mismatches) - len(listed)
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self._directory} does not match this run's train state (another "
          f"model's workdir, or a changed config?): {'; '.join(listed)}" + (f"; and {more} more" if more else ""))
    # The tree and shapes match, so what fails now is reading the files. Orbax re-raises TensorStore read errors
    # (truncated or corrupt array files) as a bare `Exception`, and a missing or cut `data` item as KeyError or
    # ValueError.
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise UnreadableCheckpointError(f"step {step}: {type(e).__name__}: {e}") from e
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable checkpoint; None if there are none.

    Unreadable checkpoints newer than it are logged and moved to `<directory>_unreadable/`.

    Args:
      abstract_state: as for `restore`.

    Raises:
      CheckpointMismatchError: the newest checkpoint that can be checked does not match `abstract_state` (nothing
        is moved), or none can be read (the message names each step and why).
    """
    failures = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(step, abstract_state)
      except UnreadableCheckpointError as e:
        logging.warning("Checkpoint at step %d is unreadable (%s); trying the previous one.", step, e)
        failures.append((step, str(e)))
        continue
      if failures:
        self._set_aside([step for step, _ in failures])
      return restored
    if failures:
      raise CheckpointMismatchError(
          f"no checkpoint in {self._directory} can be read: " + "; ".join(reason for _, reason in failures))
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable step directories to `<directory>_unreadable/` (kept for inspection, never deleted).

    Each is uncommitted first, so a move cut short (an object store copies and deletes each file) leaves no
    checkpoint behind. The resumed run saves those steps again, and orbax never overwrites an existing step.
    """
    if self._primary:
      for step in steps:
        target = self._directory.parent / f"{self._directory.name}_unreadable" / f"{step}.{time.time_ns()}"
        logging.warning("Moving the unreadable checkpoint at step %d to %s.", step, target)
        self._uncommit(step)
        paths.move_dir(self._directory / str(step), target)
    multihost_utils.sync_global_devices("bond_jax_checkpoints_set_aside")
    self._manager.reload()

  def _uncommit(self, step: int) -> None:
    """Deletes the step's commit mark: on an object store the step is no checkpoint from then on."""
    (self._directory / str(step) / COMMIT_FILE).unlink(missing_ok=True)

  def _retire(self, steps: list[int]) -> None:
    """Deletes old steps, each uncommitted first (all processes call it; the primary changes the files)."""
    if not steps:
      return
    self._wait_for_purge()
    for step in steps:
      if self._primary:
        self._uncommit(step)
      self._manager.delete(step)  # In the background; on a local disk, a rename into `deleting/` first.
    if self._primary:
      self._purge = threading.Thread(target=self._purge_deleting, name="bond_jax_checkpoint_purge", daemon=True)
      self._purge.start()

  def _purge_deleting(self) -> None:
    """Deletes the old steps orbax renamed into `deleting/` (a kill half-way leaves the rest to the next run)."""
    deleting = self._directory / DELETING_SUBDIR
    if deleting.is_dir():
      for entry in deleting.iterdir():
        entry.rmtree()

  def _wait_for_purge(self) -> None:
    if self._purge is not None:
      self._purge.join()
      self._purge = None

  def close(self) -> None:
    """Waits for the save in flight, retires the steps before the newest `keep` and waits for their deletion."""
    self.wait()
    if not self._read_only:
      self._retire(self.steps()[:-self._keep])
    self._manager.close()  # Waits for orbax's deletions.
    if self._primary:
      self._wait_for_purge()
      self._purge_deleting()  # What the last deletions moved there.


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Leaf path ("params/layer_0/attn/q/kernel") -> shape, for a train state or a checkpoint's tree metadata."""
  return {path: tuple(leaf.shape) for path, leaf in ocp.tree.to_flat_dict(tree, sep="/").items()}


def _absent_subtrees(paths: set[str], present: set[str]) -> list[str]:
  """The largest subtrees holding `paths` with no path of `present` in them ("anchor_params" for all its leaves)."""
  present_prefixes = {"/".join(parts[:i]) for parts in (p.split("/") for p in present)
                      for i in range(1, len(parts) + 1)}
  absent = set()
  for path in paths:
    parts = path.split("/")
    prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    absent.add(next((prefix for prefix in prefixes if prefix not in present_prefixes), path))
  return sorted(absent)


def _mismatches(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
  """What differs between a checkpoint's leaf shapes and the run's, one phrase per difference."""
  missing = _absent_subtrees(expected.keys() - saved.keys(), set(saved))
  extra = _absent_subtrees(saved.keys() - expected.keys(), set(expected))
  return ([f"{path} is missing from the checkpoint" for path in missing]
          + [f"{path} is in the checkpoint but not in this run" for path in extra]
          + [f"{path}: checkpoint {saved[path]} vs this run {shape}"  # In the run's tree order: params first.
             for path, shape in expected.items() if path in saved and saved[path] != shape])


def abstract_like(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with the shapes, dtypes and shardings of `tree`'s arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
