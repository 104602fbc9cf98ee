"""A trained policy as a Hugging Face checkpoint directory, for transformers (and anything that reads its layout).

`export_policy` writes `config.json` (the policy's family: Llama, Gemma 3, Phi-3 with q/k/v fused again, ...),
`generation_config.json` (every stop id, so `generate` stops where our sampler stops), `model.safetensors` and the
tokenizer's files; `restore_run_policy` reads the policy back from a run's checkpoint (`experiments/export.py` does
both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from bond_jax import checkpointing
from bond_jax import paths
from bond_jax import run_components
from bond_jax import train_state
from bond_jax.data import prompt_encoding
from bond_jax.models import hf
from bond_jax.models.config import ModelConfig


def _host_array(x: jax.Array) -> np.ndarray:
  """The whole array on this host (gathered from every process when it is sharded across several)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def export_policy(params: Any, model_config: ModelConfig, tokenizer: Any, out_dir: paths.PathLike,
                  dtype: str | None = None) -> None:
  """Writes a policy as a Hugging Face checkpoint directory that `transformers` loads with the same logits.

  Every process must call it (parameters sharded across hosts are gathered); process 0 writes.

  Args:
    params: the policy's parameters (our tree, as `hf.load_checkpoint` returns it), on any devices or mesh.
    model_config: its config (`family` decides the architecture written).
    tokenizer: the policy's tokenizer (as `run_components.load_policy` returns it, or the transformers tokenizer it
      wraps): a transformers tokenizer has its files written alongside; any other (e.g. `IdTokenizer`) or None,
      none are.
    out_dir: the directory to write, local or on an object store (`paths`; created if missing; files of the same
      names are replaced, each written whole).
    dtype: the dtype to write the weights in (e.g. "bfloat16"); None keeps the parameters' own.

  Raises:
    ValueError: the config's family cannot express one of its features, or `params` does not fit the config.

  Example:
    >>> import tempfile
    >>> from bond_jax.models import config as config_lib, transformer
    >>> cfg = config_lib.tiny(family="gemma", norm_plus_one=True, embed_scale=True, stop_token_ids=(1, 7))
    >>> out = tempfile.mkdtemp()
    >>> export_policy(transformer.init_params(cfg, jax.random.key(0)), cfg, None, out, dtype="bfloat16")
    >>> sorted(os.listdir(out))
    ['config.json', 'generation_config.json', 'model.safetensors']
    >>> hf.read_config(out).stop_token_ids, hf.config_to_hf(hf.read_config(out))["architectures"]
    ((1, 7), ['GemmaForCausalLM'])
  """
  host_params = jax.tree.map(_host_array, params)
  if dtype is not None:
    host_params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(dtype)), host_params)
    model_config = dataclasses.replace(model_config, param_dtype=dtype)
  if jax.process_index() != 0:
    return
  hf.save_checkpoint(host_params, model_config, out_dir)
  if isinstance(tokenizer, prompt_encoding.PromptTokenizer):
    tokenizer = tokenizer.tokenizer
  if hasattr(tokenizer, "save_pretrained"):
    with tempfile.TemporaryDirectory(prefix="bond_jax_tokenizer_") as local:  # transformers writes local files.
      tokenizer.save_pretrained(local)
      paths.copy_files(local, out_dir)
  elif tokenizer is not None:
    logging.info("export_policy: the %s has no files to write; %s holds the model only.",
                 type(tokenizer).__name__, out_dir)


def restore_run_policy(workdir: paths.PathLike, step: int | None = None) -> tuple[Any, ModelConfig, Any, int]:
  """The policy of a run's checkpoint, on the host's CPU: `(params, model_config, tokenizer, step)`.

  The run's `config.json` (in `workdir`) names the reference policy, which gives the tree, the model config and
  the tokenizer; the checkpoint's train state is restored whole (policy, anchor and optimizer state: about four
  times the policy's size in host memory) and its policy kept.

  Args:
    workdir: the run's directory (`experiments/run.py --workdir`), local or on an object store.
    step: the checkpoint to read; None: the newest.

  Raises:
    FileNotFoundError: `workdir` has no `config.json` or no checkpoint.
    ValueError: there is no checkpoint at `step`.
    checkpointing.CheckpointMismatchError / UnreadableCheckpointError: the checkpoint does not fit the run's policy,
      or cannot be read.

  `experiments/export.py` is the example: `export_policy(*restore_run_policy(workdir)[:3], out_dir)`.
  """
  config_path = paths.as_path(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist: is {os.fspath(workdir)!r} the --workdir of a run?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  ref_params, model_config, tokenizer = run_components.load_policy(config)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
      jax.eval_shape(lambda p: train_state.create_train_state(p, train_state.make_optimizer(config.optimizer),
                                                              config.seed), ref_params))
  checkpointer = checkpointing.Checkpointer(paths.as_path(workdir) / "checkpoints", keep=1, read_only=True)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise FileNotFoundError(f"{workdir!r} has no checkpoint under checkpoints/.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f"step={step}: {workdir!r} has checkpoints at steps {steps} only.")
    state, _ = checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()
  return state.params, model_config, tokenizer, step
