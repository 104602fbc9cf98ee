"""What the optimizer trains: every parameter of the policy (a full fine-tune), or LoRA adapters on a frozen base.

The train step takes `(state, frozen, batch)`: the state holds what is trained (`state.params`, the anchor's
`state.anchor_params` and their optimizer state) and `frozen` what is not. A fine-tuning method turns them into
the models' parameters, in one place of the step:

- `policy(trainable, frozen)`: the parameters of the model `trainable` stands for (the policy's, or the anchor's);
- `reference(frozen)`: the reference's parameters.

`FullFineTune`: the trainable parameters are the policy's and `frozen` is the reference. `lora.Lora`: the
trainable parameters are adapters, `frozen` a `lora.Frozen` (the shared base, and the reference's adapter if
any), and the models are the base with an adapter merged. `from_config` picks one from `config.policy.lora`;
`setup` builds a run's frozen input, the trainable parameters it starts from and what its checkpoints must match.

Example:
  >>> from bond_jax import run_config
  >>> config = run_config.base_config()
  >>> from_config(config)
  FullFineTune()
  >>> config.policy.lora.rank = 8
  >>> from_config(config).scale   # alpha / rank
  2.0
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import safetensors.numpy

from bond_jax import lora
from bond_jax import paths
from bond_jax import run_config
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig

_LORA_SEED_STREAM = 1  # Folded into config.seed for the adapters' initial A, apart from the state's sampling key.


@dataclasses.dataclass(frozen=True)
class FullFineTune:
  """Every parameter of the policy is trained; the step's frozen input is the reference's parameters."""

  def policy(self, trainable, frozen):
    del frozen
    return trainable

  def reference(self, frozen):
    return frozen


def from_config(config: ml_collections.ConfigDict) -> FullFineTune | lora.Lora:
  """`lora.Lora` when `config.policy.lora.rank > 0` (merging in `config.policy.dtype`), else `FullFineTune`."""
  settings = config.policy.lora
  if settings.rank == 0:
    return FullFineTune()
  return lora.Lora(rank=settings.rank, alpha=float(settings.alpha), targets=tuple(settings.targets),
                   dtype=config.policy.dtype)


def held_frozen(config: ml_collections.ConfigDict, frozen, initial):
  """The step's frozen input as the trainer holds it: a full fine-tune's reference (`initial` None) with its
  matrices in the compute dtype `config.policy.dtype` (its outputs do not change: the model computes in that dtype);
  under LoRA, `frozen` as `setup` made it (`base_in_compute_dtype` decides the base's dtype).

  Works on arrays and, under `jax.eval_shape`, on shapes.

  Example:
    >>> from bond_jax import run_config
    >>> config = run_config.base_config()
    >>> config.policy.dtype = "bfloat16"
    >>> held_frozen(config, {"w": jnp.ones((2, 2)), "scale": jnp.ones(2)}, None)["w"].dtype
    dtype(bfloat16)
  """
  return transformer.cast_weights(frozen, config.policy.dtype) if initial is None else frozen


class Setup(NamedTuple):
  """What a run of a fine-tuning method starts from.

  Attributes:
    frozen: the step's frozen input (the reference's parameters, or a `lora.Frozen`).
    initial: the trainable parameters the state starts from; None: a copy of `frozen` (a full fine-tune).
    identity: what the run's checkpoints must have been trained on (`checkpointing.Checkpointer`'s `identity`):
      under LoRA, the base's `lora.fingerprint` (the checkpoints hold the adapters only); None for a full
      fine-tune, whose checkpoints hold the whole policy.
  """

  frozen: Any
  initial: Any
  identity: dict[str, str] | None


def setup(config: ml_collections.ConfigDict, ref_params, model_config: ModelConfig) -> Setup:
  """The frozen input, initial trainable parameters and checkpoint identity of a run of `config`.

  Under LoRA: the adapters of `config.policy.lora.targets` start from `init_path` (a peft directory) or fresh
  (`lora.init_adapter`, seeded by `config.seed`); the base is `ref_params`, its matrices cast to the compute dtype
  with `base_in_compute_dtype`; the reference is the base, or the base with the starting adapter (`reference =
  "start"`).

  Raises:
    run_config.ConfigError: targets that select no kernel or kernels no adapter can target, or a starting adapter
      that does not fit the run (the message names the field).
    FileNotFoundError: `init_path` is not a peft adapter directory.
  """
  tuning = from_config(config)
  if isinstance(tuning, FullFineTune):
    return Setup(ref_params, None, None)
  settings = config.policy.lora
  try:
    fresh = lora.init_adapter(ref_params, tuning,
                              jax.random.fold_in(jax.random.PRNGKey(config.seed), _LORA_SEED_STREAM))
  except ValueError as e:
    raise run_config.ConfigError(
        f"config.policy.lora.targets = {tuple(settings.targets)!r} is not allowed: {e}.") from e
  start = load_adapter(settings.init_path, fresh, tuning, model_config) if settings.init_path else None
  identity = {"base_fingerprint": lora.fingerprint(ref_params)}
  base = transformer.cast_to_compute_dtype(ref_params, model_config) if settings.base_in_compute_dtype else ref_params
  frozen = lora.Frozen(base, start if settings.reference == "start" else None)
  return Setup(frozen, fresh if start is None else start, identity)


def load_adapter(path: paths.PathLike, template: lora.Adapter, tuning: lora.Lora,
                 model_config: ModelConfig) -> lora.Adapter:
  """The peft LoRA adapter in directory `path` (`adapter_config.json`, `adapter_model.safetensors`; local or on an
  object store, `paths`), for the modules and shapes of `template`, at `tuning`'s scale (`lora.from_peft`).

  Raises:
    FileNotFoundError: a file is missing.
    run_config.ConfigError: the adapter does not fit the run (naming `config.policy.lora.init_path`).
  """
  files = [paths.as_path(path) / name for name in (lora.PEFT_CONFIG_FILE, lora.PEFT_WEIGHTS_FILE)]
  for file in files:
    if not file.exists():
      raise FileNotFoundError(f"config.policy.lora.init_path = {os.fspath(path)!r}: no {file.name} (expected a "
                              "peft LoRA adapter directory, e.g. a LoRA run's workdir/adapter)")
  peft_config = json.loads(files[0].read_text())
  try:
    return lora.from_peft(safetensors.numpy.load(files[1].read_bytes()), peft_config, template, tuning, model_config)
  except ValueError as e:
    raise run_config.ConfigError(f"config.policy.lora.init_path = {os.fspath(path)!r} is not allowed: {e}.") from e
