"""The J-BOND step on one GPU with a model of about 1B parameters in bfloat16: MFU of its parts, decode bandwidth.

The same step and parts as `train_step.py` (sampling, scoring, anchor and reference log-probabilities, update, the
fused step), on random weights: float32 parameters (AdamW's master copy, as in training), bfloat16 compute and KV
cache. Prompts are random token ids and the reward a function of the tokens on the device (a text reward runs
on the host and would measure the host), so nothing is downloaded; EOS is off, so every sample has all its
tokens.

- Ceilings, measured first: the bfloat16 matmul rate (the fastest of 8192^3 products on random data) and the
  memory bandwidth (a device-to-device copy of 4 GiB, bytes read plus written).
- MFU of each part and of the fused step: the analytic FLOPs of `train_step.step_flops` over the measured rate
  (and over the datasheet's dense bfloat16 rate, `--datasheet_tflops`).
- Decoding: `sampling.sample` of 3 samples per prompt timed with `new_tokens` and with 1 new token; the
  difference is `new_tokens - 1` decode steps. Its floor reads every weight once per step in bfloat16 and the
  visible KV cache; the ratio measured / floor is what the issue bounds (within 2x).

  python benchmarks/gpu_step.py                  # ~1.07B parameters, batch 32, prompt 128, 128 new tokens
  python benchmarks/gpu_step.py --shape tiny     # seconds on CPU: checks that it runs

The last line printed is one JSON object with the figures.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from bond_jax import memory_estimate
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import train_state as train_state_lib
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from timing import median_seconds, wall_times
from train_step import SAMPLES_PER_PROMPT, forward_flops, matmul_flops_per_s, step_flops, time_jbond

SHAPES = {
    # Llama-like: 16 layers of d_model 2048, grouped-query attention, a 32k vocabulary (tied): 1.07B parameters.
    "1b": dict(vocab_size=32_000, num_layers=16, d_model=2048, num_heads=16, num_kv_heads=8, head_dim=128,
               mlp_dim=8192),
    "tiny": dict(vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
}
LOG_EVERY = 5  # the fused step's logging period: the reference log-probabilities run once per period


def copy_bytes_per_s(num_bytes: int, repeats: int) -> float:
  """Device memory bandwidth of an elementwise pass over `num_bytes` (bytes read plus bytes written), from the
  fastest of `repeats`."""
  x = jax.random.uniform(jax.random.key(0), (num_bytes // 4,), jnp.float32)
  scale = jax.jit(lambda v: v * 1.0001)  # not a plain copy, which XLA may alias away
  return 2 * x.nbytes / min(wall_times(lambda: scale(x).block_until_ready(), repeats))


def token_reward(prompts, prompt_mask, tokens, mask):
  """`[batch, samples]` share of generated tokens whose id is a multiple of 7: cheap, on the device."""
  del prompts, prompt_mask
  hits = jnp.sum(jnp.where(mask, tokens % 7 == 0, False), axis=-1)
  return hits / jnp.maximum(jnp.sum(mask, axis=-1), 1)


def decode_floor(mc: ModelConfig, num_params: int, rows: int, prompt_len: int, steps: int,
                 bytes_per_s: float, flops_per_s: float) -> tuple[float, float]:
  """(seconds, bytes) of `steps` decode steps of `rows` sequences after `prompt_len` prompt tokens at the
  ceilings: each step reads every weight once in bfloat16 and the visible KV cache (`kv_cache_bytes`: bfloat16
  keys and values, and the mask), or does its matmuls, whichever takes longer."""
  seconds = total_bytes = 0.0
  for j in range(1, steps + 1):
    visible = prompt_len + j
    step_bytes = 2 * num_params + memory_estimate.kv_cache_bytes(mc, rows, visible)
    seconds += max(step_bytes / bytes_per_s, forward_flops(mc, rows, rows, rows * visible) / flops_per_s)
    total_bytes += step_bytes
  return seconds, total_bytes


def time_decode(mc, params, batch, new_tokens: int, repeats: int) -> tuple[float, float]:
  """Seconds of `sampling.sample` with 3 samples per prompt and `new_tokens`, and with 1 new token."""
  seconds = []
  for tokens in (new_tokens, 1):
    config = sampling.SamplingConfig(max_new_tokens=tokens, num_samples=SAMPLES_PER_PROMPT,
                                     pad_token_id=mc.pad_token_id)
    sample = lambda config=config: sampling.sample(  # noqa: E731  (jitted: config and mc are static)
        params, batch["prompts"], batch["prompt_mask"], jax.random.key(3), config, mc)
    seconds.append(median_seconds(lambda: jax.block_until_ready(sample()), repeats))
  return seconds[0], seconds[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=32, help="prompts per step")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul_n", type=int, default=8192, help="size of the matmul that measures the peak")
  parser.add_argument("--copy_gib", type=float, default=4.0, help="size of the copy that measures bandwidth")
  parser.add_argument("--datasheet_tflops", type=float, default=989.0,
                      help="dense bfloat16 TFLOP/s of the datasheet (H100/H200 SXM: 989)")
  args = parser.parse_args()
  started = time.perf_counter()

  peak = matmul_flops_per_s(10, args.matmul_n, jnp.bfloat16)
  bandwidth = copy_bytes_per_s(int(args.copy_gib * 2**30), 10)
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}: bfloat16 matmul {peak / 1e12:.1f} TFLOP/s, "
        f"copy {bandwidth / 1e12:.2f} TB/s (measured)", flush=True)

  mc = ModelConfig(max_seq_len=args.prompt_len + args.new_tokens, tie_embeddings=True, dtype="bfloat16",
                   pad_token_id=0, **SHAPES[args.shape])
  config = run_config.base_config()
  config.batch_size = args.batch
  config.data.prompt_len = args.prompt_len
  config.sampling.max_new_tokens = args.new_tokens
  config.log_every = LOG_EVERY
  params = jax.jit(transformer.init_params, static_argnums=0)(mc, jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 1, mc.vocab_size, jnp.int32)
  batch = {"prompts": prompts, "prompt_mask": jnp.ones(prompts.shape, bool)}
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  print(f"{num_params / 1e9:.3f}B parameters {SHAPES[args.shape]}; batch {args.batch}, prompt {args.prompt_len}, "
        f"new tokens {args.new_tokens}, {SAMPLES_PER_PROMPT} samples per prompt", flush=True)

  long_s, short_s = time_decode(mc, params, batch, args.new_tokens, args.repeats)
  rows = args.batch * SAMPLES_PER_PROMPT
  decode_s = long_s - short_s
  floor_s, decode_bytes = decode_floor(mc, num_params, rows, args.prompt_len, args.new_tokens - 1, bandwidth, peak)
  print(f"decode ({rows} rows): {decode_s / (args.new_tokens - 1) * 1e3:.2f} ms/step, floor "
        f"{floor_s / (args.new_tokens - 1) * 1e3:.2f} ms/step: {decode_s / floor_s:.2f}x the floor, "
        f"{decode_bytes / decode_s / bandwidth:.0%} of the measured bandwidth", flush=True)

  seconds, generated = time_jbond(config, mc, params, token_reward, optimizer, batch, args.repeats)
  flops = step_flops(mc, args.batch, args.prompt_len, args.new_tokens, LOG_EVERY)
  sampled_tokens = rows * args.new_tokens
  print(f"\n{'part':<16} {'seconds':>9} {'TFLOP':>8} {'MFU':>7} {'MFU (datasheet)':>16}")
  for part, s in seconds.items():
    print(f"{part:<16} {s:>9.4f} {flops[part] / 1e12:>8.2f} {flops[part] / s / peak:>7.1%} "
          f"{flops[part] / s / (args.datasheet_tflops * 1e12):>16.1%}")
  print(f"fused step: {sampled_tokens / seconds['fused_step']:.0f} sampled tokens/s "
        f"({generated:.0f} generated tokens per step); whole benchmark {time.perf_counter() - started:.0f} s")
  print(json.dumps({
      "device": jax.devices()[0].device_kind, "jax": jax.__version__, "params": int(num_params),
      "settings": vars(args), "matmul_tflops": round(peak / 1e12, 1), "copy_tb_per_s": round(bandwidth / 1e12, 3),
      "seconds": {k: round(v, 5) for k, v in seconds.items()},
      "mfu": {k: round(flops[k] / seconds[k] / peak, 4) for k in seconds},
      "mfu_datasheet": {k: round(flops[k] / seconds[k] / (args.datasheet_tflops * 1e12), 4) for k in seconds},
      "decode": {"ms_per_step": round(decode_s / (args.new_tokens - 1) * 1e3, 3),
                 "floor_ms_per_step": round(floor_s / (args.new_tokens - 1) * 1e3, 3),
                 "over_floor": round(decode_s / floor_s, 3),
                 "bandwidth_use": round(decode_bytes / decode_s / bandwidth, 3)},
      "jbond_tokens_per_s": round(sampled_tokens / seconds["fused_step"], 1)}))


if __name__ == "__main__":
  main()
