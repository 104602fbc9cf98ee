"""A tiny random policy on the shipped tokenizer, and a tiny run config around it, for trainer tests."""

import functools
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp

from bond_jax import checkpointing
from bond_jax import fine_tuning
from bond_jax import metrics_logging
from bond_jax import paths
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sharding
from bond_jax import train_state
from bond_jax import train_step
from bond_jax import trainer
from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.tasks import default_assets


def write_tiny_policy(path: str) -> str:
  """Saves a random 1-layer policy over the shipped tokenizer's vocab, with the tokenizer, as an HF checkpoint."""
  tokenizer = default_assets.load_tokenizer()
  model_config = ModelConfig(vocab_size=len(tokenizer), num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                             head_dim=8, mlp_dim=32, max_seq_len=24, pad_token_id=default_assets.PAD_ID,
                             bos_token_id=default_assets.BOS_ID, stop_token_ids=(default_assets.EOS_ID,))
  hf.save_checkpoint(transformer.init_params(model_config, jax.random.PRNGKey(0)), model_config, path)
  for name in os.listdir(default_assets.TOKENIZER_DIR):
    shutil.copy(os.path.join(default_assets.TOKENIZER_DIR, name), path)
  return path


def even_token_reward(prompts, prompt_mask, generations, generation_mask):
  """The share of generated tokens with an even id: a jittable reward for `--config.reward.kind=python_tokens`.

  Unlike the default text reward it runs no host callback, so the programs of a run using it can be stored in
  JAX's persistent compilation cache and a restarted run compiles nothing.

  Example:
    >>> even_token_reward(jnp.zeros((1, 2), int), jnp.ones((1, 2), bool), jnp.array([[2, 3]]), jnp.ones((1, 2), bool))
    Array([0.5], dtype=float32)
  """
  del prompts, prompt_mask
  even = (generations % 2 == 0) & generation_mask
  return jnp.sum(even, axis=1) / jnp.maximum(jnp.sum(generation_mask, axis=1), 1)


# A 4-step run checkpointing every step, on a mesh whose fsdp axis spans both processes of test_multihost.
# Evaluated in batches other than the training batch's: 12 held-out prompts against 8 a step.
FULL_RUN = {"num_steps": 4, "keep_checkpoints": 10, "mesh_shape": (1, 2, 4), "eval.batch_size": 12}


def tiny_config(policy_dir: str, data_dir: str = "", **overrides):
  """A 3-step run of the tiny policy: batch 8, 8-token prompts, 4 new tokens, Best-of-2 and -4 in evaluation.

  `overrides` maps dotted field names ("anchor.mode") to values.
  """
  config = run_config.base_config()
  config.policy.source = "hf_checkpoint"
  config.policy.path = policy_dir
  config.data.data_dir = data_dir
  config.data.prompt_len = 8
  config.sampling.max_new_tokens = 4
  config.batch_size = 8
  config.num_steps = 3
  config.log_every = 1
  config.eval_every = 0
  config.eval_batches = 1
  config.checkpoint_every = 1
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-2
  config.bond.n = 2
  config.bond.num_anchor_samples = 4
  config.eval.num_policy_samples = 4
  config.eval.num_ref_samples = 8
  config.eval.bon_ns = (2, 4)
  for dotted, value in overrides.items():
    *groups, field = dotted.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def abstract_train_state(config):
  """The train state of a run of `config` as `jax.ShapeDtypeStruct`s on this process's first device."""
  ref_params, model_config, _ = run_components.load_policy(config)
  _, initial, _ = fine_tuning.setup(config, ref_params, model_config)  # LoRA: the state holds adapters.
  init = functools.partial(train_state.create_train_state, optimizer=train_state.make_optimizer(config.optimizer),
                           seed=config.seed)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      jax.eval_shape(init, ref_params if initial is None else initial))


def restore_train_state(workdir: str, config):
  """The newest readable checkpoint of a run in `workdir`, as host arrays: `(TrainState, data_state)` or None."""
  checkpointer = checkpointing.Checkpointer(paths.as_path(workdir) / "checkpoints", keep=100, async_save=False)
  try:
    return jax.device_get(checkpointer.restore_latest(abstract_train_state(config)))
  finally:
    checkpointer.close()


def restore_every_checkpoint(workdir: str, config) -> dict[int, tuple]:
  """Every checkpoint of a run in `workdir` by step, as host arrays, changing nothing on disk (raises if one is
  unreadable)."""
  checkpointer = checkpointing.Checkpointer(paths.as_path(workdir) / "checkpoints", keep=100, read_only=True)
  abstract = abstract_train_state(config)
  try:
    return {step: jax.device_get(checkpointer.restore(step, abstract)) for step in checkpointer.steps()}
  finally:
    checkpointer.close()


def _leaves(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def command_line_flags(config) -> list[str]:
  """`--config.field=value` flags of `experiments/run.py` for every field where `config` differs from the base."""
  base = dict(_leaves(run_config.base_config()))
  return [f"--config.{name}={value}" for name, value in _leaves(config) if base[name] != value]


def train_records(workdir: str) -> dict[int, dict]:
  """The training metric records of `workdir/metrics.jsonl` (local or in a bucket) by step, without timings (which
  differ per run)."""
  records = {}
  for line in (paths.as_path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss/total" in record:
      assert record["step"] not in records, f"step {record['step']} is logged twice"
      records[record["step"]] = {k: v for k, v in record.items() if not k.startswith("perf/")}
  return records


def read_report(workdir: str) -> dict:
  return json.loads((paths.as_path(workdir) / "report.json").read_text())


def load_components(config, workdir: str):
  """The reference params, model config, reward and first training batch (prompts and mask) of a run of `config`."""
  ref_params, model_config, tokenizer = run_components.load_policy(config)
  reward_fn = run_components.load_reward(config, tokenizer)
  train_prompts, _ = run_components.load_prompts(config, tokenizer, model_config, workdir)
  batch = {k: v for k, v in next(train_prompts).items() if k in ("prompts", "prompt_mask")}
  return ref_params, model_config, reward_fn, batch


def one_device_mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def run_steps(config, mesh, components, num_steps):
  """`num_steps` jitted train steps on `mesh` as the trainer shards them (same batch each step): host copies
  of the initial state and of (state, metrics) after each step."""
  ref_params, model_config, reward_fn, batch = components
  optimizer = train_state.make_optimizer(config.optimizer)
  ref_params, param_shardings, state, state_shardings = trainer.sharded_train_state(config, ref_params, optimizer,
                                                                                    mesh)
  batch_sharding = sharding.batch_sharding(mesh, 2)
  step = jax.jit(train_step.make_train_step(config, model_config, reward_fn, optimizer),
                 in_shardings=(state_shardings, param_shardings, {k: batch_sharding for k in batch}),
                 out_shardings=(state_shardings, None))
  batch = jax.device_put(batch, batch_sharding)
  history = []
  initial = jax.device_get(state)
  for _ in range(num_steps):
    state, metrics = step(state, ref_params, batch)
    history.append(jax.device_get((state, metrics)))
  return initial, history


def train_counting_compiles(config, workdir: str) -> tuple[dict, int]:
  """`trainer.train(config, workdir)`, and how many XLA compilations ran while it trained.

  Counted from the dispatch of the second step (the first step may still compile what it calls eagerly) to the
  writing of the last step's metrics: 0 when no step compiles anything again.
  """
  events = []

  def on_duration(name, *args, **kwargs):
    del args, kwargs
    if name == "/jax/core/compile/backend_compile_duration":
      events.append("compile")

  def batch_then_mark(local, batch_sharding):
    events.append("batch")
    return global_batch(local, batch_sharding)

  def write_then_mark(self, step, metrics):
    write(self, step, metrics)
    if "loss/total" in metrics:
      events.append(("train record", step))

  global_batch, write = trainer._global_batch, metrics_logging.MetricsWriter.write  # pylint: disable=protected-access
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    with mock.patch.object(trainer, "_global_batch", batch_then_mark), \
         mock.patch.object(metrics_logging.MetricsWriter, "write", write_then_mark):
      summary = trainer.train(config, workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  second_step = [i for i, e in enumerate(events) if e == "batch"][1]
  last_record = events.index(("train record", config.num_steps))
  return summary, events[second_step:last_record].count("compile")


TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def run_script_args(workdir: str, flags: list[str]) -> list[str]:
  """The command line of `experiments/run.py` on `configs/default.py` with `flags` (e.g. `command_line_flags`)."""
  return [sys.executable, os.path.join(REPO, "experiments", "run.py"),
          "--config=" + os.path.join(REPO, "configs", "default.py"), f"--workdir={workdir}", *flags]


def script_env(**variables: str) -> dict[str, str]:
  """This environment with one simulated device and this folder importable (`faulty_rewards:...` functions),
  plus `variables` (which may set XLA_FLAGS too)."""
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])), **variables}


def run_script_error(workdir: str, flags: list[str]) -> str:
  """Runs `experiments/run.py`, asserts that it exited with 1 and one `error:` line, as its last, without a
  traceback, and returns that line."""
  result = subprocess.run(run_script_args(workdir, flags), cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], output[-3000:]
  return errors[0]
