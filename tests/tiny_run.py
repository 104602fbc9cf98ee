"""A tiny random policy on the shipped tokenizer, and a tiny run config around it, for trainer tests."""

import functools
import json
import os
import shutil

import jax

from bond_jax import checkpointing
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import train_state
from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.tasks import default_assets


def write_tiny_policy(path: str) -> str:
  """Saves a random 1-layer policy over the shipped tokenizer's vocab, with the tokenizer, as an HF checkpoint."""
  tokenizer = default_assets.load_tokenizer()
  model_config = ModelConfig(vocab_size=len(tokenizer), num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                             head_dim=8, mlp_dim=32, max_seq_len=24, pad_token_id=default_assets.PAD_ID,
                             bos_token_id=default_assets.BOS_ID, eos_token_id=default_assets.EOS_ID)
  hf.save_checkpoint(transformer.init_params(model_config, jax.random.PRNGKey(0)), model_config, path)
  for name in os.listdir(default_assets.TOKENIZER_DIR):
    shutil.copy(os.path.join(default_assets.TOKENIZER_DIR, name), path)
  return path


# A 4-step run checkpointing every step, on a mesh whose fsdp axis spans both processes of test_multihost.
FULL_RUN = {"num_steps": 4, "keep_checkpoints": 10, "mesh_shape": (1, 2, 4)}


def tiny_config(policy_dir: str, data_dir: str = "", **overrides):
  """A 3-step run of the tiny policy: batch 8, 8-token prompts, 4 new tokens, Best-of-2 and -4 in evaluation.

  `overrides` maps dotted field names ("bond.anchor") to values.
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
  config.eval.num_ref_samples = 4
  config.eval.bon_ns = (2, 4)
  for dotted, value in overrides.items():
    *groups, field = dotted.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


def restore_train_state(workdir: str, config):
  """The newest readable checkpoint of a run in `workdir`, as host arrays: `(TrainState, data_state)` or None."""
  ref_params, _, _ = run_components.load_policy(config)
  init = functools.partial(train_state.create_train_state, optimizer=train_state.make_optimizer(config.optimizer),
                           seed=config.seed)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init, ref_params))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=100, async_save=False)
  try:
    return jax.device_get(checkpointer.restore_latest(abstract))
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
  """The training metric records of `workdir/metrics.jsonl` by step, without timings (which differ per run)."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "loss/total" in record:
        assert record["step"] not in records, f"step {record['step']} is logged twice"
        records[record["step"]] = {k: v for k, v in record.items() if not k.startswith("perf/")}
  return records


def read_report(workdir: str) -> dict:
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    return json.load(f)
