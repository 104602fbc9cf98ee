r"""J-BOND with LoRA on Llama-3-8B: rank-64 adapters on a frozen bfloat16 base shared by the policy, the EMA anchor
and the reference, 8 devices per host over fsdp, batch 128 (docs/method.md, "LoRA").

  python experiments/run.py --config=configs/llama3_8b_lora.py --workdir=/ckpt/jbond_llama3_8b_lora \
      --config.policy.path=/ckpt/Meta-Llama-3-8B-Instruct --config.reward.path=/ckpt/reward_model \
      --config.data.path=/data/prompts.jsonl

Memory (`python benchmarks/lora_step.py --part fit`, figures in benchmarks/RESULTS.md, "LoRA"): the trained state
is the adapters (168M parameters: with the anchor's adapter and AdamW's moments 2.5 GiB in all, where a full
fine-tune's policy, anchor and moments take 120 GiB), and one bfloat16 copy of the base (`base_in_compute_dtype`,
15 GiB) serves the policy, the anchor and the reference. The mesh shards over `fsdp` (ZeRO): each step also holds
merged copies of the adapted kernels for the policy and the anchor, the layer-stacked copies its passes make of
three models' kernels, and the policy's full-size kernel gradient (17.9 GiB per device over fsdp = 8 as the
estimate counts them, with the merge's float32 results; data parallel would replicate them and cannot fit 80 GB).
It fits 8 x 80 GB at batch 128 with the settings marked "Fits" below: `python benchmarks/memory_at_scale.py
--models llama3_8b_lora` compiles its train and evaluation steps from shapes alone; XLA plans 56.8 and 45.7 GiB per
device (the evaluation's with the anchor and optimizer state it leaves on the devices; the full fine-tune of
configs/llama3_8b_jbond.py: 73.9). The run's estimate, 59.4 GiB at the evaluation's sampling, bounds both (1.05x
the larger; benchmarks/RESULTS.md, "Memory estimate per step").

Settings from the paper where it has them (arXiv 2407.14622, section 5: beta 0.5, eta 0.02, 128 prompts per batch,
100 warm-up steps); ours: LoRA's rank 64, alpha 128 and a learning rate of 5e-5 (adapters take a larger rate than
the paper's full fine-tune at 3e-6), gamma 0.1, and 256-token prompts and generations.
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
  config.mesh_shape = (-1, 8, 1)  # The base, the merged kernels and the adapters over fsdp: see the docstring.

  config.policy.source = "hf_checkpoint"
  config.policy.path = ""  # Set on the command line: a local Llama-3-8B(-Instruct) Hugging Face directory.
  config.policy.dtype = "bfloat16"
  config.policy.pad_token = "<|finetune_right_pad_id|>"  # Llama 3's tokenizer has no pad token of its own.
  config.policy.lora.rank = 64
  config.policy.lora.alpha = 128.0
  config.policy.lora.base_in_compute_dtype = True
  config.reward.kind = "reward_model"
  config.reward.path = ""  # A *ForSequenceClassification checkpoint with one label.
  config.reward.dtype = "bfloat16"  # Fits: the reward model held and run in bfloat16.
  config.data.source = "prompt_file"
  config.data.path = ""  # JSONL with a "prompt" field, or text with one prompt per line.
  config.data.prompt_len = 256

  config.sampling.max_new_tokens = 256
  config.optimizer.learning_rate = 5e-5
  config.optimizer.warmup_steps = 100
  config.jbond.beta = 0.5
  config.jbond.gamma = 0.1
  config.anchor.eta = 0.02
  config.memory.remat = "block"  # Fits: the update keeps each layer's input only (the layer runs again backward).
  config.memory.micro_batches = 4  # Fits: the update's activations for 4 of each device's 16 prompts at a time.
  config.memory.inference_micro_batches = 16  # Fits: sampling and evaluation one prompt per device at a time.
  return config
