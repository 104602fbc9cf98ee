"""Memory and collectives of the real train and evaluation steps at 2B-8B scale, from abstract shapes only.

For each model (Gemma-2B, Llama-3.2-3B and Llama-3-8B shapes, random abstract weights: nothing is allocated or
downloaded) with a reward model of the same shape (a one-label score head), this compiles the trainer's own
train and evaluation steps (`trainer.compile_steps`) on 8 simulated CPU devices with the settings of a shipped
config (`configs/gemma_2b_jbond.py` for Gemma, `configs/llama3_8b_jbond.py` for the Llamas: batch 128, prompt
256, 256 new tokens, bfloat16 compute, their remat and micro-batches), and prints per model and mesh:

- XLA's plan per device (`memory_estimate.planned_bytes`: temporaries + arguments + outputs - donated) of the
  train and evaluation steps (the evaluation's with the anchor and the optimizer state, which stay on the devices
  while it runs), and the run's estimate (`memory_estimate.estimate_train_memory`), which must bound both from
  above (the run's check refuses a run on it before compiling);
- collective bytes per train step (`hlo_collectives`: the whole operands, loops multiplied out, the decoding
  loops counted at `max_new_tokens - 1` iterations, of a conditional the costliest branch) against ZeRO-3's:
  every pass gathering the weights it reads once (the decoding weights in the compute dtype, each forward pass
  layer by layer, the update's forward and backward in float32 twice) and the gradient reduce-scattered once,
  per micro-batch where the pass is split;
- collective bytes of one iteration of the decoding loops (per generated token), train and evaluation;
- compile seconds of each step (wall time on this CPU, shared: indicative; on a loaded machine it measures the
  queue as much as the compiler).

  nice -n 19 python benchmarks/memory_at_scale.py                 # every row on its config's mesh
  nice -n 19 python benchmarks/memory_at_scale.py --models gemma_2b --meshes 1,8,1 8,1,1 2,2,2

A fourth row, `llama3_8b_lora`, is Llama-3-8B with `configs/llama3_8b_lora.py` (J-BOND, rank-64 LoRA on a frozen
bfloat16 base). The last line printed is one JSON object keyed `gemma_2b`, `llama3_2_3b`, `llama3_8b`,
`llama3_8b_lora`, each (on its config's
mesh) with `planned_gib` (the larger of train and evaluation), `planned_train_gib`, `planned_eval_gib`,
`estimate_gib`, `collective_gib`, `zero3_gib`, `decode_loop_collective_gib`, `compile_s` (the train step's) and
`eval_compile_s`.
"""

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top  (after the flags)
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from bond_jax import algorithms  # pylint: disable=g-import-not-at-top
from bond_jax import hlo_collectives  # pylint: disable=g-import-not-at-top
from bond_jax import memory_estimate  # pylint: disable=g-import-not-at-top
from bond_jax import rewards  # pylint: disable=g-import-not-at-top
from bond_jax import run_config  # pylint: disable=g-import-not-at-top
from bond_jax import sharding  # pylint: disable=g-import-not-at-top
from bond_jax.models import transformer  # pylint: disable=g-import-not-at-top
from bond_jax.models.config import ModelConfig, Rotary  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import compiled_steps  # pylint: disable=g-import-not-at-top,wrong-import-position
import shipped_configs  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 1024 ** 3
# The checkpoints' config.json, as `hf.config_from_hf` maps them (the fields that shape memory and compute).
LLAMA3_8B = dict(
    vocab_size=128_256, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336,
    max_seq_len=8192, norm_eps=1e-5, stop_token_ids=(128001, 128009), rotary=Rotary(theta=500_000.0))
MODELS = {
    "gemma_2b": ("gemma_2b_jbond", dict(
        vocab_size=256_000, num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16_384,
        max_seq_len=8192, mlp_activation="gelu_tanh", tie_embeddings=True, norm_plus_one=True, embed_scale=True,
        family="gemma", stop_token_ids=(1,), pad_token_id=0)),
    "llama3_2_3b": ("llama3_8b_jbond", dict(
        vocab_size=128_256, num_layers=28, d_model=3072, num_heads=24, num_kv_heads=8, head_dim=128, mlp_dim=8192,
        max_seq_len=131_072, tie_embeddings=True, norm_eps=1e-5, stop_token_ids=(128001, 128008, 128009),
        rotary=Rotary(theta=500_000.0, kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_len=8192))),
    "llama3_8b": ("llama3_8b_jbond", LLAMA3_8B),
    # J-BOND with rank-64 LoRA on a frozen bfloat16 base (issue 16).
    "llama3_8b_lora": ("llama3_8b_lora", LLAMA3_8B),
}


def zero3_bytes(config, model_config: ModelConfig, reward_config: ModelConfig, mesh) -> int:
  """ZeRO-3's collective bytes per train step (per device, whole operands): each pass gathers every weight it
  reads once, per micro-batch where it is split; the update's backward gathers them again, and the gradient is
  reduce-scattered once per micro-batch."""
  def model_bytes(cfg: ModelConfig, dtype) -> int:
    params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
    tensor = mesh.shape["tensor"]
    return sum(x.size * jnp.dtype(dtype if x.ndim >= 2 else jnp.float32).itemsize // (tensor if x.ndim >= 2 else 1)
               for x in jax.tree.leaves(params))
  algorithm = algorithms.from_config(config)
  compute, master = model_bytes(model_config, config.policy.dtype), model_bytes(model_config, jnp.float32)
  reward = model_bytes(reward_config, config.reward.dtype)
  inference, update = config.memory.inference_micro_batches, config.memory.micro_batches
  sampling = compute * (1 + algorithm.has_anchor)  # each model's decoding weights, once per step
  forward = compute * inference * (algorithm.has_anchor + 1)  # the anchor's log-probs; the reference's (logged steps)
  scoring = reward * inference * (1 + algorithm.has_anchor)  # the policy's and the anchor's samples
  joint = master * update if update > 1 else 0  # the micro-batched update's forward-only pass
  return sampling + forward + scoring + joint + update * 3 * master  # forward, backward, gradient


def row_mesh(config) -> str:
  return "x".join(map(str, sharding.resolve_mesh_shape(config.mesh_shape, jax.device_count())))


def measure(name: str, mesh_shape, hlo_dir: str = "") -> dict:
  config_name, fields = MODELS[name]
  config = shipped_configs.load(config_name)
  config.mesh_shape = tuple(mesh_shape)
  config.policy.path = config.reward.path = config.data.path = "/abstract"  # Shapes only: nothing is read.
  run_config.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh_shape)
  model_config = ModelConfig(**fields, dtype=config.policy.dtype, remat=config.memory.remat)
  reward_config = ModelConfig(**fields | dict(head="score", tie_embeddings=False), dtype=config.reward.dtype)
  ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  reward_params = jax.eval_shape(lambda: transformer.cast_to_compute_dtype(
      transformer.init_params(reward_config, jax.random.key(1)), reward_config))
  reward_fn = rewards.reward_model(reward_params, reward_config)
  timings = {}

  def on_duration(event, seconds, **kwargs):
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      timings.setdefault("compiles", []).append(seconds)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  start = time.perf_counter()
  # Under LoRA the reference becomes the base and the state the adapters (`compiled_steps.abstract_setup`).
  steps = compiled_steps.compile_abstract(config, model_config, ref_params, reward_fn, mesh)
  total_s = time.perf_counter() - start
  jax.monitoring.unregister_event_duration_listener(on_duration)
  train, evaluate, estimate = steps.train, steps.evaluate, steps.estimate
  if hlo_dir:
    for step_name, compiled in (("train", train), ("eval", evaluate)):
      with open(os.path.join(hlo_dir, f"{name}_{row_mesh(config)}_{step_name}.hlo.txt"), "w", encoding="utf-8") as f:
        f.write(compiled.as_text())
  loops = config.sampling.max_new_tokens - 1
  train_collectives = hlo_collectives.summarize(train.as_text(), unknown_trip_count=loops)
  eval_collectives = hlo_collectives.summarize(evaluate.as_text(), unknown_trip_count=loops)
  compiles = timings.get("compiles", [total_s / 2, total_s / 2])
  planned_train, planned_eval = steps.planned_train, steps.planned_eval
  return dict(
      mesh=row_mesh(config),
      planned_train_gib=planned_train / GIB, planned_eval_gib=planned_eval / GIB,
      planned_gib=max(planned_train, planned_eval) / GIB, estimate_gib=estimate.total / GIB,
      estimate_over_plan=estimate.total / max(planned_train, planned_eval),
      estimate_parts_gib={part: value / GIB for part, value in estimate.parts().items()},
      estimate_peak_step=estimate.peak_step,
      estimate_steps_gib={name: estimate.total_at(name) / GIB for name in estimate.steps},
      collective_gib=train_collectives.total_bytes / GIB,
      collective_gib_by_kind={k: v / GIB for k, v in train_collectives.bytes_by_kind.items() if v},
      zero3_gib=zero3_bytes(config, model_config, reward_config, mesh) / GIB,
      eval_collective_gib=eval_collectives.total_bytes / GIB,
      decode_loop_collective_gib=max(train_collectives.data_dependent_loop_bytes
                                     + eval_collectives.data_dependent_loop_bytes, default=0) / GIB,
      compile_s=compiles[0], eval_compile_s=compiles[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--meshes", nargs="*", default=[], help="data,fsdp,tensor sizes; default: the config's mesh")
  parser.add_argument("--hlo_dir", default="", help="a directory to write the compiled programs' HLO text to")
  args = parser.parse_args()
  results, table = {}, []
  header = ("model", "mesh", "train GiB", "eval GiB", "estimate GiB", "est/plan", "coll. GiB/step", "ZeRO-3 GiB",
            "decode loop GiB/token", "compile s (train, eval)")
  for name in args.models:
    meshes = [tuple(int(s) for s in m.split(",")) for m in args.meshes] or [shipped_configs.load(
        MODELS[name][0]).mesh_shape]
    for mesh_shape in meshes:
      row = measure(name, mesh_shape, args.hlo_dir)
      print(json.dumps({name: row}), flush=True)
      results.setdefault(name, row)
      table.append((name, row["mesh"], f"{row['planned_train_gib']:.1f}", f"{row['planned_eval_gib']:.1f}",
                    f"{row['estimate_gib']:.1f}", f"{row['estimate_over_plan']:.2f}", f"{row['collective_gib']:.1f}",
                    f"{row['zero3_gib']:.1f}", f"{row['decode_loop_collective_gib']:.2g}",
                    f"{row['compile_s']:.0f}, {row['eval_compile_s']:.0f}"))
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in table:
    print("| " + " | ".join(row) + " |")
  print(json.dumps({name: {key: row[key] for key in ("planned_gib", "planned_train_gib", "planned_eval_gib",
                                                       "estimate_gib", "collective_gib", "zero3_gib",
                                                       "decode_loop_collective_gib", "compile_s", "eval_compile_s")}
                    for name, row in results.items()}))


if __name__ == "__main__":
  main()
