"""The memory a run needs per device, estimated before anything is allocated or compiled, and the check against
what the device has.

The parts held between steps (reference, policy, anchor, optimizer state, reward-model weights) are exact: the
bytes of each leaf's shard under the shardings the trainer gives it. What a step holds beside them is modelled
from the same shapes (`StepMemory`): the gradient (and, with micro-batches, its accumulator), XLA's copies of the
donated state, the decoding weights (the policy in the compute dtype, its layers stacked and all-gathered over
`fsdp`), the sampler's KV cache, under LoRA the step's copies of the adapted kernels, and the largest pass's
activations (assumptions in `activation_bytes`: the remat policy, the micro-batches and the logits' chunks of
`config.memory`; a reward model's pass too). The train step's parts are added up, since XLA keeps them live
together; the evaluation step's phases (sampling, the reward model's pass, the KL's pass) are counted one at a
time, since it does not, each with the layer-stacked copies XLA makes of the evaluated models' weights. The
estimate is the held parts plus the largest of these, meant to over-count, so that a run refused here would not
have fitted. Measured against XLA's plans (`planned_bytes`) on 8 simulated CPU devices: benchmarks/RESULTS.md,
"Memory estimate per step".

Example:
  >>> from bond_jax import run_config, sharding, train_state
  >>> from bond_jax.models import config as model_config_lib, transformer
  >>> config, model_config = run_config.base_config(), model_config_lib.tiny()
  >>> ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  >>> estimate = estimate_train_memory(config, model_config, ref_params,
  ...                                  train_state.make_optimizer(config.optimizer), sharding.make_mesh((1, 8, 1)))
  >>> check_fits(estimate, MemoryLimit(2 ** 30, "1 GiB"))   # MemoryBudgetError if it cannot fit
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

from flax import traverse_util
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import optax

from bond_jax import algorithms
from bond_jax import fine_tuning
from bond_jax import lora
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.rewards import RewardFn

GIB = 1024 ** 3
_FLOAT32_BYTES = 4  # Attention scores, logits and rotary embeddings are computed in float32 whatever the compute dtype.
# XLA packs a pass's many short-lived buffers into one allocation, with gaps: its plan exceeded the live peak by 1%
# (Gemma-2B's evaluation, 1x8x1) to 25% (the same at 1x4x2: 38.9 GiB planned, 31.1 GiB live at once).
_PACKING = 1.1


class MemoryBudgetError(ValueError):
  """The run's estimated memory per device exceeds the device's; the message says by how much and what to change."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """What a step, or one phase of a step, holds beside the run's held state, in bytes per device.

  Attributes:
    gradients: the policy's gradient, one of the policy's shapes (two with micro-batches: the sum and one part's).
    optimizer_update: the step's new policy, anchor (when it moves) and optimizer state, beside the old ones.
    decoding_params: the weights its passes read whole: models' layers stacked (`transformer.decoding_params`), in
      the compute dtype (while sampling, the second model's as XLA may gather them: in float32), all-gathered
      over `fsdp` (still split over `tensor`), and a reward model's layers stacked for its pass.
    kv_cache: the sampler's KV cache of one inference micro-batch.
    activations: the largest forward (and backward) pass (`activation_bytes`).
    merged_params: LoRA: the step's copies of the adapted kernels (`_merged_bytes`); 0 for a full fine-tune.
    stacked_params: the copies of the held weights that its passes scan over (each model's layers stacked, still
      sharded), which XLA makes once and keeps live through the step.
  """

  gradients: int = 0
  optimizer_update: int = 0
  decoding_params: int = 0
  kv_cache: int = 0
  activations: int = 0
  merged_params: int = 0
  stacked_params: int = 0

  @property
  def total(self) -> int:
    return sum(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device: the parts held between steps, and what each step or phase holds beside them.

  The steps are what XLA does not hold at once: the train step, whose parts are added up (XLA keeps the
  sampler's gathered weights live into the update), and the evaluation step's three phases, which it holds one at
  a time (at Gemma-2B's evaluation peak, the reward model's pass and the evaluated models' stacked copies are live
  beside the held state; the sampler's weights and KV cache are not: benchmarks/RESULTS.md, "Memory estimate per
  step"). `total` is the held parts plus the largest step.

  Attributes:
    reference_params: the reference policy's parameters (an input of every step).
    policy_params: the policy's parameters.
    anchor_params: the anchor's parameters (a copy of the policy's shapes).
    optimizer_state: the optax state (AdamW: two moments of the policy's shapes, and counters).
    reward_params: a reward model's parameters (0 for programmatic rewards).
    steps: `StepMemory` by step or phase name (`STEP_NAMES`).
  """

  reference_params: int
  policy_params: int
  anchor_params: int
  optimizer_state: int
  reward_params: int
  steps: dict[str, StepMemory]

  @property
  def held(self) -> int:
    """Bytes held between steps: the state, the reference and the reward model's weights."""
    return (self.reference_params + self.policy_params + self.anchor_params + self.optimizer_state
            + self.reward_params)

  def total_at(self, *names: str) -> int:
    """Bytes per device while the largest of the steps or phases `names` runs: the held parts and its own."""
    return self.held + max(self.steps[name].total for name in names)

  @property
  def peak_step(self) -> str:
    """The name of the step or phase that holds the most beside the held parts."""
    return max(self.steps, key=lambda name: self.steps[name].total)

  @property
  def total(self) -> int:
    return self.total_at(*self.steps)

  def parts(self) -> dict[str, int]:
    """Part names, as a person reads them, to bytes per device: the held parts, then the peak step's non-zero
    ones."""
    held = {name: getattr(self, name) for name in ("reference_params", "policy_params", "anchor_params",
                                                     "optimizer_state", "reward_params")}
    peak = self.steps[self.peak_step]
    step = {field.name: getattr(peak, field.name) for field in dataclasses.fields(peak) if getattr(peak, field.name)}
    return {name.replace("_", " ").replace("params", "parameters").replace("kv", "KV"): value
            for name, value in (held | step).items()}

  def __str__(self) -> str:
    breakdown = ", ".join(f"{name} {_gib(value)}" for name, value in self.parts().items())
    return f"{_gib(self.total)} GiB per device at the {self.peak_step} ({breakdown} GiB)"


TRAIN_STEP = "train step"
EVAL_SAMPLING, EVAL_REWARD, EVAL_KL = "evaluation's sampling", "evaluation's reward model", "evaluation's KL"
EVAL_PHASES = (EVAL_SAMPLING, EVAL_REWARD, EVAL_KL)
STEP_NAMES = (TRAIN_STEP, *EVAL_PHASES)


class MemoryLimit(NamedTuple):
  """How many bytes one device may use, and where that figure came from (for messages)."""

  bytes_per_device: int
  source: str


def _gib(num_bytes: int) -> str:
  return f"{num_bytes / GIB:.3g}"


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes that one device holds of `tree` placed with `shardings` (the largest shard of each leaf).

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    shardings: a matching pytree of `jax.sharding.Sharding`s.

  Example:
    >>> mesh = sharding.make_mesh((1, 8, 1))
    >>> shardings = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
    >>> per_device_bytes({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}, shardings)   # 1/8 of w's 128 B, all of b's 16
    32
  """
  sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(tuple(x.shape))) * jnp.dtype(x.dtype).itemsize,
                       tree, shardings)
  return sum(jax.tree.leaves(sizes))


def _data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES if axis in mesh.shape)


def fsdp_gathered_bytes(params: Any, mesh: Mesh) -> int:
  """Bytes per device of `params` all-gathered over the `fsdp` axis (still split over `tensor`).

  Example:
    >>> from bond_jax.models import config as model_config_lib
    >>> params = transformer.init_params(model_config_lib.tiny(), jax.random.key(0))
    >>> whole = sum(x.nbytes for x in jax.tree.leaves(params))
    >>> fsdp_gathered_bytes(params, sharding.make_mesh((1, 8, 1))) == whole   # gathered whole over fsdp
    True
  """
  specs = sharding.param_partition_specs(params, mesh=mesh)
  gathered = jax.tree.map(lambda spec: NamedSharding(mesh, sharding.without_axis(spec, "fsdp")), specs,
                          is_leaf=lambda x: isinstance(x, P))
  return per_device_bytes(params, gathered)


def _split(size: int, ways: int) -> int:
  """A dimension's per-device size when the `tensor` axis splits it (it does only where it divides evenly)."""
  return size // ways if size % ways == 0 else size


def kv_cache_bytes(model_config: ModelConfig, rows: int, slots: int, tensor: int = 1) -> int:
  """Bytes of `init_cache(model_config, rows, slots)` after `sampling.sample` repeats it for every sample.

  Keys and values of every layer, `[rows, slots, num_kv_heads, head_dim]` each in the compute dtype, the heads
  split over `tensor` where it divides them (`sharding.ACTIVATION_RULES`), and the `[rows, slots]` bool mask.

  Args:
    model_config: the policy's config.
    rows: prompts per device x samples per prompt.
    slots: prompt_len + max_new_tokens - 1.
    tensor: size of the mesh's `tensor` axis.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> kv_cache_bytes(tiny(), rows=4, slots=10)   # 2 layers x (keys, values) x 2 heads x 8 dims x 4 B + 1 mask B
    10280
  """
  kv_heads = _split(model_config.num_kv_heads, tensor)
  per_slot = 2 * model_config.num_layers * kv_heads * model_config.head_dim
  return rows * slots * (per_slot * model_config.compute_dtype.itemsize + 1)


def activation_bytes(model_config: ModelConfig, prompts: int, samples: int, prompt_len: int, new_tokens: int,
                     tensor: int, backward: bool, remat: str = "none", models: int = 1) -> int:
  """Upper-bound bytes of one pass of the policy over `samples` generations of each of `prompts` prompts, per device.

  The tokens are laid out as `sampling.generation_log_probs` lays them out (`transformer.forward_after_prompts`):
  in each layer each prompt once (`prompt_len` tokens attending to at most `prompt_len`), then every sample's
  generation (`new_tokens` tokens attending to at most `prompt_len + new_tokens`) over its prompt's keys and
  values repeated for it (the layer's `[rows, prompt_len + new_tokens, kv_heads, head_dim]` keys and values).

  Assumptions, per token and per layer (c: bytes of the compute dtype): the residual stream before attention
  and before the MLP and both RMSNorm outputs (4 d c), the norms' float32 inputs (2 d 4); q, k and v before and
  after rotary embedding, in float32 (4 (2 heads + 3 kv_heads) head_dim); the attention output (heads
  head_dim c); gate, up, activation and their product (4 mlp_dim c); attention scores and probabilities
  `[heads, attended]` in float32 (2 heads attended 4). The head adds, for each sample's `new_tokens + 1`
  predicting positions, the final norm (d c) and four float32 copies of the logits (the logits, their exponent
  for the log-softmax, their cotangent and a re-laid-out copy, as XLA keeps them) of one chunk of positions
  (`sampling.LOGITS_CHUNK_BYTES`), per model scored (`models`: 2 for the KL of evaluation). Heads, MLP and
  vocabulary are divided by the `tensor` axis where it divides them, as `sharding.ACTIVATION_RULES` shard them.

  With `backward`, what `remat` (`config.REMAT_POLICIES`) keeps of every layer stays live for the backward pass
  ("none": all of the above; "block": the layer's input, `d c`; "matmuls": the outputs of its weight matmuls,
  `((heads + 2 kv_heads) head_dim + 2 d + 2 mlp_dim) c`), and one more layer's worth holds the cotangents being
  computed (two with remat: and the layer being recomputed); without it (a forward under `stop_gradient` or
  evaluation), one layer's are live at a time and three logit copies. The sum is taken a tenth larger for the gaps
  XLA leaves when it packs the pass's buffers into one allocation (`_PACKING`).

  Args:
    model_config: the policy's config.
    prompts: prompts on this device (of one micro-batch).
    samples: generations per prompt.
    prompt_len: tokens per prompt.
    new_tokens: tokens per generation (`max_new_tokens`).
    tensor: size of the mesh's `tensor` axis.
    backward: whether the pass is differentiated.
    remat: the remat policy of a differentiated pass.
    models: models whose logits a chunk holds at once.

  Example:
    >>> from bond_jax.models.config import tiny
    >>> kept = lambda remat: activation_bytes(tiny(), prompts=2, samples=2, prompt_len=4, new_tokens=4, tensor=1,
    ...                                       backward=True, remat=remat)
    >>> kept("none") > kept("matmuls") > kept("block")
    True
  """
  c = model_config.compute_dtype.itemsize
  d = model_config.d_model
  heads, kv_heads = _split(model_config.num_heads, tensor), _split(model_config.num_kv_heads, tensor)
  mlp = _split(model_config.mlp_dim, tensor)
  per_token = lambda attended: (  # noqa: E731
      4 * d * c + 2 * d * _FLOAT32_BYTES
      + (2 * heads + 3 * kv_heads) * model_config.head_dim * _FLOAT32_BYTES
      + heads * model_config.head_dim * c
      + 4 * mlp * c
      + 2 * heads * attended * _FLOAT32_BYTES)
  rows, generated = prompts * samples, prompts * samples * new_tokens
  tokens = prompts * prompt_len + generated
  layer = (prompts * prompt_len * per_token(prompt_len) + generated * per_token(prompt_len + new_tokens)
           + rows * (prompt_len + new_tokens) * 2 * kv_heads * model_config.head_dim * c)
  kept = {"none": layer, "block": tokens * d * c,
          "matmuls": tokens * ((heads + 2 * kv_heads) * model_config.head_dim + 2 * d + 2 * mlp) * c}[remat]
  vocab = _split(model_config.vocab_size, tensor)
  head_len = new_tokens + 1
  # Positions per chunk, as `sampling._position_chunk` picks them (rows already this device's).
  chunk = max(1, min(head_len, sampling.LOGITS_CHUNK_BYTES // max(models * rows * vocab * _FLOAT32_BYTES, 1)))
  logit_copies = 4 if backward else 3
  head = rows * (head_len * d * c + models * chunk * logit_copies * vocab * _FLOAT32_BYTES)
  if backward:
    working = 1 if remat == "none" else 2  # the cotangents being computed, and the layer being recomputed
    return math.ceil(_PACKING * (model_config.num_layers * kept + working * layer + head))
  return math.ceil(_PACKING * (layer + head))


def _reward_model_config(reward_fn: RewardFn | None) -> ModelConfig | None:
  """The shapes of the transformer a reward holds (`rewards.reward_model`'s weights, `transformer.init_params`'s
  tree), read from its weights, computing in their dtype, with its score head as the vocabulary; None for a reward
  without such weights."""
  params = reward_fn.args[0] if reward_fn is not None and reward_fn.args else None
  if not isinstance(params, dict) or "layer_0" not in params or "score" not in params:
    return None
  attn, mlp = params["layer_0"]["attn"], params["layer_0"]["mlp"]
  d_model, num_heads, head_dim = attn["q"]["kernel"].shape
  layers = sum(1 for key in params if key.startswith("layer_"))
  return ModelConfig(vocab_size=params["score"]["kernel"].shape[-1], num_layers=layers, d_model=d_model,
                     num_heads=num_heads, num_kv_heads=attn["k"]["kernel"].shape[1], head_dim=head_dim,
                     mlp_dim=mlp["up"]["kernel"].shape[-1], max_seq_len=1,
                     dtype=jnp.dtype(attn["q"]["kernel"].dtype).name)


def _reward_pass_bytes(reward_fn: RewardFn | None, prompts: int, samples: int, prompt_len: int, new_tokens: int,
                       tensor: int) -> int:
  """Bytes per device of a reward model's forward over `samples` generations of each of `prompts` prompts, whose
  activations `activation_bytes` bounds: laid out as `sampling.outputs_after_prompts` lays them out, or, for a
  re-tokenized reward (`rewards.retokenized_reward_model`), one full row of its `row_len` tokens per sample; 0 for
  a reward without a model."""
  reward_config = _reward_model_config(reward_fn)
  if reward_config is None:
    return 0
  row_len = getattr(reward_fn.func, "row_len", None)
  if row_len:
    return activation_bytes(reward_config, prompts * samples, 1, row_len, 0, tensor, backward=False)
  return activation_bytes(reward_config, prompts, samples, prompt_len, new_tokens, tensor, backward=False)


def estimate_train_memory(config: ml_collections.ConfigDict, model_config: ModelConfig, ref_params: Any,
                          optimizer: optax.GradientTransformation, mesh: Mesh, reward_fn: RewardFn | None = None,
                          initial: Any = None) -> MemoryEstimate:
  """Estimates the bytes per device a run of `config` needs, without allocating or compiling anything.

  The train state is built abstractly (`jax.eval_shape` of `train_state.create_train_state`) and sharded by
  `sharding.param_shardings`, as `trainer.sharded_train_state` does. Prompts per device are `batch_size / (data x
  fsdp)` in the train step and `run_config.eval_batch_size(config) / (data x fsdp)` in the evaluation. Beside the
  held parts, the estimate takes the largest of:
  - the train step: the gradient, the optimizer update, the decoding weights of two models and the reward model's,
    the sampler's KV cache for the policy and anchor samples (`algorithm.sample_counts()`) and the largest pass:
    the update's forward and backward over the policy samples and the Best-of-n anchor samples of one
    micro-batch (`config.memory.micro_batches`) under `config.memory.remat`, the log-probs' forward-only pass, or
    the reward model's forward over the samples it scores at once (its shapes read from its weights);
  - the evaluation's phases, one at a time, each with the layer-stacked copies of the evaluated models' held
    weights: sampling (one model's decoding weights beside the other's gathered in float32, the KV cache for
    `eval.num_policy_samples` and `eval.num_ref_samples` samples per prompt), the reward model's pass over the
    most of them, and the KL's pass over the policy samples under two models.
  Sampling and the forward-only passes run on one inference micro-batch (`config.memory.inference_micro_batches`).
  The reference of a full fine-tune is held in the compute dtype (`config.policy.dtype`), as the trainer holds it;
  under LoRA the frozen base is as `fine_tuning.setup` made it.
  Not counted: the exact evaluation of `config.exact`.

  Args:
    config: a validated run config.
    model_config: the policy's config.
    ref_params: the step's frozen parameters, arrays or `jax.ShapeDtypeStruct`s: the reference's, or under LoRA
      the `lora.Frozen` base (`fine_tuning.setup`).
    optimizer: the policy's optimizer (`train_state.make_optimizer`).
    mesh: the run's mesh.
    reward_fn: the `RewardFn` the trainer passes to its steps (its leaves are a reward model's weights), or None.
    initial: what the state's trained parameters start from (`fine_tuning.setup`): None, a copy of `ref_params`.

  Returns:
    A `MemoryEstimate` in bytes per device.

  Example:
    >>> from bond_jax import run_config, sharding, train_state
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> config, model_config = run_config.base_config(), model_config_lib.tiny()
    >>> ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
    >>> estimate = estimate_train_memory(config, model_config, ref_params,
    ...                                  train_state.make_optimizer(config.optimizer), sharding.make_mesh((2, 4, 1)))
    >>> whole = sum(x.size * 4 for x in jax.tree.leaves(ref_params))
    >>> round(estimate.policy_params / whole, 3)   # a quarter over fsdp = 4, but for the replicated norm scales
    0.255
  """
  init = functools.partial(train_state_lib.create_train_state, optimizer=optimizer, seed=config.seed)
  state = jax.eval_shape(init, ref_params if initial is None else initial)
  state_shardings = sharding.param_shardings(state, mesh)
  policy = jax.eval_shape(fine_tuning.from_config(config).policy, state.params, ref_params)
  state_bytes = lambda field: per_device_bytes(getattr(state, field), getattr(state_shardings, field))  # noqa: E731
  algorithm = algorithms.from_config(config)
  reward_bytes = 0 if reward_fn is None else per_device_bytes(reward_fn, sharding.param_shardings(reward_fn, mesh))
  frozen = jax.eval_shape(lambda p: fine_tuning.held_frozen(config, p, initial), ref_params)

  prompts_per_device = config.batch_size // _data_parallel_size(mesh)
  update_prompts = prompts_per_device // config.memory.micro_batches
  inference_prompts = prompts_per_device // config.memory.inference_micro_batches
  eval_prompts = (run_config.eval_batch_size(config) // _data_parallel_size(mesh)
                  // config.memory.inference_micro_batches)
  prompt_len, new_tokens = config.data.prompt_len, config.sampling.max_new_tokens
  num_policy, num_anchor = algorithm.sample_counts()
  train_samples = max(num_policy, num_anchor)
  eval_samples = max(config.eval.num_policy_samples, config.eval.num_ref_samples)
  tensor = mesh.shape.get("tensor", 1)
  passes = functools.partial(activation_bytes, model_config, prompt_len=prompt_len, new_tokens=new_tokens,
                             tensor=tensor)
  reward_pass = functools.partial(_reward_pass_bytes, reward_fn, prompt_len=prompt_len, new_tokens=new_tokens,
                                  tensor=tensor)
  kv_cache = lambda prompts, samples: kv_cache_bytes(model_config, prompts * samples,  # noqa: E731
                                                     prompt_len + new_tokens - 1, tensor)
  gathered = lambda dtype: fsdp_gathered_bytes(  # noqa: E731
      jax.eval_shape(lambda p: transformer.cast_weights(p, dtype), policy), mesh)
  # Two models' decoding weights: a step samples from two (policy and anchor; evaluation: policy and reference),
  # and the first's stay live while the second's are gathered. XLA's CPU, whose collectives have no bfloat16,
  # gathers them in float32 (measured at Llama-3.2-3B's evaluation); the train step's added-up parts cover that.
  one_model = gathered(config.policy.dtype)
  two_models = 2 * one_model
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  sampling_weights = one_model + (gathered(jnp.float32) if on_cpu else one_model)
  train = StepMemory(
      gradients=state_bytes("params") * (2 if config.memory.micro_batches > 1 else 1),
      optimizer_update=(state_bytes("params") + state_bytes("opt_state")
                        + (state_bytes("anchor_params") if algorithm.anchor_moves else 0)),
      decoding_params=two_models + reward_bytes,
      kv_cache=kv_cache(inference_prompts, train_samples),
      activations=max(passes(update_prompts, num_policy + algorithm.num_best_of_n(), backward=True,
                             remat=config.memory.remat),
                      passes(inference_prompts, num_policy, backward=False),
                      reward_pass(inference_prompts, train_samples)),
      merged_params=0 if initial is None else _merged_bytes(policy, state.params, mesh, merged=2, stacked=3,
                                                            gradient=True))
  reference_bytes = per_device_bytes(frozen, sharding.param_shardings(frozen, mesh))
  # The policy and the reference, layer-stacked: counted in the evaluation's phases only, since the train step's
  # added-up parts (among them the optimizer update's copies, which XLA partly writes over the donated state)
  # already exceed them. Under LoRA the policy evaluated is the merged one, as are its copies.
  reference_merged = getattr(ref_params, "reference_adapter", None) is not None
  evaluation_phase = functools.partial(
      StepMemory, stacked_params=per_device_bytes(policy, sharding.param_shardings(policy, mesh)) + reference_bytes,
      merged_params=0 if initial is None else _merged_bytes(policy, state.params, mesh, merged=1 + reference_merged,
                                                            stacked=0, gradient=False))
  return MemoryEstimate(
      reference_params=reference_bytes,
      policy_params=state_bytes("params"),
      anchor_params=state_bytes("anchor_params"),
      optimizer_state=state_bytes("opt_state"),
      reward_params=reward_bytes,
      steps={TRAIN_STEP: train,
             EVAL_SAMPLING: evaluation_phase(decoding_params=sampling_weights,
                                             kv_cache=kv_cache(eval_prompts, eval_samples)),
             # The reward model's weights, layer-stacked for its pass.
             EVAL_REWARD: evaluation_phase(decoding_params=reward_bytes,
                                           activations=reward_pass(eval_prompts, eval_samples)),
             EVAL_KL: evaluation_phase(decoding_params=two_models, activations=passes(
                 eval_prompts, config.eval.num_policy_samples, backward=False, models=2))})


def _merged_bytes(policy: Any, adapter: Any, mesh: Mesh, merged: int, stacked: int, gradient: bool) -> int:
  """Bytes per device of a LoRA step's copies of the adapted kernels, which a full fine-tune reads from its
  arguments instead, in the dtype of `policy` (the merged policy: the compute dtype) unless said:

  - `merged` models' merged kernels (the train step: the policy's and the anchor's, held from the merge to the
    update and the anchor's log-probs; the evaluation: the policy's, and the reference's when it has an adapter);
  - `stacked` layer-stacked copies (`transformer.stack_layers`) that the passes over the layers make of models'
    kernels (the train step: the policy's, the anchor's and the reference's, the base's);
  - with `gradient`, the policy's gradient with respect to its kernels, in float32;
  - where the compute dtype is narrower than float32, each merged model's float32 merge results (`lora.merge` adds
    in float32), which XLA stacks before it casts them.

  The train step's are counted for every method: REINFORCE, which has no anchor, was measured to hold as much
  (XLA's plan on CPU, float32). At Llama-3-8B's shapes (bfloat16, fsdp = 8) XLA's peak holds each of these
  (benchmarks/RESULTS.md, "Memory estimate").
  """
  adapted = {f"{module}/kernel" for module in traverse_util.flatten_dict(adapter, sep="/", is_leaf=lora.is_pair)}
  kernels = {path: leaf for path, leaf in traverse_util.flatten_dict(policy, sep="/").items() if path in adapted}
  in_float32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), kernels)
  shardings = sharding.param_shardings(kernels, mesh)
  narrower = any(jnp.dtype(x.dtype).itemsize < _FLOAT32_BYTES for x in jax.tree.leaves(kernels))
  return ((merged + stacked) * per_device_bytes(kernels, shardings)
          + (gradient + (merged if narrower else 0)) * per_device_bytes(in_float32, shardings))


class StepInputs(NamedTuple):
  """A run's step arguments as `jax.ShapeDtypeStruct`s on the mesh (nothing allocated), as the trainer places them
  (`trainer.sharded_train_state`: the frozen reference in the compute dtype), with their shardings."""

  state: Any
  ref_params: Any
  reward_fn: Any
  state_shardings: Any
  param_shardings: Any


def abstract_step_inputs(config: ml_collections.ConfigDict, ref_params: Any, optimizer: optax.GradientTransformation,
                         mesh: Mesh, reward_fn: RewardFn | None = None, initial: Any = None) -> StepInputs:
  """The train state, the reference and the reward's weights of a run, abstract and sharded on `mesh`: what
  `trainer.compile_steps` compiles for, from shapes alone (`ref_params` and the reward's leaves may be
  `jax.ShapeDtypeStruct`s). `ref_params` and `initial` are as `trainer.sharded_train_state` takes them: under
  LoRA the frozen base (`lora.Frozen`, kept in its dtype) and the adapters.

  Example:
    >>> from bond_jax import run_config, sharding, train_state
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> config, model_config = run_config.base_config(), model_config_lib.tiny()
    >>> config.policy.dtype = "bfloat16"
    >>> ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
    >>> inputs = abstract_step_inputs(config, ref_params, train_state.make_optimizer(config.optimizer),
    ...                               sharding.make_mesh((1, 8, 1)))
    >>> kernel = inputs.ref_params["layer_0"]["mlp"]["up"]["kernel"]
    >>> kernel.dtype, kernel.sharding.spec   # the frozen reference in the compute dtype, sharded over fsdp
    (dtype(bfloat16), P('fsdp', 'tensor'))
  """
  init = functools.partial(train_state_lib.create_train_state, optimizer=optimizer, seed=config.seed)
  state = jax.eval_shape(init, ref_params if initial is None else initial)
  frozen = jax.eval_shape(lambda p: fine_tuning.held_frozen(config, p, initial), ref_params)
  state_shardings = sharding.param_shardings(state, mesh)
  param_shardings = sharding.param_shardings(frozen, mesh)
  place = lambda tree, shardings: jax.tree.map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  if reward_fn is not None:
    reward_fn = place(reward_fn, sharding.param_shardings(reward_fn, mesh))
  return StepInputs(place(state, state_shardings), place(frozen, param_shardings), reward_fn, state_shardings,
                    param_shardings)


def planned_bytes(compiled) -> int:
  """XLA's plan for one device of a compiled program (`jit(...).lower(...).compile()`): its temporaries, arguments
  and outputs, less the outputs written over donated arguments.

  Example:
    >>> planned_bytes(jax.jit(lambda x: x + 1).lower(jnp.ones(4)).compile())
    32
  """
  analysis = compiled.memory_analysis()
  return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes)


def _host_available_bytes() -> int:
  """Memory the host can still give, from /proc/meminfo's MemAvailable (Linux) or the free physical pages."""
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # The file counts kB.
  except OSError:
    pass  # No /proc (not Linux): fall back to sysconf below.
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory_limit(config: ml_collections.ConfigDict) -> MemoryLimit:
  """The bytes one device may use: `config.memory_limit_gib` if > 0, else the device's own limit.

  An accelerator reports its limit (`memory_stats()["bytes_limit"]`, what XLA's allocator may take); a CPU
  device reports none, and this process's simulated CPU devices share the host's RAM, so each gets the host's
  available memory divided by `jax.local_device_count()`.

  Example:
    >>> from bond_jax import run_config
    >>> config = run_config.base_config()
    >>> config.memory_limit_gib = 80.0
    >>> device_memory_limit(config)
    MemoryLimit(bytes_per_device=85899345920, source='config.memory_limit_gib = 80.0')
  """
  if config.memory_limit_gib > 0:
    return MemoryLimit(int(config.memory_limit_gib * GIB), f"config.memory_limit_gib = {config.memory_limit_gib}")
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and "bytes_limit" in stats:
    return MemoryLimit(int(stats["bytes_limit"]), f"the device's own limit ({device.device_kind})")
  devices = jax.local_device_count()
  return MemoryLimit(_host_available_bytes() // devices,
                     f"the host's available RAM shared by {devices} local {device.platform} device(s)")


def check_fits(estimate: MemoryEstimate, limit: MemoryLimit) -> None:
  """Raises `MemoryBudgetError` when `estimate.total` exceeds `limit`, naming the parts and what to change.

  Example:
    >>> held = dict(reference_params=0, policy_params=0, anchor_params=0, optimizer_state=GIB, reward_params=0)
    >>> estimate = MemoryEstimate(**held, steps={TRAIN_STEP: StepMemory(activations=GIB)})
    >>> check_fits(estimate, MemoryLimit(GIB, "1 GiB"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bond_jax.memory_estimate.MemoryBudgetError: the run needs an estimated 2 GiB per device at the train step ...
  """
  if estimate.total <= limit.bytes_per_device:
    return
  largest = max(estimate.parts().items(), key=lambda item: item[1])[0]
  step_advice = ("raise config.memory.micro_batches or set config.memory.remat" if estimate.peak_step == TRAIN_STEP
                 else "raise config.memory.inference_micro_batches, lower config.eval.batch_size, "
                 "config.eval.num_policy_samples or config.eval.num_ref_samples")
  raise MemoryBudgetError(
      f"the run needs an estimated {estimate}, more than the {_gib(limit.bytes_per_device)} GiB per device "
      f"available ({limit.source}); the largest part is {largest}. To fit, {step_advice}, lower config.batch_size, "
      f"config.sampling.max_new_tokens or config.data.prompt_len (or the samples per prompt), set "
      f"config.policy.dtype = 'bfloat16', or shard over more devices with a larger fsdp or tensor axis in "
      f"config.mesh_shape; if the detected limit is wrong, set config.memory_limit_gib.")
