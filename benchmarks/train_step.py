"""Step time and tokens/s of the J-BOND train step on CPU: its parts, 1 vs 8 devices, Best-of-N, and peer GRPOs.

For each model shape (random weights, the shipped tokenizer, the shipped sentiment reward on decoded text):

- the fused step, `jax.jit(train_step.make_train_step(...))`, timed over whole logging periods (`log_every` = 10
  steps, one of which computes the metrics-only reference log-probabilities) and reported per step, and its
  parts, the step's own phases (`train_step.TrainStep`) each jitted on its own on the same inputs: sampling
  (1 policy + 2 anchor samples per prompt), scoring (3 text rewards per prompt), anchor log-probabilities (the
  estimate phase without the reference: the anchor's forward over the policy sample, quantiles and the Best-of-2
  pick, every step), reference log-probabilities (the same forward, on logged steps only: its share of a step is
  1/10 of its time) and update (forward/backward over the policy sample and the Best-of-2 anchor sample, AdamW,
  EMA anchor);
- model FLOPs utilisation (MFU) against the measured matmul rate of this CPU (the fastest of 2048^3 float32
  `jnp` matmuls timed before and after each shape). FLOPs are counted analytically for the work the step does:
  each prompt runs once through the layers and its samples' generated tokens after it (sampling and every
  log-probability forward share the prompt), 2 FLOPs per matmul weight per token forward (the vocab head only
  where logits are needed), the causal attention scores and mixing (4 * layers * heads * head_dim per visible
  key), backward twice the forward; embedding gathers, norms, softmax, sampling, rewards and the optimizer
  count 0;
- the peers, on the same checkpoint, prompts (exactly `prompt_len` tokens each), batch, lengths and reward:
  TRL's GRPOTrainer (PyTorch, float32, no vLLM) and Tunix's GRPOLearner (JAX, vanilla rollout), each with 3
  generations per prompt (J-BOND also samples 3 per prompt), beta > 0 (a reference forward) and one update per
  step. Each runs in its own virtual environment (`--trl_python`, `--tunix_python`), see
  `benchmarks/peer_grpo_worker.py` and `benchmarks/README.md`.

Tokens/s is sampled tokens per second of the whole step: batch * 3 samples * new_tokens (all sides sample the
same weights, so early EOS is equally (un)likely; the measured lengths are printed). On a shared machine the
load drifts over minutes, so J-BOND and the peers take turns for `--rounds` rounds (3): the speed-ups printed are
the median of the rounds' ratios, each round's shown beside it. Then, for the default shape:
the same fused step on 1 and on 8 simulated CPU devices (`--xla_force_host_platform_device_count`, a `data`
mesh, in subprocesses), and the cost of Best-of-N sampling (N samples + N rewards per prompt, then the best)
against one sample + one reward.

  python benchmarks/train_step.py            # shipped default shape and an 8-layer d_model-512 one
  python benchmarks/train_step.py --quick    # the default shape, small batch and lengths: checks that it runs

The last line printed is one JSON object: `jbond_tokens_per_s`, `trl_tokens_per_s`, `speedup_vs_trl`,
`tunix_tokens_per_s`, `speedup_vs_tunix` (the default shape), per-shape figures under `models`, `devices` and
`best_of_n`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bond_jax import quantiles
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state as train_state_lib
from bond_jax import train_step as train_step_lib
from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.tasks import default_assets
from bond_jax.tasks import sentiment
from timing import median_seconds, wall_times

SHAPES = {
    "default": dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384),
    "large": dict(num_layers=8, d_model=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1408),
}
FULL = dict(models="default,large", batch=16, prompt_len=16, new_tokens=24, repeats=3, rounds=3, peer_steps=5,
            bon_ns="4,16")
QUICK = dict(models="default", batch=8, prompt_len=16, new_tokens=8, repeats=1, rounds=1, peer_steps=1, bon_ns="4")
TIMED_PARTS = ("sampling", "scoring", "anchor_log_probs", "ref_log_probs", "update")
SAMPLES_PER_PROMPT = 3  # J-BOND: 1 policy + 2 anchor samples; TRL: num_generations.
HERE = os.path.dirname(os.path.abspath(__file__))


def matmul_flops_per_s(repeats: int, n: int = 2048, dtype=jnp.float32) -> float:
  """Measured `n`^3 matmul FLOP/s of the default JAX device (all its cores), from the fastest of `repeats`, on
  random data (some chips multiply zeros faster)."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
  matmul = jax.jit(jnp.matmul)
  return 2 * n**3 / min(wall_times(lambda: matmul(a, b).block_until_ready(), repeats))


def model_config(shape: str, tokenizer) -> ModelConfig:
  return ModelConfig(vocab_size=len(tokenizer), max_seq_len=64, tie_embeddings=True,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     stop_token_ids=(tokenizer.eos_token_id,), **SHAPES[shape])


def exact_length_prompts(tokenizer, batch: int, prompt_len: int) -> tuple[list[str], np.ndarray]:
  """`batch` review beginnings that encode (BOS included) to exactly `prompt_len` tokens: (texts, ids)."""
  with open(default_assets.CORPUS_PATH, encoding="utf-8") as f:
    reviews = f.read().splitlines()
  texts, ids = [], []
  for review in reviews:
    tokens = tokenizer(review)["input_ids"][:prompt_len]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    # The cut text must encode back to the same ids, or TRL (which tokenizes text) would see another prompt.
    if len(tokens) == prompt_len and tokenizer(text)["input_ids"] == tokens:
      texts.append(text)
      ids.append(tokens)
    if len(texts) == batch:
      return texts, np.asarray(ids, np.int32)
  raise ValueError(f"batch={batch}: the corpus has too few reviews of at least prompt_len={prompt_len} tokens.")


def forward_flops(mc: ModelConfig, tokens: int, head_tokens: int, visible_keys: int) -> float:
  """Matmul FLOPs of a forward: `tokens` through the layers, `head_tokens` through the vocab head, and
  attention over `visible_keys` (query, key) pairs in total."""
  layer_weights = mc.d_model * mc.head_dim * (2 * mc.num_heads + 2 * mc.num_kv_heads) + 3 * mc.d_model * mc.mlp_dim
  return float(2 * mc.num_layers * layer_weights * tokens + 2 * mc.d_model * mc.vocab_size * head_tokens
               + 4 * mc.num_layers * mc.num_heads * mc.head_dim * visible_keys)


def step_flops(mc: ModelConfig, batch: int, prompt_len: int, new_tokens: int, log_every: int) -> dict[str, float]:
  """Analytic FLOPs of each part of one J-BOND step (see the module docstring for what is counted); the
  reference log-probabilities count at 1 / `log_every` of their work in the fused step, as they run."""
  p, t = prompt_len, new_tokens
  triangle = lambda n: n * (n + 1) // 2  # noqa: E731  (causal (query, key) pairs of n tokens)

  def shared_prompt_forward(samples: int) -> float:
    # One prompt forward per prompt, then the t - 1 generated tokens that are fed back, of every sample, over the
    # prompt's cache; t predicting positions per sample through the head (sampling: the same tokens, one by one).
    tokens = batch * p + batch * samples * (t - 1)
    keys = batch * triangle(p) + batch * samples * sum(p + j for j in range(1, t))
    return forward_flops(mc, tokens, batch * samples * t, keys)

  parts = {
      "sampling": shared_prompt_forward(1) + shared_prompt_forward(2),
      "scoring": 0.0,
      "anchor_log_probs": shared_prompt_forward(1),
      "ref_log_probs": shared_prompt_forward(1),
      "update": 3 * shared_prompt_forward(2),
  }
  fused = sum(v for k, v in parts.items() if k != "ref_log_probs") + parts["ref_log_probs"] / log_every
  return parts | {"fused_step": fused}


def jbond_parts(config, mc: ModelConfig, reward_fn, optimizer):
  """The phases of the J-BOND step (`train_step.TrainStep`), each jitted on its own: (sample, score, estimate
  without the reference, the reference log-probabilities, update), the update being the loss's gradient, the
  optimizer step and the anchor's move."""
  step = train_step_lib.make_train_step(config, mc, reward_fn, optimizer)

  @jax.jit
  def update(state, batch, samples, rewards, estimates):
    grads = jax.grad(lambda params: step.loss(params, batch, samples, rewards, estimates)[0])(state.params)
    params, opt_state = step.update(state, grads)
    return state.replace(params=params, anchor_params=step.move_anchor(state, params), opt_state=opt_state,
                         step=state.step + 1)

  return (jax.jit(step.sample), jax.jit(step.score),
          jax.jit(lambda state, ref_params, batch, samples, rewards: step.estimate(
              state, ref_params, batch, samples, rewards, with_reference=False)),
          jax.jit(lambda ref_params, batch, samples: step.log_probs(ref_params, batch, samples.policy)),
          update)


def setup(shape: str, settings: dict, seed: int = 0):
  """(run config, model config, tokenizer, params, reward_fn, optimizer, prompt texts, batch) of one shape."""
  tokenizer = default_assets.load_tokenizer()
  mc = model_config(shape, tokenizer)
  config = run_config.base_config()
  config.batch_size = settings["batch"]
  config.data.prompt_len = settings["prompt_len"]
  config.sampling.max_new_tokens = settings["new_tokens"]
  run_config.validate(config)
  params = transformer.init_params(mc, jax.random.key(seed))
  reward_fn = rewards.text_reward(sentiment.sentiment_reward, tokenizer)
  optimizer = train_state_lib.make_optimizer(config.optimizer)
  texts, ids = exact_length_prompts(tokenizer, settings["batch"], settings["prompt_len"])
  batch = {"prompts": jnp.asarray(ids), "prompt_mask": jnp.ones(ids.shape, bool)}
  return config, mc, tokenizer, params, reward_fn, optimizer, texts, batch


def time_jbond(config, mc, params, reward_fn, optimizer, batch, repeats: int) -> tuple[dict[str, float], float]:
  """(seconds of each part and of the fused step, sampled tokens of one fused step)."""
  state = train_state_lib.create_train_state(params, optimizer, seed=0)
  rng = jax.random.key(1)
  sample, score, estimate, ref_log_probs, update = jbond_parts(config, mc, reward_fn, optimizer)
  samples = sample(state, batch, rng)
  rewards = score(batch, samples)
  estimates = estimate(state, params, batch, samples, rewards)
  run = lambda fn, *args: lambda: jax.block_until_ready(fn(*args))  # noqa: E731
  seconds = {
      "sampling": median_seconds(run(sample, state, batch, rng), repeats),
      "scoring": median_seconds(run(score, batch, samples), repeats),
      "anchor_log_probs": median_seconds(run(estimate, state, params, batch, samples, rewards), repeats),
      "ref_log_probs": median_seconds(run(ref_log_probs, params, batch, samples), repeats),
      "update": median_seconds(run(update, state, batch, samples, rewards, estimates), repeats),
  }
  seconds["fused_step"], metrics = time_fused_step(config, mc, params, reward_fn, optimizer, batch, repeats)
  return seconds, float(metrics["tokens/generated"])


def time_fused_step(config, mc, params, reward_fn, optimizer, batch, periods: int) -> tuple[float, dict]:
  """(seconds per step of `jax.jit(train_step.make_train_step(...))`, the median over `periods` logging periods
  of `config.log_every` steps after a compiling one; the last step's metrics)."""
  step = jax.jit(train_step_lib.make_train_step(config, mc, reward_fn, optimizer), donate_argnums=0)
  # Copies: the step donates its state, and `params` is also the reference it reads.
  holder = {"state": train_state_lib.create_train_state(jax.tree.map(jnp.copy, params), optimizer, seed=0)}

  def logging_period():
    for _ in range(config.log_every):
      holder["state"], metrics = step(holder["state"], params, batch)
    holder["metrics"] = jax.block_until_ready(metrics)

  return median_seconds(logging_period, periods) / config.log_every, holder["metrics"]


def run_json(args: list[str], env: dict[str, str] | None = None) -> dict:
  """Runs a subprocess and returns the JSON object on the last line of its stdout; its stderr only on failure."""
  out = subprocess.run(args, env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def time_devices_worker(settings: dict, devices: int) -> dict:
  """The fused step over a `data` mesh of all (simulated) devices of this process (see `--devices_worker`)."""
  config, mc, _, params, reward_fn, optimizer, _, batch = setup("default", settings)
  if jax.device_count() != devices:
    raise ValueError(f"--devices_worker={devices} but this process sees {jax.device_count()} devices.")
  mesh = sharding.make_mesh((-1, 1, 1))
  param_shardings = sharding.param_shardings(params, mesh)
  params = jax.device_put(params, param_shardings)
  state = train_state_lib.create_train_state(jax.tree.map(jnp.copy, params), optimizer, seed=0)
  state_shardings = sharding.param_shardings(state, mesh)
  state = jax.device_put(state, state_shardings)
  batch_sharding = sharding.batch_sharding(mesh, 2)
  batch = jax.device_put(batch, batch_sharding)
  step = jax.jit(train_step_lib.make_train_step(config, mc, reward_fn, optimizer),
                 in_shardings=(state_shardings, param_shardings, {k: batch_sharding for k in batch}),
                 out_shardings=(state_shardings, None), donate_argnums=0)
  holder = {"state": state}

  def fused():
    holder["state"], metrics = step(holder["state"], params, batch)
    jax.block_until_ready(metrics)

  return {"devices": devices, "step_s": median_seconds(fused, settings["repeats"])}


def time_devices(settings: dict, devices: int) -> dict:
  """Runs `time_devices_worker` in a subprocess with `devices` simulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  args = [sys.executable, os.path.abspath(__file__), "--devices_worker", str(devices)]
  for key in ("batch", "prompt_len", "new_tokens", "repeats"):
    args += [f"--{key}", str(settings[key])]
  return run_json(args, env)


def time_best_of_n(mc, params, reward_fn, batch, new_tokens: int, ns: list[int], repeats: int) -> dict[int, float]:
  """Seconds to draw `n` samples per prompt, score them and pick the best, for each n in `ns`."""
  seconds = {}
  for n in ns:
    config = sampling.SamplingConfig(max_new_tokens=new_tokens, num_samples=n, stop_token_ids=mc.stop_token_ids,
                                     pad_token_id=mc.pad_token_id)

    @jax.jit
    def best_of(params, batch, rng, config=config):
      out = sampling.sample(params, batch["prompts"], batch["prompt_mask"], rng, config, mc)
      scores = reward_fn(batch["prompts"], batch["prompt_mask"], out.tokens, out.mask)
      best = quantiles.best_of_n(scores)
      # All of it is returned: for n = 1 the index alone does not depend on the samples, and XLA would drop them.
      return jnp.take_along_axis(out.tokens, best[:, None, None], axis=1), scores

    seconds[n] = median_seconds(lambda: jax.block_until_ready(best_of(params, batch, jax.random.key(2))), repeats)
  return seconds


def time_peer(peer: str, python: str, params, mc, texts: list[str], settings: dict) -> dict:
  """Runs `peer_grpo_worker.py --peer peer` with `python` on a checkpoint of `params`: its JSON figures, plus
  `step_s`, the median step time after its warm-up steps."""
  with tempfile.TemporaryDirectory() as path:
    hf.save_checkpoint(params, mc, path)
    for name in os.listdir(default_assets.TOKENIZER_DIR):
      shutil.copy(os.path.join(default_assets.TOKENIZER_DIR, name), path)
    prompts_file = os.path.join(path, "prompts.txt")
    with open(prompts_file, "w", encoding="utf-8") as f:
      f.write("\n".join(texts))
    args = [python, os.path.join(HERE, "peer_grpo_worker.py"), "--peer", peer, "--checkpoint", path,
            "--prompts", prompts_file, "--batch", str(settings["batch"]),
            "--num_generations", str(SAMPLES_PER_PROMPT), "--new_tokens", str(settings["new_tokens"]),
            "--steps", str(settings["peer_steps"] + 2)]
    figures = run_json(args)
  return figures | {"step_s": statistics.median(figures["step_seconds"][figures["warmup_steps"]:])}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="default shape, small batch and lengths")
  parser.add_argument("--trl_python", default="/tmp/bench_venv/bin/python",
                      help="python of a virtual environment with trl and torch ('' skips TRL)")
  parser.add_argument("--tunix_python", default="/tmp/tunix_venv/bin/python",
                      help="python of a virtual environment with google-tunix ('' skips Tunix)")
  parser.add_argument("--devices_worker", type=int, default=0, help=argparse.SUPPRESS)
  for name, value in FULL.items():
    parser.add_argument(f"--{name}", type=type(value), default=None,
                        help=f"default {value} ({QUICK[name]} with --quick)")
  args = parser.parse_args()
  settings = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in (QUICK if args.quick else FULL).items()}
  if args.devices_worker:
    print(json.dumps(time_devices_worker(settings, args.devices_worker)))
    return
  batch_size, prompt_len, new_tokens, repeats = (settings[k] for k in ("batch", "prompt_len", "new_tokens",
                                                                        "repeats"))
  sampled_tokens = batch_size * SAMPLES_PER_PROMPT * new_tokens
  # The matmul rate is measured again after each shape, and the fastest counts: other load on the machine only
  # ever slows it down.
  peak = matmul_flops_per_s(10)
  measured = {}
  for shape in settings["models"].split(","):
    config, mc, _, params, reward_fn, optimizer, texts, batch = setup(shape, settings)
    # J-BOND and the peers take turns, round after round: load from elsewhere on a shared machine drifts over
    # minutes, and each round's ratio compares measurements taken minutes apart at most.
    rounds = []
    for _ in range(settings["rounds"]):
      seconds, generated = time_jbond(config, mc, params, reward_fn, optimizer, batch, repeats)
      peers = {peer: time_peer(peer, python, params, mc, texts, settings)
               for peer, python in (("trl", args.trl_python), ("tunix", args.tunix_python)) if python}
      rounds.append((seconds, peers))
      peak = max(peak, matmul_flops_per_s(10))
    measured[shape] = (sum(x.size for x in jax.tree.leaves(params)), mc, rounds, generated)

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores; measured matmul "
        f"{peak / 1e9:.1f} GFLOP/s; batch {batch_size}, prompt {prompt_len}, new tokens {new_tokens}, "
        f"{SAMPLES_PER_PROMPT} samples/prompt ({sampled_tokens} sampled tokens/step), median of {repeats} "
        f"repeats in each of {settings['rounds']} round(s), then the median over rounds")
  results = {"settings": settings, "matmul_gflops": round(peak / 1e9, 2), "models": {}}
  log_every = run_config.base_config().log_every
  # How often each part runs per step: the reference log-probabilities only on logged steps.
  per_step = {part: 1 / log_every if part == "ref_log_probs" else 1.0 for part in TIMED_PARTS}
  for shape, (num_params, mc, rounds, generated) in measured.items():
    seconds = {part: statistics.median(r[0][part] for r in rounds) for part in rounds[0][0]}
    flops = step_flops(mc, batch_size, prompt_len, new_tokens, log_every)
    print(f"\n{shape}: {num_params / 1e6:.2f}M params {SHAPES[shape]}")
    print(f"{'part':<16} {'seconds':>9} {'runs/step':>9} {'of step':>8} {'GFLOP':>8} {'MFU':>7}")
    for part, s in seconds.items():
      runs = per_step.get(part, 1.0)
      print(f"{part:<16} {s:>9.4f} {runs:>9.2g} {runs * s / seconds['fused_step']:>8.1%} {flops[part] / 1e9:>8.3f} "
            f"{flops[part] / s / peak:>7.2%}")
    parts_sum = sum(per_step[part] * s for part, s in seconds.items() if part != "fused_step")
    jbond_rate = sampled_tokens / seconds["fused_step"]
    print(f"sum of parts {parts_sum:.4f} s; J-BOND {jbond_rate:.1f} sampled tokens/s "
          f"({generated / (batch_size * SAMPLES_PER_PROMPT):.1f} of {new_tokens} tokens per sample before EOS)")
    figures = dict(params=int(num_params), seconds={k: round(v, 5) for k, v in seconds.items()},
                   gflop={k: round(v / 1e9, 4) for k, v in flops.items()},
                   mfu={k: round(flops[k] / seconds[k] / peak, 5) for k in seconds},
                   jbond_step_s=round(seconds["fused_step"], 5), jbond_tokens_per_s=round(jbond_rate, 1))
    for peer in rounds[0][1]:
      step_s = statistics.median(r[1][peer]["step_s"] for r in rounds)
      speedups = [r[1][peer]["step_s"] / r[0]["fused_step"] for r in rounds]
      speedup = statistics.median(speedups)
      figures_peer = rounds[-1][1][peer]
      lengths = figures_peer.get("completion_lengths")
      print(f"{peer} {figures_peer['version']} GRPO ({figures_peer['backend']}): {step_s:.4f} s/step, "
            f"{sampled_tokens / step_s:.1f} sampled tokens/s; J-BOND speed-up {speedup:.2f}x (rounds: "
            f"{', '.join(f'{x:.2f}x' for x in speedups)})"
            + (f" (mean completion length {statistics.mean(lengths):.1f})" if lengths else ""))
      figures |= {f"{peer}_step_s": round(step_s, 5), f"{peer}_tokens_per_s": round(sampled_tokens / step_s, 1),
                  f"speedup_vs_{peer}": round(speedup, 3),
                  f"speedup_vs_{peer}_rounds": [round(x, 3) for x in speedups]}
    results["models"][shape] = figures

  default_shape = settings["models"].split(",")[0]
  results |= {k: results["models"][default_shape].get(k)
              for k in ("jbond_tokens_per_s", "trl_tokens_per_s", "speedup_vs_trl", "tunix_tokens_per_s",
                        "speedup_vs_tunix")}

  one, eight = time_devices(settings, 1), time_devices(settings, 8)
  print(f"\n{default_shape} fused step on simulated CPU devices (data mesh): 1 device {one['step_s']:.4f} s, "
        f"8 devices {eight['step_s']:.4f} s, ratio {eight['step_s'] / one['step_s']:.2f}")
  results["devices"] = {"1": round(one["step_s"], 5), "8": round(eight["step_s"], 5),
                        "ratio_8_over_1": round(eight["step_s"] / one["step_s"], 3)}

  _, mc, _, params, reward_fn, _, _, batch = setup(default_shape, settings)
  ns = [1] + [int(n) for n in settings["bon_ns"].split(",")]
  bon = time_best_of_n(mc, params, reward_fn, batch, new_tokens, ns, repeats)
  print(f"\n{default_shape} Best-of-N at inference (N samples + N rewards per prompt) vs one policy sample:")
  for n, s in bon.items():
    print(f"  N={n:<3} {s:.4f} s  {s / bon[1]:.2f}x")
  results["best_of_n"] = {str(n): {"seconds": round(s, 5), "cost_vs_1": round(s / bon[1], 3)}
                          for n, s in bon.items()}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
