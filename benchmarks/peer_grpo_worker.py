"""The peers of benchmarks/train_step.py: GRPO steps of Hugging Face TRL (PyTorch) or Tunix (JAX), timed on CPU.

Run by `train_step.py` with the python of a separate virtual environment holding one peer (never the project's
own environment), so each peer's imports live in its own function and nothing here runs bond_jax's package
`__init__`. The policy is the checkpoint `train_step.py` wrote (the same random weights as the J-BOND side); the
reward is the shipped sentiment reward on decoded text, as for J-BOND. One GRPO step: `num_generations` samples
of each of `batch` prompts, their rewards, the reference model's log-probs (beta > 0), one policy
forward/backward and one AdamW update (global-norm clipping 1.0, learning rate 3e-4, as the J-BOND default).

  /tmp/bench_venv/bin/python benchmarks/peer_grpo_worker.py --peer trl --checkpoint DIR --prompts FILE \
      --batch 16 --new_tokens 24 --steps 5

The last line printed is one JSON object: {"step_seconds": [...], "warmup_steps": ..., ...}; the first
`warmup_steps` steps include compilation or warm-up.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNING_RATE, GRAD_CLIP, B1, B2 = 3e-4, 1.0, 0.9, 0.99


def load_sentiment_reward():
  """`bond_jax.tasks.sentiment.sentiment_reward`, without running `bond_jax/__init__.py` (it imports JAX)."""
  for name in ("bond_jax", "bond_jax.tasks"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(REPO, *name.split("."))]
    sys.modules.setdefault(name, package)
  spec = importlib.util.spec_from_file_location(
      "bond_jax.tasks.sentiment", os.path.join(REPO, "bond_jax", "tasks", "sentiment.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.sentiment_reward


def run_trl(args, prompts: list[str], reward) -> dict:
  """TRL's GRPOTrainer, float32 on CPU, no vLLM; step times from a callback around each optimizer step."""
  import tempfile

  import datasets
  import torch
  import transformers
  import trl

  class StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step (generation and scoring included) and the logged completion lengths."""

    def __init__(self):
      self.step_seconds, self.completion_lengths, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
      self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.step_seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "completions/mean_length" in logs:
        self.completion_lengths.append(logs["completions/mean_length"])

  torch.manual_seed(0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
  model = transformers.LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32,
                                                        local_files_only=True)
  timer = StepTimer()
  with tempfile.TemporaryDirectory() as out:
    config = trl.GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, use_vllm=False,
        per_device_train_batch_size=args.batch * args.num_generations, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, num_iterations=1,
        learning_rate=LEARNING_RATE, max_grad_norm=GRAD_CLIP, adam_beta1=B1, adam_beta2=B2,
        lr_scheduler_type="constant", max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to="none", log_completions=False, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, **_: reward(prompts, completions),
                              args=config, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=tokenizer, callbacks=[timer])
    trainer.train()
  return dict(peer="trl", step_seconds=timer.step_seconds, warmup_steps=1, completion_lengths=timer.completion_lengths,
              prompt_lengths=sorted({len(ids) for ids in tokenizer(prompts)["input_ids"]}),
              version=trl.__version__, backend=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def run_tunix(args, prompts: list[str], reward) -> dict:
  """Tunix's GRPOLearner (vanilla rollout, Llama3 model) on one CPU device.

  A step's time is the interval between the ends of two consecutive policy updates (`RLCluster.update_actor`).
  """
  import jax
  import numpy as np
  import optax
  import transformers
  from tunix.models.llama3 import model as llama
  from tunix.models.llama3 import params as llama_params
  from tunix.rl import rl_cluster as rlc
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  with open(os.path.join(args.checkpoint, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  model_config = llama.ModelConfig(
      num_layers=hf_config["num_hidden_layers"], vocab_size=hf_config["vocab_size"],
      embed_dim=hf_config["hidden_size"], hidden_dim=hf_config["intermediate_size"],
      num_heads=hf_config["num_attention_heads"], head_dim=hf_config["head_dim"],
      num_kv_heads=hf_config["num_key_value_heads"], rope_theta=hf_config["rope_parameters"]["rope_theta"],
      norm_eps=hf_config["rms_norm_eps"], weight_tying=hf_config["tie_word_embeddings"])
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)

  class Tokenizer:
    """Tunix's tokenizer protocol; `str()` because Tunix hands over numpy strings, which HF tokenizers refuse."""

    def encode(self, text, **_):
      return hf_tokenizer.encode(str(text), add_special_tokens=False)  # Tunix's sampler adds BOS.

    def decode(self, ids, **_):
      return hf_tokenizer.decode(list(ids), skip_special_tokens=True)

    def bos_id(self):
      return hf_tokenizer.bos_token_id

    def eos_id(self):
      return hf_tokenizer.eos_token_id

    def pad_id(self):
      return hf_tokenizer.pad_token_id

  prompt_len = max(len(hf_tokenizer(p)["input_ids"]) for p in prompts)
  optimizer = optax.chain(optax.clip_by_global_norm(GRAD_CLIP), optax.adamw(LEARNING_RATE, b1=B1, b2=B2))
  cluster_config = rlc.ClusterConfig(
      role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rlc.RLTrainingConfig(actor_optimizer=optimizer, eval_every_n_steps=10**9,
                                           max_steps=args.steps),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=args.new_tokens, max_prompt_length=prompt_len,
          kv_cache_size=prompt_len + args.new_tokens + 1, temperature=1.0, top_p=1.0, top_k=None,
          eos_tokens=[hf_tokenizer.eos_token_id]))
  cluster = rlc.RLCluster(
      actor=llama_params.create_model_from_safe_tensors(args.checkpoint, model_config, mesh),
      reference=llama_params.create_model_from_safe_tensors(args.checkpoint, model_config, mesh),
      tokenizer=Tokenizer(), cluster_config=cluster_config)
  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, algo_config=grpo_learner.GRPOConfig(num_generations=args.num_generations, beta=args.beta),
      reward_fns=lambda prompts, completions, **_: reward(prompts, completions))
  update_ends = []
  update_actor = cluster.update_actor

  def timed_update_actor(*args, **kwargs):
    update_actor(*args, **kwargs)
    update_ends.append(time.perf_counter())

  cluster.update_actor = timed_update_actor
  learner.train({"prompts": np.array(prompts)} for _ in range(args.steps))  # Arrays: Tunix np.repeats leaves.
  # Rollouts of the next batch overlap the current update, so a step is the interval between two updates' ends;
  # the first interval may still include compilation.
  return dict(peer="tunix", step_seconds=np.diff(update_ends).tolist(), warmup_steps=1,
              version=importlib.metadata.version("google-tunix"),
              backend=f"jax {jax.__version__}, {jax.devices()[0].device_kind}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peer", choices=("trl", "tunix"), required=True)
  parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory (weights and tokenizer)")
  parser.add_argument("--prompts", required=True, help="text file, one prompt a line")
  parser.add_argument("--batch", type=int, required=True, help="prompts per step")
  parser.add_argument("--num_generations", type=int, default=3, help="samples per prompt")
  parser.add_argument("--new_tokens", type=int, required=True, help="max completion length")
  parser.add_argument("--steps", type=int, required=True, help="optimizer steps (the first is a warm-up)")
  parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient (> 0: reference forward)")
  args = parser.parse_args()
  with open(args.prompts, encoding="utf-8") as f:
    prompts = f.read().splitlines()
  if len(prompts) != args.batch:
    raise ValueError(f"--prompts holds {len(prompts)} prompts; expected --batch={args.batch}.")
  run = run_trl if args.peer == "trl" else run_tunix
  print(json.dumps(run(args, prompts, load_sentiment_reward())))


if __name__ == "__main__":
  main()
