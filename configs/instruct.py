r"""J-BOND on an instruct checkpoint: prompts as conversations through the policy's chat template, every stop id the
checkpoint declares, and a reward model with a tokenizer (and template) of its own.

With the tiny random stand-ins the test suite builds (`bond_jax/tasks/instruct_example.py`), on CPU in a minute:

  python experiments/make_tiny_instruct.py --out=/tmp/tiny_instruct
  python experiments/run.py --config=configs/instruct.py --workdir=/tmp/instruct \
      --config.policy.path=/tmp/tiny_instruct/policy --config.reward.path=/tmp/tiny_instruct/reward_model \
      --config.data.path=/tmp/tiny_instruct/prompts.jsonl

With your own: a local instruct checkpoint (e.g. Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct with
`--config.policy.pad_token="<|finetune_right_pad_id|>"`), a `*ForSequenceClassification` reward model with its
tokenizer in its directory (or `--config.reward.tokenizer_path`), and a JSONL file whose lines hold `messages`
(role/content turns) or `prompt` text; set `--config.mesh_shape`, lengths and batch for your devices
(README, "Bring your own checkpoint").
"""

from bond_jax import run_config


def get_config():
  config = run_config.base_config()
  config.algorithm = "jbond"
  config.num_steps = 20
  config.batch_size = 8
  config.log_every = 5
  config.eval_every = 0
  config.eval_batches = 1
  config.checkpoint_every = 10

  config.policy.source = "hf_checkpoint"
  config.policy.path = ""  # An instruct (chat) causal LM directory.
  config.reward.kind = "reward_model"
  config.reward.path = ""  # A sequence classifier; its own tokenizer (and chat template) in its directory.
  config.reward.max_len = 160  # The reward model's tokens per conversation after re-tokenizing.
  config.data.source = "prompt_file"
  config.data.path = ""  # JSONL: {"messages": [{"role": "user", "content": ...}, ...]} or {"prompt": ...}.
  config.data.chat_template = True  # Render prompts with the policy's chat template and its generation prompt.
  config.data.prompt_len = 32
  config.data.overlong = "reject"  # Truncating a rendered conversation would cut its template's header.
  config.sampling.max_new_tokens = 16

  config.eval.num_ref_samples = 8
  config.eval.bon_ns = (2, 4)
  return config
