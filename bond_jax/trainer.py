"""The training loop: set-up over a mesh, jitted steps, metrics, evaluation, checkpoints, preemption, report.

`train(config, workdir)` is what `experiments/run.py` calls. Resume order: the workdir's latest readable
checkpoint (train state and data position), else a fresh state from the reference policy.
"""

import functools
import json
import os
import signal
import time

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
from bond_jax import memory_estimate
from bond_jax import metrics_logging
from bond_jax import plots
from bond_jax import rewards
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import train_step as train_step_lib


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps had a non-finite loss; the last good state was checkpointed."""


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


def _global_batch(local: dict, batch_sharding) -> dict[str, jax.Array]:
  """This host's rows of a batch -> global arrays sharded over the mesh's batch axes."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[key]))
          for key in ("prompts", "prompt_mask")}


def sharded_train_state(config: ml_collections.ConfigDict, ref_params, optimizer, mesh):
  """Places the reference on `mesh` and creates the initial train state there, sharded by the partition rules.

  Returns:
    `(ref_params, param_shardings, state, state_shardings)`, the shardings being pytrees of `NamedSharding`
    matching `ref_params` and the `TrainState`.
  """
  param_shardings = sharding.param_shardings(ref_params, mesh)
  ref_params = jax.device_put(ref_params, param_shardings)
  init = functools.partial(train_state_lib.create_train_state, optimizer=optimizer, seed=config.seed)
  state_shardings = sharding.param_shardings(jax.eval_shape(init, ref_params), mesh)
  return ref_params, param_shardings, jax.jit(init, out_shardings=state_shardings)(ref_params), state_shardings


def _compile_with_reward(name: str, make_fn, reward_fn, mesh, in_shardings, args, **jit_kwargs):
  """Compiles `make_fn(reward_fn)` for `args` ahead of time, with the reward as an argument; returns it bound.

  A reward model's weights (the leaves of its `RewardFn` pytree) then enter the compiled program as sharded
  inputs rather than as constants baked into it, which would compile slowly and hold a second copy in memory.
  Compiling before the loop, once, means a call with other shapes or shardings fails at once instead of
  silently compiling again. `args` may be arrays or `jax.ShapeDtypeStruct`s; `donate_argnums` counts the
  arguments after the reward, from 1.
  """
  jitted = jax.jit(lambda reward, *fn_args: make_fn(reward)(*fn_args),
                   in_shardings=(sharding.param_shardings(reward_fn, mesh), *in_shardings), **jit_kwargs)
  start = time.perf_counter()
  compiled = jitted.lower(reward_fn, *args).compile()
  logging.info("Compiled the %s in %.1f s.", name, time.perf_counter() - start)
  return functools.partial(compiled, reward_fn)


def _peek(prompts) -> dict:
  """The next batch of a prompt iterator, leaving the iterator where it was."""
  position = prompts.get_state()
  batch = next(prompts)
  prompts.set_state(position)
  return batch


def _average(records: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def _check_before_compiling(config: ml_collections.ConfigDict, model_config, ref_params, reward_fn, optimizer,
                            mesh, train_prompts, eval_prompts) -> None:
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
  estimate = memory_estimate.estimate_train_memory(config, model_config, ref_params, optimizer, mesh, reward_fn)
  logging.info("Estimated memory: %s.", estimate)
  memory_estimate.check_fits(estimate, memory_estimate.device_memory_limit(config))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config` in `workdir` (resuming from its checkpoints); returns the final report.

  Writes `workdir/config.json` (resolved config), `metrics.jsonl` (train records every `log_every` steps and
  `eval/*` records at each evaluation), `tensorboard/`, `checkpoints/` and, at the end, `report.json` and
  `tradeoff.png` (`plots.plot_run`).

  Raises:
    run_config.ConfigError: a bad config (before anything is compiled).
    prompt_batches.PromptError: the prompts cannot be used (before anything is compiled).
    rewards.RewardError: a user reward function (`config.reward.kind` "python" or "python_tokens") returns values
      of the wrong shape or type (before anything is compiled), or any reward is NaN or inf during training
      (the state before that step is checkpointed).
    memory_estimate.MemoryBudgetError: the run's estimated memory per device exceeds the device's (before
      anything is allocated on the mesh or compiled).
    NonFiniteLossError: `config.max_consecutive_nonfinite` non-finite steps in a row.
  """
  run_config.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh_shape, config.mesh_axes)  # make_mesh resolves the -1 itself.
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  ref_params, model_config, tokenizer = run_components.load_policy(config)
  reward_fn = run_components.load_reward(config, tokenizer)
  train_prompts, eval_prompts = run_components.load_prompts(config, tokenizer, model_config, workdir)
  eval_start = eval_prompts.get_state()
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  _check_before_compiling(config, model_config, ref_params, reward_fn, optimizer, mesh, train_prompts, eval_prompts)

  ref_params, param_shardings, state, state_shardings = sharded_train_state(config, ref_params, optimizer, mesh)

  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  restored = checkpointer.restore_latest(checkpointing.abstract_like(state))
  if restored is not None:
    state, data_state = restored
    train_prompts.set_state(data_state["train"])
    logging.info("Resumed from the checkpoint at step %d.", int(state.step))
  start_step = int(state.step)

  batch_sharding = sharding.batch_sharding(mesh, 2)
  batch_shardings = {"prompts": batch_sharding, "prompt_mask": batch_sharding}
  abstract_batch = {key: jax.ShapeDtypeStruct((config.batch_size, config.data.prompt_len), dtype,
                                              sharding=batch_sharding)
                    for key, dtype in (("prompts", np.int32), ("prompt_mask", np.bool_))}
  compile_with_reward = functools.partial(_compile_with_reward, reward_fn=reward_fn, mesh=mesh)
  step_fn = compile_with_reward(
      "train step", lambda reward: train_step_lib.make_train_step(config, model_config, reward, optimizer),
      in_shardings=(state_shardings, param_shardings, batch_shardings),
      args=(state, ref_params, abstract_batch), out_shardings=(state_shardings, None), donate_argnums=1)
  eval_fn = compile_with_reward(
      "evaluation step", lambda reward: evaluation.make_eval_step(config, model_config, reward),
      in_shardings=(param_shardings, param_shardings, batch_shardings, None),
      args=(state.params, ref_params, abstract_batch, jax.random.PRNGKey(0)))

  def evaluate(step: int) -> dict[str, float]:
    eval_prompts.set_state(eval_start)  # The same held-out prompts every time.
    rng = jax.random.PRNGKey(config.seed + 1)
    records = [jax.device_get(eval_fn(state.params, ref_params, _global_batch(next(eval_prompts), batch_sharding),
                                      jax.random.fold_in(rng, i)))
               for i in range(config.eval_batches)]
    metrics = _average(records)
    writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
    return metrics

  exact_fn = exact_batch = None
  if config.exact.every:
    # The first held-out batch, each prompt once, replicated: every host gathers the same prompts.
    local = _peek(eval_prompts)
    exact_batch = exact_evaluation.distinct_prompts(
        {key: multihost_utils.process_allgather(np.asarray(local[key]), tiled=True)
         for key in ("prompts", "prompt_mask")})
    exact_fn = compile_with_reward(
        "exact evaluation", lambda reward: exact_evaluation.make_exact_step(config, model_config, reward),
        in_shardings=(param_shardings, param_shardings, param_shardings, None),
        args=(state.params, state.anchor_params, ref_params, exact_batch))

  def exact(step: int) -> None:
    """Logs the exact KLs (`exact_evaluation`) every `config.exact.every` steps and at the end."""
    if exact_fn is not None and (step % config.exact.every == 0 or step == config.num_steps):
      writer.write(step, jax.device_get(exact_fn(state.params, state.anchor_params, ref_params, exact_batch)))

  def save() -> None:
    """Checkpoints the state under its own step (the data position always matches it)."""
    step = int(state.step)
    # A stop (signal or non-finite losses) can come right after the periodic save of the same step.
    if step not in checkpointer.steps():
      checkpointer.save(step, state, {"train": train_prompts.get_state()})

  writer = metrics_logging.MetricsWriter(workdir, resume_step=start_step)
  stop = _StopRequests()
  consecutive_nonfinite = 0
  window_tokens, window_start = 0.0, time.perf_counter()
  progress = tqdm.tqdm(total=config.num_steps, initial=start_step, desc=config.algorithm, unit="step",
                       disable=jax.process_index() != 0, dynamic_ncols=True)

  def record(step: int, metrics, texts: list[str]) -> None:
    """Reads a step's metrics (one step late, so the host never stalls the device) and acts on them.

    `texts` are this host's prompts of the step, to name a prompt whose reward was not finite.
    """
    nonlocal consecutive_nonfinite, window_tokens, window_start
    metrics = metrics_logging.to_python_scalars(jax.device_get(metrics))
    if metrics["reward/nonfinite_prompts"]:
      save()  # The step with the bad rewards was skipped: the state holds only finite updates.
      checkpointer.close()
      raise rewards.RewardError(_nonfinite_reward_message(step, metrics, texts, workdir))
    consecutive_nonfinite = consecutive_nonfinite + 1 if metrics["nonfinite"] else 0
    window_tokens += metrics["tokens/generated"]
    if train_step_lib.is_log_step(config, step):
      elapsed = time.perf_counter() - window_start
      metrics["perf/tokens_per_s"] = window_tokens / elapsed
      metrics["perf/step_time_s"] = elapsed / min(config.log_every, step - start_step)
      writer.write(step, metrics)
      progress.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in
                            ("reward/policy", "kl/policy_ref", "quantile/policy_vs_anchor") if k in metrics})
      window_tokens, window_start = 0.0, time.perf_counter()
    if consecutive_nonfinite >= config.max_consecutive_nonfinite:
      save()  # Skipped steps leave the state as it was: this is the last good state.
      checkpointer.close()
      raise NonFiniteLossError(
          f"{consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last at step {step}); the "
          f"last good state is checkpointed in {workdir}/checkpoints.")

  pending = None
  try:
    if start_step == 0:
      exact(0)
    for step in range(start_step + 1, config.num_steps + 1):
      batch = next(train_prompts)
      state, metrics = step_fn(state, ref_params, _global_batch(batch, batch_sharding))
      if pending is not None:
        record(*pending)
      pending = (step, metrics, batch["text"])
      progress.update(1)
      exact(step)
      if step % config.checkpoint_every == 0 and step != config.num_steps:
        save()
      if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
        evaluate(step)
      if stop.signal_name:
        record(*pending)
        save()
        checkpointer.close()
        logging.warning("%s received: checkpointed step %d and stopped.", stop.signal_name, step)
        return {}
    if pending is not None:
      record(*pending)
    if start_step < config.num_steps:
      save()
    final = evaluate(config.num_steps)
  finally:
    progress.close()
    stop.restore()
    writer.close()
  checkpointer.close()

  summary = evaluation.report(final, config.eval.bon_ns)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    print(format_report(summary))
    print(f"plot: {plots.plot_run(workdir)}")
  examples = example_generations(config, model_config, tokenizer, state.params, ref_params, eval_prompts,
                                 eval_start, batch_sharding)
  if jax.process_index() == 0:
    print(examples)
  return summary


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
  """The report as a table: one row per sampler (reference, Best-of-N, policy)."""
  lines = [f"{'sampler':<10} {'reward':>9} {'quantile':>9} {'KL(.||ref)':>11}"]
  lines += [f"{name:<10} {row['reward_mean']:>9.3f} {row['reward_quantile']:>9.3f} {row['kl_to_ref']:>11.3f}"
            for name, row in summary.items()]
  return "\n".join(lines)


def example_generations(config, model_config, tokenizer, params, ref_params, eval_prompts, eval_start,
                        batch_sharding) -> str:
  """One held-out prompt with a reference and a policy generation, for a person to read.

  Every process calls it: the parameters may span processes, so sampling runs on the mesh and its output comes
  back replicated. The prompt is the first row of the first held-out batch (process 0's first row).
  """
  eval_prompts.set_state(eval_start)
  batch = next(eval_prompts)
  sample_config = train_step_lib.sampling_config(config, model_config, 1)
  rng = jax.random.PRNGKey(config.seed + 2)
  sample_first = jax.jit(
      lambda p, b: sampling.sample(p, b["prompts"][:1], b["prompt_mask"][:1], rng, sample_config, model_config),
      out_shardings=NamedSharding(batch_sharding.mesh, P()))
  global_batch = _global_batch(batch, batch_sharding)
  texts = {}
  for name, p in (("reference", ref_params), ("policy", params)):
    out = sample_first(p, global_batch)
    ids = np.asarray(out.tokens)[0, 0][np.asarray(out.mask)[0, 0]]
    texts[name] = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
  return (f"prompt:    {batch['text'][0]}\nreference: {texts['reference']}\npolicy:    {texts['policy']}")
