r"""J-BOND at the paper's scale: Gemma 2B policy and a reward model from Hugging Face checkpoints, on a GPU/TPU mesh.

  pip install -e ".[gcs]"
  python experiments/run.py --config=configs/gemma_2b_jbond.py --workdir=gs://bucket/jbond_gemma2b \
      --config.policy.path=gs://bucket/gemma-2b-it --config.reward.path=gs://bucket/reward_model \
      --config.data.path=gs://bucket/prompts.jsonl

Every path may be local or a bucket URI (README, "Workdirs, checkpoints and prompts in a bucket").

Settings from the paper (arXiv 2407.14622 v1, section 5): beta 0.5, eta 0.02, Adam at 3e-6 with 100 warm-up
steps, 128 prompts per batch. Its number of steps and the gamma of the main comparison are not stated; gamma
0.1 is ours. Parameters shard over fsdp (8 devices per host by default), prompts over data x fsdp.

It fits 8 devices of 80 GB: `python benchmarks/memory_at_scale.py --models gemma_2b` compiles its train and
evaluation steps at these shapes (a Gemma-2B reward model) and prints XLA's plan per device and the run's
estimate (benchmarks/RESULTS.md). The settings that make it fit are marked "Fits:".
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
  config.policy.path = ""  # Set on the command line: a Gemma 2B Hugging Face directory, local or in a bucket.
  config.policy.dtype = "bfloat16"  # Fits: bfloat16 compute, the reference held in bfloat16.
  config.reward.kind = "reward_model"
  config.reward.path = ""  # A *ForSequenceClassification checkpoint with one label.
  config.reward.dtype = "bfloat16"  # Fits: the reward model held and run in bfloat16.
  config.data.source = "prompt_file"
  config.data.path = ""  # JSONL with a "prompt" field, or text with one prompt per line.
  config.data.prompt_len = 256
  config.data.chat_template = True  # gemma-2b-it is an instruct model: prompts rendered with its chat template.

  config.sampling.max_new_tokens = 256
  config.memory.remat = "block"  # Fits: the update keeps each layer's input only (the layer runs again backward).
  config.memory.micro_batches = 1
  config.memory.inference_micro_batches = 1
  config.optimizer.learning_rate = 3e-6
  config.optimizer.warmup_steps = 100
  config.jbond.beta = 0.5
  config.jbond.gamma = 0.1
  config.anchor.eta = 0.02
  return config
