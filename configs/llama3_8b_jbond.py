r"""J-BOND on Llama-3-8B-Instruct with a reward model of the same size, batch 128, on 8 devices of 80 GB.

  python experiments/run.py --config=configs/llama3_8b_jbond.py --workdir=gs://bucket/jbond_llama3_8b \
      --config.policy.path=/ckpt/Meta-Llama-3-8B-Instruct --config.reward.path=/ckpt/llama3_8b_reward_model \
      --config.data.path=/data/prompts.jsonl

The paper's J-BOND settings (as `configs/gemma_2b_jbond.py`: beta 0.5, eta 0.02, Adam at 3e-6 with 100 warm-up
steps, 128 prompts per batch, 256 prompt and 256 new tokens) on the 8B Llama: the policy, its EMA anchor, the
reference, an 8B reward model and AdamW's state. Prompts are rendered with the chat template.

It fits 8 devices of 80 GB: `python benchmarks/memory_at_scale.py --models llama3_8b` compiles its train and
evaluation steps at these shapes and prints XLA's plan per device and the run's estimate (benchmarks/RESULTS.md).
The settings that make it fit are marked "Fits:"; with them the run's own estimate
(`memory_estimate.estimate_train_memory`, an upper bound on XLA's plan) is 76.9 GiB per device at the train step,
of which 31.7 GiB are two models' decoding weights gathered whole in bfloat16 and a reward model's.
"""

from bond_jax import run_config


def get_config():
  config = run_config.base_config()
  config.algorithm = "jbond"
  config.num_steps = 5000
  config.batch_size = 128
  config.log_every = 10
  config.eval_every = 250
  config.eval_batches = 2
  config.checkpoint_every = 250
  config.mesh_shape = (-1, 8, 1)  # Fits: ZeRO-3 over 8 devices (each holds 1/8 of every weight and state).

  config.policy.source = "hf_checkpoint"
  config.policy.path = ""  # Set on the command line: a local Llama-3-8B(-Instruct) Hugging Face directory.
  config.policy.dtype = "bfloat16"  # Fits: bfloat16 compute, the reference held in bfloat16.
  config.policy.pad_token = "<|end_of_text|>"  # Llama 3's tokenizer has no pad token.
  config.reward.kind = "reward_model"
  config.reward.path = ""  # A *ForSequenceClassification checkpoint with one label (an 8B reward model).
  config.reward.dtype = "bfloat16"  # Fits: the reward model held and run in bfloat16.
  config.data.source = "prompt_file"
  config.data.path = ""  # JSONL with a "prompt" (or "messages") field, or text with one prompt per line.
  config.data.prompt_len = 256
  config.data.chat_template = True

  config.sampling.max_new_tokens = 256
  config.memory.remat = "block"  # Fits: the update keeps each layer's input only (the layer runs again backward).
  config.memory.micro_batches = 4  # Fits: the update's activations for 4 of each device's 16 prompts at a time.
  config.memory.inference_micro_batches = 16  # Fits: sampling and evaluation (32 reference samples per prompt) one
  # prompt per device at a time: the KV cache of 32 x 511 tokens is 2 GiB.
  config.optimizer.learning_rate = 3e-6
  config.optimizer.warmup_steps = 100
  config.jbond.beta = 0.5
  config.jbond.gamma = 0.1
  config.anchor.eta = 0.02
  return config
