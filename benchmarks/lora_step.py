r"""LoRA's J-BOND step: XLA's memory plan and step time of adapters merged into the kernels (`bond_jax.lora`) against
a full fine-tune and against adapters applied inside the matmuls (`x @ W + s·(x @ A) @ B`, by qwix, the LoRA of
Tunix); and the memory plan at scale, from abstract shapes only.

  python benchmarks/lora_step.py --part compare            # small shape, 1 CPU device; qwix's row where it imports
  python benchmarks/lora_step.py --part scale              # Llama-3 shapes, 8 simulated devices (~1 h)
  python benchmarks/lora_step.py --part fit                # estimates only: 8B on 8 x 80 GB, the largest on one
  /tmp/qwix_venv/bin/python benchmarks/lora_step.py --part compare   # with qwix (README of benchmarks/)

`compare` runs the real `train_step.TrainStep` with a token reward on one device for each of: a full fine-tune, LoRA
merged, LoRA inside the matmuls. The inside-the-matmuls row swaps two things only: the fine-tuning method's
`policy` puts the adapters beside the kernels (qwix's `kernel_lora_a`/`kernel_lora_b` names) instead of merging
them, and `transformer.forward` applies qwix's LoRA model (`qwix.apply_lora_to_model`), whose intercepted
`dot_general`s add `(x @ A) @ B` to every targeted projection, in the sampler's decode loop as in the update.

`scale` compiles the LoRA J-BOND step (rank 64, the base and a same-size reward model in bfloat16, prompt 256 + 256
new tokens) for Llama-3-8B on 8 data-parallel devices at batch 128 and on one device at batch 1, and the three rows
of `compare` on 4 of Llama-3-8B's layers at batch 128 on 8 devices, and prints XLA's plan (arguments +
temporaries + outputs - aliased, per device) beside `memory_estimate`'s. Nothing is allocated: inputs are
`jax.ShapeDtypeStruct`s. (XLA on CPU computes bfloat16 matmuls in float32 copies of their operands, so its plans of
bfloat16 steps are upper bounds of an accelerator's.)

`fit` asks `memory_estimate` alone (no compile): Llama-3-8B at batch 128 on 8 devices, LoRA and full fine-tune,
and for Llama-3.2-1B, 3B and Llama-3-8B on one 80 GiB device, the largest batch whose step fits.
`lora_memory_row` (one model, mesh, batch and rank: the estimate and XLA's plan) is the function another benchmark
imports for a LoRA row.

The last line printed is one JSON object with every figure.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if "--part" in sys.argv and ("scale" in sys.argv or "fit" in sys.argv):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import fine_tuning
from bond_jax import lora
from bond_jax import memory_estimate
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sharding
from bond_jax import train_state
from bond_jax import trainer
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig, Rotary

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import compiled_steps  # (tests/: the trainer's steps compiled from abstract shapes)

GIB = 1024 ** 3
# Two small shapes (name -> model, batch, prompt and new tokens): one where activations dominate the step's
# memory, one where weights do (the worst case for merged adapters, which hold merged copies of the kernels).
COMPARE_SHAPES = {
    "activations-bound": (ModelConfig(vocab_size=1024, num_layers=4, d_model=256, num_heads=8, num_kv_heads=4,
                                      head_dim=32, mlp_dim=768, max_seq_len=128), 16, 32),
    "weights-bound": (ModelConfig(vocab_size=1024, num_layers=4, d_model=1024, num_heads=8, num_kv_heads=4,
                                  head_dim=128, mlp_dim=4096, max_seq_len=128), 2, 16),
}
QWIX_TARGETS = r".*(attn/(q|k|v|o)|mlp/(gate|up|down))$"
LLAMA3_ROPE = Rotary(theta=500_000.0, kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_len=8192)
LLAMA3_8B = ModelConfig(vocab_size=128256, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                        mlp_dim=14336, max_seq_len=8192, rotary=LLAMA3_ROPE, dtype="bfloat16")


def token_reward(prompts, prompt_mask, generations, generation_mask):
  del prompts, prompt_mask
  return jnp.sum((generations % 2 == 0) & generation_mask, axis=1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class InsideMatmuls(lora.Lora):
  """LoRA whose model parameters carry the adapters beside the kernels, for qwix's model to apply in its matmuls."""

  def policy(self, adapter, frozen):
    flat = dict(traverse_util.flatten_dict(frozen.base, sep="/"))
    for module, pair in traverse_util.flatten_dict(adapter, sep="/", is_leaf=lora.is_pair).items():
      flat[f"{module}/kernel_lora_a"], flat[f"{module}/kernel_lora_b"] = pair[lora.LORA_A], pair[lora.LORA_B]
    return traverse_util.unflatten_dict(flat, sep="/")


def config_for(model_config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, rank: int):
  config = run_config.base_config()
  config.batch_size, config.data.prompt_len, config.sampling.max_new_tokens = batch, prompt_len, new_tokens
  config.policy.dtype = model_config.dtype
  config.policy.lora.rank, config.policy.lora.alpha = rank, 2.0 * rank
  config.policy.lora.base_in_compute_dtype = model_config.dtype != "float32"
  config.mesh_shape = (1, 1, 1)
  return config


def plan(analysis) -> dict:
  """XLA's memory plan per device, in GiB."""
  peak = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes)
  return {"arguments_gib": analysis.argument_size_in_bytes / GIB, "temporaries_gib": analysis.temp_size_in_bytes / GIB,
          "planned_gib": peak / GIB}


def compile_step(config, model_config, ref_params, mesh, reward_fn, concrete: bool):
  """The train step as the trainer compiles it (`trainer.compile_steps`, from abstract inputs:
  `compiled_steps.compile_abstract`); with `concrete`, also the state and frozen inputs on the mesh, as
  `trainer.sharded_train_state` places them (for timing). Returns `(compiled, estimate, (state, frozen) or None)`."""
  steps = compiled_steps.compile_abstract(config, model_config, ref_params, reward_fn, mesh)
  inputs = None
  if concrete:
    frozen, initial, _ = fine_tuning.setup(config, ref_params, model_config)
    frozen, _, state, _ = trainer.sharded_train_state(config, frozen, train_state.make_optimizer(config.optimizer),
                                                      mesh, initial)
    inputs = (state, frozen)
  return steps.train, steps.estimate, inputs


def time_steps(compiled, reward_fn, inputs, batch, steps: int) -> float:
  """Median seconds per step over `steps` steps after one warm-up."""
  state, frozen = inputs
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(reward_fn, state, frozen, batch)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


class _Variant:
  """Within `with _Variant(name, rank)`: the fine-tuning of row `name`; "inside matmuls" patches in qwix."""

  def __init__(self, name: str, rank: int):
    self.name, self.rank, self._patches = name, rank, []

  def __enter__(self):
    if "qwix" in self.name:
      import qwix  # pylint: disable=import-outside-toplevel
      provider = qwix.LoraProvider(module_path=QWIX_TARGETS, rank=self.rank, alpha=2.0 * self.rank)
      original_model, original_from_config = transformer.Transformer, fine_tuning.from_config
      self._patches = [(transformer, "Transformer", original_model), (fine_tuning, "from_config", original_from_config)]
      transformer.Transformer = lambda cfg: qwix.apply_lora_to_model(original_model(cfg), provider)
      fine_tuning.from_config = lambda c: InsideMatmuls(**dataclasses.asdict(original_from_config(c)))
    return self

  def __exit__(self, *exc_info):
    for module, attribute, value in self._patches:
      setattr(module, attribute, value)


def _variants(rank: int) -> dict[str, int]:
  """Row name -> LoRA rank (0: full fine-tune); qwix's row only where qwix imports."""
  variants = {"full fine-tune": 0, "LoRA merged (bond_jax)": rank}
  try:
    import qwix  # pylint: disable=import-outside-toplevel,unused-import
    variants["LoRA inside matmuls (qwix)"] = rank
  except ImportError:
    print("qwix is not installed here: no inside-the-matmuls row (see the docstring).")
  return variants


def compare(rank: int, steps: int) -> dict:
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  reward_fn = rewards.token_reward(token_reward)
  result = {}
  for shape, (model_config, batch_size, tokens) in COMPARE_SHAPES.items():
    ref_params = transformer.init_params(model_config, jax.random.PRNGKey(0))
    prompts = jax.random.randint(jax.random.PRNGKey(1), (batch_size, tokens), 0, model_config.vocab_size)
    batch = {"prompts": prompts, "prompt_mask": jnp.ones(prompts.shape, bool)}
    rows = {}
    for name, r in _variants(rank).items():
      config = config_for(model_config, batch=batch_size, prompt_len=tokens, new_tokens=tokens, rank=r)
      with _Variant(name, r):
        start = time.perf_counter()
        compiled, estimate, inputs = compile_step(config, model_config, ref_params, mesh, reward_fn, concrete=True)
        compile_s = time.perf_counter() - start
        rows[name] = plan(compiled.memory_analysis()) | {
            "estimate_gib": estimate.total / GIB, "compile_s": compile_s,
            "step_s": time_steps(compiled, reward_fn, inputs, batch, steps)}
    print(f"{shape}: J-BOND step, {model_config.num_layers} layers, d_model {model_config.d_model}, mlp "
          f"{model_config.mlp_dim}, vocab {model_config.vocab_size}, batch {batch_size}, {tokens} + {tokens} tokens, "
          f"LoRA rank {rank} on q/k/v/o/gate/up/down, float32, 1 CPU device")
    _table(rows, ("arguments_gib", "temporaries_gib", "planned_gib", "estimate_gib", "compile_s", "step_s"))
    result[shape] = rows
  return result


MERGED = "LoRA merged (bond_jax)"
# Llama-3 shapes (their checkpoints' config.json) for the single-device search, smallest first.
LLAMA = dict(vocab_size=128256, num_kv_heads=8, max_seq_len=8192, rotary=LLAMA3_ROPE, dtype="bfloat16")
ONE_DEVICE_MODELS = {
    "llama3_2_1b": ModelConfig(num_layers=16, d_model=2048, num_heads=32, head_dim=64, mlp_dim=8192,
                               tie_embeddings=True, **LLAMA),
    "llama3_2_3b": ModelConfig(num_layers=28, d_model=3072, num_heads=24, head_dim=128, mlp_dim=8192,
                               tie_embeddings=True, **LLAMA),
    "llama3_8b": LLAMA3_8B,
}
DEVICE_GIB = 80.0


def lora_memory_row(model_config: ModelConfig, mesh_shape=(8, 1, 1), batch: int = 128, rank: int = 64,
                    prompt_len: int = 256, new_tokens: int = 256, compile_plan: bool = True,
                    variant: str = MERGED, reward: str = "model") -> dict:
  """Per-device memory of the J-BOND step with LoRA of `rank` (0: a full fine-tune) on `model_config`, from abstract
  shapes only: `memory_estimate`'s total and parts and, with `compile_plan`, XLA's plan of the compiled step.

  The base is held in bfloat16 (`policy.lora.base_in_compute_dtype`), the adapters and their AdamW moments in
  float32, the reward a model of the policy's shape with a one-label score head in bfloat16 (`reward="model"`) or
  a token reward (`"tokens"`). Needs `prod(mesh_shape)` devices (`--xla_force_host_platform_device_count`).
  `benchmarks/memory_at_scale.py` can import it for a LoRA row.

  Returns:
    `{"estimate_gib", "estimate_parts_gib", "fits_80gb"}` (the estimate against an 80 GiB device) and, with
    `compile_plan`, `"arguments_gib", "temporaries_gib", "planned_gib", "compile_s"`.
  """
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  config = config_for(model_config, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, rank=rank)
  config.mesh_shape = tuple(mesh_shape)
  ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.PRNGKey(0)))
  rm_config = dataclasses.replace(model_config, head="score", num_labels=1, tie_embeddings=False)
  reward_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.ndim >= 2 else x.dtype),
      jax.eval_shape(lambda: transformer.init_params(rm_config, jax.random.PRNGKey(0))))
  reward_fn = (rewards.reward_model(reward_params, rm_config) if reward == "model" else
               rewards.token_reward(token_reward))
  if not compile_plan:
    frozen, initial = compiled_steps.abstract_setup(config, ref_params)
    estimate = memory_estimate.estimate_train_memory(config, model_config, frozen, train_state.make_optimizer(
        config.optimizer), mesh, reward_fn, initial)
    row = {}
  else:
    start = time.perf_counter()
    with _Variant(variant, rank):
      compiled, estimate, _ = compile_step(config, model_config, ref_params, mesh, reward_fn, concrete=False)
    row = plan(compiled.memory_analysis()) | {"compile_s": time.perf_counter() - start}
  return row | {"estimate_gib": estimate.total / GIB, "fits_80gb": estimate.total / GIB <= DEVICE_GIB,
                "estimate_parts_gib": {k: v / GIB for k, v in estimate.parts().items()}}


def largest_on_one_device(rank: int = 64, batches=(1, 2, 4, 8, 16, 32, 64, 128)) -> dict:
  """For each of `ONE_DEVICE_MODELS`, J-BOND's estimate with LoRA of `rank` (0: a full fine-tune) on one device at
  the smallest batch and the largest of `batches` whose estimate fits `DEVICE_GIB` (estimates only). Returns `{"largest": name or None,
  "models": {name: {"params_b", "batch_1_gib", "largest_batch", "largest_batch_gib"}}}`."""
  models = {}
  for name, model_config in ONE_DEVICE_MODELS.items():
    params = jax.eval_shape(lambda c=model_config: transformer.init_params(c, jax.random.PRNGKey(0)))
    estimates = {b: lora_memory_row(model_config, (1, 1, 1), b, rank, compile_plan=False)["estimate_gib"]
                 for b in batches}
    fitting = [b for b, gib in estimates.items() if gib <= DEVICE_GIB]
    models[name] = {"params_b": sum(x.size for x in jax.tree.leaves(params)) / 1e9,
                    "batch_1_gib": estimates[batches[0]], "largest_batch": max(fitting, default=0),
                    "largest_batch_gib": estimates[max(fitting)] if fitting else None}
  fitting = [name for name, row in models.items() if row["largest_batch"]]
  return {"largest": fitting[-1] if fitting else None, "models": models}


def scale(rank: int) -> dict:
  rows = {}
  # (layers, mesh, batch, reward, row, rank). The reward: a reward model of the policy's shape in bfloat16
  # ("model"), or a token reward ("tokens": qwix's patched model would look for adapters in a reward model too).
  # Whole Llama-3-8B steps take long to compile on CPU, so the three-way comparison runs 4 of its 32 layers.
  cases = [(4, (8, 1, 1), 128, "tokens", name) for name in _variants(rank)]
  cases += [(32, (8, 1, 1), 128, "model", MERGED), (32, (1, 1, 1), 1, "model", MERGED)]
  for layers, mesh_shape, batch, reward, variant in cases:
    model_config = dataclasses.replace(LLAMA3_8B, num_layers=layers)
    key = f"llama3_8b[:{layers}] {mesh_shape} b{batch} {reward} reward, {variant}"
    rows[key] = lora_memory_row(model_config, mesh_shape, batch, rank if "LoRA" in variant else 0,
                                variant=variant, reward=reward)
    print(key, json.dumps(rows[key]), flush=True)
  print(f"J-BOND, LoRA rank {rank} (alpha {2 * rank}) on q/k/v/o/gate/up/down, bfloat16 compute, the frozen base and "
        "the reward model in bfloat16, prompt 256 + 256 tokens, mesh (data, fsdp, tensor); [:L]: the first L layers")
  _table(rows, ("arguments_gib", "temporaries_gib", "planned_gib", "estimate_gib", "compile_s"))
  return rows


def fit(rank: int) -> dict:
  """Estimates only (no compile; minutes): Llama-3-8B J-BOND at batch 128 on 8 devices (data parallel, fsdp), LoRA
  against a full fine-tune, and the largest Llama-3 model whose J-BOND step fits one 80 GiB device, with LoRA and
  with a full fine-tune."""
  rows = {}
  for mesh_shape in ((8, 1, 1), (1, 8, 1)):
    for r in (rank, 0):
      key = f"llama3_8b {mesh_shape} b128, {'LoRA rank %d' % r if r else 'full fine-tune'}"
      rows[key] = lora_memory_row(LLAMA3_8B, mesh_shape, 128, r, compile_plan=False)
      print(key, json.dumps(rows[key]), flush=True)
  one_device = {"LoRA": largest_on_one_device(rank), "full fine-tune": largest_on_one_device(0)}
  print(json.dumps(one_device))
  return {"llama3_8b_8_devices": rows, "one_device": one_device}


def _table(rows: dict, columns) -> None:
  width = max(len(name) for name in rows) + 2
  print(f"{'':<{width}}" + "".join(f"{c:>17}" for c in columns))
  for name, row in rows.items():
    print(f"{name:<{width}}" + "".join(f"{row[c]:>17.3f}" for c in columns))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", choices=("compare", "scale", "fit"), default="compare")
  parser.add_argument("--rank", type=int, default=0, help="LoRA rank (default: 16 for compare, 64 for scale)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per row (compare)")
  args = parser.parse_args()
  if args.part == "compare":
    result = compare(args.rank or 16, args.steps)
  elif args.part == "fit":
    result = fit(args.rank or 64)
  else:
    result = scale(args.rank or 64)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
