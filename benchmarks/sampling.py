"""Generated tokens/s of `bond_jax.sampling.sample` vs Hugging Face `generate` (PyTorch, CPU).

Both run one random Llama-style model (built with transformers, converted with `bond_jax.models.hf`), the same
prompts, greedy decoding of exactly `--new_tokens` tokens (no EOS for us, `min_new_tokens` for HF), after a
warm-up, median of `--repeats` runs. Our rate is also put against the machine's measured matmul FLOP/s and
memory bandwidth (a large jnp matmul, a large array copy): the FLOPs and the minimum bytes (weights plus the live
KV cache) that prefill + decode must touch, divided by the time taken. (A model whose weights fit in the CPU
caches, like the --quick one, can exceed 100% of the measured memory bandwidth.)

  python benchmarks/sampling.py            # ~34M params, batch 1, 8, 64
  python benchmarks/sampling.py --quick    # a tiny model, to check that it runs

The last line printed is one JSON object: {"batch_1": {"tokens_per_s": ..., "hf_tokens_per_s": ...}, ...}.
"""

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bond_jax import sampling
from bond_jax.models import hf
from timing import median_seconds

FULL = dict(vocab=8192, d_model=512, layers=8, heads=8, kv_heads=4, mlp_dim=1408, prompt_len=32, new_tokens=64,
            repeats=3)
QUICK = dict(vocab=1024, d_model=128, layers=2, heads=4, kv_heads=2, mlp_dim=352, prompt_len=16, new_tokens=16,
             repeats=2)


def machine_peaks(repeats: int) -> tuple[float, float]:
  """(matmul FLOP/s, copy bandwidth bytes/s) of the default JAX device, float32."""
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  flops = 2 * n**3 / median_seconds(lambda: matmul(a).block_until_ready(), repeats)
  # Donated, so each copy reuses its buffer: a fresh 256 MiB output would time page faults, not memory.
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  buffers = [jnp.ones((64 * 2**20,), jnp.float32)]  # 256 MiB, far beyond any cache

  def copy_step():
    buffers[0] = copy(buffers[0]).block_until_ready()

  bandwidth = 2 * buffers[0].nbytes / median_seconds(copy_step, repeats)
  return flops, bandwidth


def decode_cost(config, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
  """(FLOPs, minimum bytes moved) of prefilling `prompt_len` tokens and decoding `new_tokens`, float32.

  FLOPs: 2 per weight per token (the embedding gather aside) plus the attention scores and mixing. Bytes: every
  step reads all weights but the embedding table once, and the live part of the KV cache.
  """
  d, h, kv, hd, f, v = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim,
                        config.vocab_size)
  layer_weights = d * hd * (2 * h + 2 * kv) + 3 * d * f
  matmul_weights = config.num_layers * layer_weights + d * v
  tokens = batch * (prompt_len + new_tokens)
  contexts = np.arange(1, prompt_len + new_tokens + 1)  # keys seen by each position
  attention_flops = 4 * config.num_layers * h * hd * batch * contexts.sum()
  flops = 2 * matmul_weights * tokens + attention_flops
  kv_bytes_per_key = config.num_layers * 2 * kv * hd * 4
  decode_contexts = contexts[prompt_len:]
  bytes_moved = 4 * matmul_weights * (new_tokens + 1) + kv_bytes_per_key * batch * decode_contexts.sum()
  return float(flops), float(bytes_moved)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny model and lengths, to check that it runs")
  parser.add_argument("--batch_sizes", default="1,8,64", help="comma-separated batch sizes")
  for name, value in FULL.items():
    parser.add_argument(f"--{name}", type=int, default=None, help=f"default {value} ({QUICK[name]} with --quick)")
  args = parser.parse_args()
  settings = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in (QUICK if args.quick else FULL).items()}
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

  hf_config = transformers.LlamaConfig(
      vocab_size=settings["vocab"], hidden_size=settings["d_model"], intermediate_size=settings["mlp_dim"],
      num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
      num_key_value_heads=settings["kv_heads"],
      max_position_embeddings=settings["prompt_len"] + settings["new_tokens"],
      pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    params, config = hf.load_checkpoint(path)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  prompt_len, new_tokens, repeats = settings["prompt_len"], settings["new_tokens"], settings["repeats"]
  sampling_config = sampling.SamplingConfig(max_new_tokens=new_tokens, greedy=True)

  peak_flops, peak_bandwidth = machine_peaks(repeats)
  print(f"model: {num_params / 1e6:.1f}M params ({settings}); JAX device: {jax.devices()[0].device_kind}, "
        f"torch threads: {torch.get_num_threads()}")
  print(f"measured peaks: matmul {peak_flops / 1e9:.1f} GFLOP/s, copy {peak_bandwidth / 1e9:.1f} GB/s")
  print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'speed-up':>9} {'%FLOP/s':>8} {'%bandwidth':>11} "
        f"{'same tokens':>12}")

  results = {}
  for batch in batch_sizes:
    prompts = np.random.default_rng(batch).integers(3, config.vocab_size, size=(batch, prompt_len))
    jax_prompts, jax_mask = jnp.asarray(prompts, jnp.int32), jnp.ones(prompts.shape, bool)

    def ours_fn():
      out = sampling.sample(params, jax_prompts, jax_mask, jax.random.key(0), sampling_config, config)
      return out.tokens.block_until_ready()

    ids = torch.as_tensor(prompts)

    def hf_fn():
      with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    ours_seconds, hf_seconds = median_seconds(ours_fn, repeats), median_seconds(hf_fn, repeats)
    agreement = float(np.mean(np.asarray(ours_fn())[:, 0] == hf_fn()[:, prompt_len:].numpy()))
    flops, bytes_moved = decode_cost(config, batch, prompt_len, new_tokens)
    flop_fraction = flops / ours_seconds / peak_flops
    bandwidth_fraction = bytes_moved / ours_seconds / peak_bandwidth
    ours_rate, hf_rate = batch * new_tokens / ours_seconds, batch * new_tokens / hf_seconds
    results[f"batch_{batch}"] = dict(tokens_per_s=round(ours_rate, 1), hf_tokens_per_s=round(hf_rate, 1),
                                     flop_fraction=round(flop_fraction, 4),
                                     bandwidth_fraction=round(bandwidth_fraction, 4))
    print(f"{batch:>5} {ours_rate:>11.1f} {hf_rate:>10.1f} {ours_rate / hf_rate:>8.2f}x {flop_fraction:>8.1%} "
          f"{bandwidth_fraction:>11.1%} {agreement:>12.0%}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
