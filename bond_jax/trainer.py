"""The experiment runner: set-up over a mesh, compiled steps, the training loop, the report.

`train(config, workdir)` is what `experiments/run.py` calls; it reads as its sections: the config and the mesh,
what the config names (checked before compiling), the train state on the mesh (resumed from the workdir's latest
readable checkpoint, else the reference policy), the compiled steps, the loop (`TrainingLoop`), the report.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import tqdm

from bond_jax import checkpointing
from bond_jax import evaluation
from bond_jax import exact_evaluation
from bond_jax import export
from bond_jax import fine_tuning
from bond_jax import memory_estimate
from bond_jax import metrics_logging
from bond_jax import paths
from bond_jax import plots
from bond_jax import rewards
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import train_step as train_step_lib
from bond_jax.data import prompt_batches


EXPORT_DIR = "policy"  # Under the workdir: the trained policy as a Hugging Face checkpoint (`export.export_policy`).
ADAPTER_DIR = "adapter"  # Under the workdir, for LoRA: the trained adapter in peft's layout (`export.export_adapter`).
COMPLETIONS_FILE = "completions.jsonl"  # Under the workdir: samples of every evaluation (`evaluation.completion_rows`).
REPORT_ROWS = 3  # Rows of the last evaluation's completions that the report prints.


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps had a non-finite loss; the last good state was checkpointed."""


def train(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict:
  """Runs `config` in `workdir` (resuming from its checkpoints); returns the final report ({} if stopped by a
  signal).

  Writes `workdir/config.json` (resolved config), `metrics.jsonl` (train records every `log_every` steps and
  `eval/*` records at each evaluation, with standard errors), `completions.jsonl` (a reference, a policy and a
  Best-of-N sample of each held-out prompt at each evaluation), `tensorboard/`, `checkpoints/` and, at the end,
  `policy/` (the trained policy as a Hugging Face checkpoint in `config.policy.dtype`, with its tokenizer and stop
  ids; under LoRA the base with the adapter merged, and `adapter/`, the adapter alone in peft's layout),
  `report.json` (with standard errors and the policy's distance to the Best-of-N frontier) and `tradeoff.png`
  (`plots.plot_run`). `workdir` is a local path or an object-store URI (`gs://bucket/run`, see `paths`); every file
  is written whole, and checkpoints rely on orbax's commit marks, not on renames.

  Raises:
    paths.PathError: `workdir` cannot be written (an unknown scheme, a missing bucket or client, no credentials, an
      unreachable store), before anything is compiled.
    run_config.ConfigError: a bad config (before anything is compiled).
    prompt_batches.PromptError: the prompts cannot be used (before anything is compiled).
    rewards.RewardError: a user reward function (`config.reward.kind` "python" or "python_tokens") returns values
      of the wrong shape or type (before anything is compiled), or any reward is NaN or inf during training
      (the state before that step is checkpointed).
    memory_estimate.MemoryBudgetError: the run's estimated memory per device exceeds the device's (before
      anything is allocated on the mesh or compiled).
    NonFiniteLossError: `config.max_consecutive_nonfinite` non-finite steps in a row.
  """
  # The config and the mesh.
  run_config.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh_shape, config.mesh_axes)  # make_mesh resolves the -1 itself.
  workdir = paths.check_workdir(workdir)
  if jax.process_index() == 0:
    paths.write_whole(workdir / "config.json", config.to_json_best_effort(indent=2))

  # What the config names, checked before anything is compiled; the weights are read straight onto the mesh.
  ref_params, model_config, tokenizer = run_components.load_policy(config, mesh)
  reward_fn = run_components.load_reward(config, tokenizer, mesh)
  train_prompts, eval_prompts = run_components.load_prompts(config, tokenizer, model_config, workdir)
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  # Under LoRA the frozen base (and the reference's adapter) stands where the reference was, and the state starts
  # from the adapters (`fine_tuning`).
  ref_params, initial, identity = fine_tuning.setup(config, ref_params, model_config)
  _check_before_compiling(config, model_config, ref_params, reward_fn, optimizer, mesh, train_prompts, eval_prompts,
                          initial)
  # A reward model's weights, sharded once: the compiled steps take them as they are at every call.
  reward_fn = jax.device_put(reward_fn, sharding.param_shardings(reward_fn, mesh))

  # The train state on the mesh, resumed from the workdir's latest readable checkpoint.
  ref_params, param_shardings, state, state_shardings = sharded_train_state(config, ref_params, optimizer, mesh,
                                                                            initial)
  checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, identity=identity)
  restored = checkpointer.restore_latest(checkpointing.abstract_like(state))
  if restored is not None:
    state, data_state = restored
    train_prompts.set_state(data_state["train"])
    logging.info("Resumed from the checkpoint at step %d.", int(state.step))

  # The steps, compiled once before the loop.
  batch_sharding = sharding.batch_sharding(mesh, 2)
  steps = compile_steps(config, model_config, reward_fn, optimizer, mesh, state, ref_params, param_shardings,
                        state_shardings, batch_sharding, eval_prompts)

  # The loop.
  with TrainingLoop(config, workdir, steps, checkpointer, train_prompts, eval_prompts, batch_sharding,
                    tokenizer) as loop:
    state, final = loop.run(state, ref_params)
  if final is None:
    return {}

  # The report, and the policy as a Hugging Face checkpoint (every process gathers its shards; process 0 writes).
  tuning = fine_tuning.from_config(config)
  policy_params = tuning.policy(state.params, ref_params)
  export.export_policy(policy_params, model_config, tokenizer, workdir / EXPORT_DIR, dtype=config.policy.dtype)
  if identity is not None:
    export.export_adapter(state.params, tuning, model_config, workdir / ADAPTER_DIR, base_model=config.policy.path)
  summary = evaluation.report(final, config.eval.bon_ns)
  if jax.process_index() == 0:
    paths.write_whole(workdir / "report.json", json.dumps(summary, indent=2))
    print(format_report(summary))
    print(format_completions(loop.completions[:REPORT_ROWS]))
    print(f"plot: {plots.plot_run(workdir)}")
  return summary


def _check_before_compiling(config: ml_collections.ConfigDict, model_config, ref_params, reward_fn, optimizer,
                            mesh, train_prompts, eval_prompts, initial) -> None:
  """What can be found wrong before anything is allocated on the mesh or compiled, which takes minutes at scale.

  The lengths against the model's context (`ConfigError`); the first batch of each prompt split, read and put
  back (prompts the tokenizer cannot encode for the model, or none usable: `PromptError`); a user reward function
  called once on held-out prompts (`RewardError`); the memory estimate against the devices' (`MemoryBudgetError`).
  """
  total = config.data.prompt_len + config.sampling.max_new_tokens
  if total > model_config.max_seq_len:
    raise run_config.ConfigError(
        f"config.data.prompt_len + config.sampling.max_new_tokens = {total} is not allowed: expected at most the "
        f"model's context, {model_config.max_seq_len}.")
  _peek(train_prompts)
  probe = _peek(eval_prompts)
  if config.reward.kind in run_config.USER_REWARD_KINDS:
    rewards.check_reward_fn(reward_fn, probe["prompts"], probe["prompt_mask"])
  estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh, reward_fn,
                                                   initial)
  logging.info("Estimated memory: %s.", estimate)
  memory_estimate.check_fits(estimate, memory_estimate.device_memory_limit(config))


def sharded_train_state(config: ml_collections.ConfigDict, ref_params, optimizer, mesh, initial=None):
  """Places the reference on `mesh` and creates the initial train state there, sharded by the partition rules;
  then holds the frozen input as `fine_tuning.held_frozen` says (a full fine-tune's reference in the compute dtype),
  while the policy, the anchor and the optimizer state stay float32.

  `initial` is what the state's trained parameters start from: None, a copy of `ref_params` (a full fine-tune);
  under LoRA, the adapters, `ref_params` being the frozen base (`fine_tuning.setup`).

  Returns:
    `(ref_params, param_shardings, state, state_shardings)`, the shardings being pytrees of `NamedSharding`
    matching `ref_params` and the `TrainState`.
  """
  param_shardings = sharding.param_shardings(ref_params, mesh)
  ref_params = jax.device_put(ref_params, param_shardings)
  trained = ref_params if initial is None else initial
  init = functools.partial(train_state_lib.create_train_state, optimizer=optimizer, seed=config.seed)
  state_shardings = sharding.param_shardings(jax.eval_shape(init, trained), mesh)
  state = jax.jit(init, out_shardings=state_shardings)(trained)
  # Elementwise on the placed arrays, so their shardings stay `param_shardings`; under LoRA nothing is copied.
  return fine_tuning.held_frozen(config, ref_params, initial), param_shardings, state, state_shardings


class CompiledSteps(NamedTuple):
  """The run's programs, compiled before the loop, each with the reward bound.

  Attributes:
    train: `(state, ref_params, batch) -> (state, metrics)`, donating the state.
    evaluate: `(params, ref_params, batch, rng) -> metrics` (`evaluation.make_eval_step`).
    exact: `(params, anchor_params, ref_params) -> metrics` on the held-out prompts (`exact_evaluation`), or None
      when `config.exact.every` is 0.
  """

  train: Callable[..., Any]
  evaluate: Callable[..., Any]
  exact: Callable[..., Any] | None


def compile_steps(config, model_config, reward_fn, optimizer, mesh, state, ref_params, param_shardings,
                  state_shardings, batch_sharding, eval_prompts) -> CompiledSteps:
  """Compiles the train, evaluation and (with `config.exact.every`) exact-evaluation steps for the mesh.

  Compiling before the loop, once, means a call with other shapes or shardings fails at once instead of silently
  compiling again (tested).
  """
  batch_shardings = {"prompts": batch_sharding, "prompt_mask": batch_sharding}
  abstract_batch = lambda prompts: {  # noqa: E731
      key: jax.ShapeDtypeStruct((prompts, config.data.prompt_len), dtype, sharding=batch_sharding)
      for key, dtype in (("prompts", np.int32), ("prompt_mask", np.bool_))}
  compile_with_reward = functools.partial(_compile_with_reward, reward_fn=reward_fn, mesh=mesh)
  # Evaluation sees the models' parameters: the trained ones merged with the frozen base under LoRA.
  tuning = fine_tuning.from_config(config)
  policy_shardings = state_shardings.params
  train = compile_with_reward(
      "train step", lambda reward: train_step_lib.make_train_step(config, model_config, reward, optimizer),
      in_shardings=(state_shardings, param_shardings, batch_shardings),
      args=(state, ref_params, abstract_batch(config.batch_size)), out_shardings=(state_shardings, None),
      donate_argnums=1)
  def evaluate_models(reward):
    evaluate_step = evaluation.make_eval_step(config, model_config, reward)
    return lambda params, frozen, *args: evaluate_step(tuning.policy(params, frozen), tuning.reference(frozen), *args)

  # Per-prompt outputs, replicated: every host reads all of them (they are small).
  evaluate = compile_with_reward(
      "evaluation step", evaluate_models, in_shardings=(policy_shardings, param_shardings, batch_shardings, None),
      args=(state.params, ref_params, abstract_batch(run_config.eval_batch_size(config)), jax.random.PRNGKey(0)),
      out_shardings=NamedSharding(mesh, P()))
  if not config.exact.every:
    return CompiledSteps(train, evaluate, None)
  # The first held-out batch, each prompt once, replicated: every host gathers the same prompts.
  local = _peek(eval_prompts)
  exact_batch = exact_evaluation.distinct_prompts(
      {key: multihost_utils.process_allgather(np.asarray(local[key]), tiled=True)
       for key in ("prompts", "prompt_mask")})
  def exact_models(reward):
    exact_step = exact_evaluation.make_exact_step(config, model_config, reward)
    return lambda params, anchor_params, frozen, batch: exact_step(
        tuning.policy(params, frozen), tuning.policy(anchor_params, frozen), tuning.reference(frozen), batch)

  exact = compile_with_reward(
      "exact evaluation", exact_models, in_shardings=(policy_shardings, policy_shardings, param_shardings, None),
      args=(state.params, state.anchor_params, ref_params, exact_batch))
  return CompiledSteps(train, evaluate, lambda *params: exact(*params, exact_batch))


def _compile_with_reward(name: str, make_fn, reward_fn, mesh, in_shardings, args, **jit_kwargs):
  """Compiles `make_fn(reward_fn)` for `args` ahead of time, with the reward as an argument; returns it bound.

  A reward model's weights (the leaves of its `RewardFn` pytree) then enter the compiled program as sharded
  inputs rather than as constants baked into it, which would compile slowly and hold a second copy in memory.
  `args` may be arrays or `jax.ShapeDtypeStruct`s; `donate_argnums` counts the arguments after the reward, from 1.
  It is traced on `mesh` (`jax.set_mesh`), so activations are sharded as `sharding.ACTIVATION_RULES` says.
  """
  jitted = jax.jit(lambda reward, *fn_args: make_fn(reward)(*fn_args),
                   in_shardings=(sharding.param_shardings(reward_fn, mesh), *in_shardings), **jit_kwargs)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jitted.lower(reward_fn, *args).compile()
  logging.info("Compiled the %s in %.1f s.", name, time.perf_counter() - start)
  return functools.partial(compiled, reward_fn)


def _global_batch(local: dict, batch_sharding) -> dict[str, jax.Array]:
  """This host's rows of a batch -> global arrays sharded over the mesh's batch axes."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[key]))
          for key in ("prompts", "prompt_mask")}


def _peek(prompts: prompt_batches.PromptIterator) -> dict:
  """The next batch of a prompt iterator, leaving the iterator where it was."""
  position = prompts.get_state()
  batch = next(prompts)
  prompts.set_state(position)
  return batch


class _StopRequests:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so it can checkpoint and exit cleanly."""

  def __init__(self):
    self.signal_name = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    # A second signal while saving changes nothing: the save in progress completes.
    self.signal_name = signal.Signals(signum).name

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class TrainingLoop:
  """The training loop, its state and its exits.

  It steps from the state's step to `config.num_steps`, reading each step's metrics one step late (so the host
  never stalls the device; a checkpointed step's before its checkpoint, which waits for the step anyway),
  evaluating, checkpointing and computing the exact KLs on their schedules. It ends in one of four ways, each leaving
  the state of its last good step checkpointed:
  - every step done: the final evaluation is returned;
  - SIGTERM or SIGINT: the current step is checkpointed and `run` returns no evaluation;
  - a NaN or inf reward: the step was skipped; `RewardError` names the step and the prompt;
  - `config.max_consecutive_nonfinite` non-finite steps in a row: `NonFiniteLossError`.

  Use it as a context manager: leaving it restores the signal handlers and closes the metric sinks.

  Attributes:
    completions: the rows the last evaluation wrote to `completions.jsonl` (`evaluation.completion_rows`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: paths.Path, steps: CompiledSteps,
               checkpointer: checkpointing.Checkpointer, train_prompts: prompt_batches.PromptIterator,
               eval_prompts: prompt_batches.PromptIterator, batch_sharding: NamedSharding, tokenizer):
    self._config = config
    self._workdir = workdir
    self._steps = steps
    self._checkpointer = checkpointer
    self._train_prompts = train_prompts
    self._eval_prompts = eval_prompts
    self._eval_start = eval_prompts.get_state()
    self._batch_sharding = batch_sharding
    self._tokenizer = tokenizer
    self.completions = []
    self._state = None
    self._ref_params = None
    self._pending = None  # (step, metrics on the device, this host's prompt texts) of the last step run.
    self._consecutive_nonfinite = 0
    self._window_tokens, self._window_start = 0.0, time.perf_counter()  # Throughput since the last logged step.
    self._start_step = 0
    self._writer = self._stop = self._progress = self._completions_file = None

  def __enter__(self) -> TrainingLoop:
    self._stop = _StopRequests()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.restore()
    if self._progress is not None:
      self._progress.close()
    if self._writer is not None:
      self._writer.close()

  def run(self, state, ref_params) -> tuple[Any, dict[str, float] | None]:
    """Trains from `state` to `config.num_steps`; returns the final state and evaluation (None: a signal stopped
    the run).

    Raises:
      rewards.RewardError: a reward was NaN or inf.
      NonFiniteLossError: too many non-finite steps in a row.
    """
    config = self._config
    self._state, self._ref_params = state, ref_params
    self._start_step = int(state.step)
    self._writer = metrics_logging.MetricsWriter(self._workdir, resume_step=self._start_step)
    if jax.process_index() == 0:
      self._completions_file = metrics_logging.JsonlRecords(self._workdir / COMPLETIONS_FILE, self._start_step)
    self._progress = tqdm.tqdm(total=config.num_steps, initial=self._start_step, desc=config.algorithm,
                               unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)
    if self._start_step == 0:
      self._exact(0)
    for step in range(self._start_step + 1, config.num_steps + 1):
      batch = next(self._train_prompts)
      self._state, metrics = self._steps.train(self._state, ref_params, _global_batch(batch, self._batch_sharding))
      self._record_pending()
      self._pending = (step, metrics, batch["text"])
      self._progress.update(1)
      self._exact(step)
      if step % config.checkpoint_every == 0 and step != config.num_steps:
        self._save()
      if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
        self._evaluate(step)
      if self._stop.signal_name:
        self._record_pending()
        self._finish()
        logging.warning("%s received: checkpointed step %d and stopped.", self._stop.signal_name, step)
        return self._state, None
    self._record_pending()
    self._save()
    final = self._evaluate(config.num_steps)
    self._checkpointer.close()
    return self._state, final

  def _record_pending(self) -> None:
    """Reads the last step's metrics and acts on them: logs them on logged steps, stops on non-finite values."""
    if self._pending is None:
      return
    step, metrics, texts = self._pending
    self._pending = None
    metrics = metrics_logging.to_python_scalars(jax.device_get(metrics))
    if metrics["reward/nonfinite_prompts"]:
      # The step with the bad rewards was skipped: the state holds only finite updates.
      self._finish()
      raise rewards.RewardError(_nonfinite_reward_message(step, metrics, texts, self._workdir))
    self._consecutive_nonfinite = self._consecutive_nonfinite + 1 if metrics["nonfinite"] else 0
    self._window_tokens += metrics["tokens/generated"]
    if train_step_lib.is_log_step(self._config, step):
      elapsed = time.perf_counter() - self._window_start
      metrics["perf/tokens_per_s"] = self._window_tokens / elapsed
      metrics["perf/step_time_s"] = elapsed / min(self._config.log_every, step - self._start_step)
      self._writer.write(step, metrics)
      self._progress.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in
                                  ("reward/policy", "kl/policy_ref", "quantile/policy_vs_anchor") if k in metrics})
      self._window_tokens, self._window_start = 0.0, time.perf_counter()
    if self._consecutive_nonfinite >= self._config.max_consecutive_nonfinite:
      # Skipped steps leave the state as it was: this is the last good state.
      self._finish()
      raise NonFiniteLossError(
          f"{self._consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last at step {step}); "
          f"the last good state is checkpointed in {self._workdir}/checkpoints.")

  def _save(self) -> None:
    """Checkpoints the state under its own step (the data position always matches it), after the metrics up to it
    are durable: a run resumed from it logs only the steps after it."""
    self._record_pending()
    self._writer.flush()
    step = int(self._state.step)
    # A stop (signal or non-finite losses) can come right after the periodic save of the same step.
    if step not in self._checkpointer.steps():
      self._checkpointer.save(step, self._state, {"train": self._train_prompts.get_state()})

  def _finish(self) -> None:
    """Every exit's last act: the current state checkpointed and on disk."""
    self._save()
    self._checkpointer.close()

  def _evaluate(self, step: int) -> dict[str, float]:
    """Evaluates the policy on the same held-out prompts every time; logs and returns the metrics averaged over
    prompts, with their standard errors (`evaluation.summarize`), and writes the samples to `completions.jsonl`."""
    self._eval_prompts.set_state(self._eval_start)
    rng = jax.random.PRNGKey(self._config.seed + 1)
    outputs, texts = [], []
    for i in range(self._config.eval_batches):
      batch = next(self._eval_prompts)
      outputs.append(jax.device_get(self._steps.evaluate(self._state.params, self._ref_params, _global_batch(
          batch, self._batch_sharding), jax.random.fold_in(rng, i))))
      texts.append(batch["text"])  # This host's rows, the first of the global batch on process 0.
    metrics = evaluation.summarize([out.metrics for out in outputs])
    self._writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
    bon_ns = self._config.eval.bon_ns
    decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    self.completions = [row for out, batch_texts in zip(outputs, texts) for row in evaluation.completion_rows(
        step, out.completions, batch_texts, decode, bon_ns, evaluation.nearest_bon_n(metrics, bon_ns))]
    if jax.process_index() == 0:
      self._completions_file.append(self.completions)
    return metrics

  def _exact(self, step: int) -> None:
    """Logs the exact KLs (`exact_evaluation`) every `config.exact.every` steps and at the end."""
    every = self._config.exact.every
    if self._steps.exact is not None and (step % every == 0 or step == self._config.num_steps):
      state = self._state
      self._writer.write(step, jax.device_get(self._steps.exact(state.params, state.anchor_params,
                                                                 self._ref_params)))


def _nonfinite_reward_message(step: int, metrics: dict[str, float], texts: list[str], workdir: str) -> str:
  """Names the step, how many prompts got a NaN/inf reward, the first one's batch index and (on its host) text."""
  index = int(metrics["reward/first_nonfinite_prompt"])
  local = index - jax.process_index() * len(texts)
  prompt = f" (prompt {texts[local]!r})" if 0 <= local < len(texts) else ""
  return (f"step {step}: the reward function returned a non-finite value (NaN or inf) for "
          f"{int(metrics['reward/nonfinite_prompts'])} prompt(s) of the batch, the first at batch index "
          f"{index}{prompt}. The step was skipped and the state before it is checkpointed in {workdir}/checkpoints; "
          f"fix the reward (config.reward) and run again to resume.")


def format_report(summary: dict[str, dict[str, float]]) -> str:
  """The report as a table: one row per sampler (reference, Best-of-N, policy), each mean ± its standard error, and
  where the policy stands against the Best-of-N frontier at its KL."""
  lines = [f"{'sampler':<10} {'reward':>15} {'quantile':>15} {'KL(.||ref)':>15}"]
  for name, row in summary.items():
    cells = " ".join(f"{row[field]:>7.3f} ± {row[field + '_se']:.3f}"
                     for field in ("reward_mean", "reward_quantile", "kl_to_ref"))
    bound = f"  (tie-free bound {row['kl_bound']:.3f})" if "kl_bound" in row else ""
    lines.append(f"{name:<10} {cells}{bound}")
  policy = summary["policy"]
  lines.append(f"Best-of-N frontier at the policy's KL: quantile {policy['frontier_quantile']:.3f}; the policy is "
               f"{policy['frontier_gap']:+.3f} ± {policy['frontier_gap_se']:.3f} from it and spends "
               f"{policy['frontier_excess_kl']:.2f} ± {policy['frontier_excess_kl_se']:.2f} nats more than Best-of-N "
               "for its quantile")
  return "\n".join(lines)


def format_completions(rows: list[dict]) -> str:
  """Rows of `completions.jsonl` for a person to read: each prompt with its samples, rewards and quantiles."""
  blocks = []
  for row in rows:
    labels = {"reference": "reference", "policy": "policy", "best_of_n": f"Best-of-{row['best_of_n']['n']}"}
    lines = [f"{'prompt':<12} {row['prompt']}"]
    lines += [f"{label:<12} {row[key]['text']}  (reward {row[key]['reward']:.2f}, quantile {row[key]['quantile']:.2f})"
              for key, label in labels.items()]
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)
