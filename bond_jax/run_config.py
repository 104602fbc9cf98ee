"""The experiment config: every field, its default and its meaning, and its validation.

Each `configs/*.py` starts from `base_config()` and overrides what it needs; `validate(config)` checks every
field before anything is compiled and raises `ConfigError` with a message naming the field, the value and what
is allowed.

Example:
  >>> config = base_config()
  >>> config.algorithm = "bond"
  >>> validate(config)
"""

from collections.abc import Callable
import re
from typing import Any

import ml_collections

from bond_jax import algorithms
from bond_jax import anchor
from bond_jax import data
from bond_jax import lora
from bond_jax import sharding
from bond_jax.data import prompt_batches
from bond_jax.models.config import REMAT_POLICIES

REWARD_KINDS = ("default", "reward_model", "python", "python_tokens")
USER_REWARD_KINDS = ("python", "python_tokens")  # The user's own code: checked on real prompts before compiling.
POLICY_SOURCES = ("default", "hf_checkpoint", "init")


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field, the value and what is allowed."""


def base_config() -> ml_collections.ConfigDict:
  """Returns the full config with defaults: the embedded default J-BOND run on CPU."""
  c = ml_collections.ConfigDict()
  # A registered `algorithms.Algorithm`: "jbond" | "bond" (general N) | "reinforce" (the paper's baseline). Its
  # hyperparameters are the group of the same name below (`algorithms.JBond`, `Bond`, `Reinforce` say what each is).
  c.algorithm = "jbond"
  c.seed = 0  # Seeds init, data order and sampling.
  c.num_steps = 400  # Optimizer steps (the default task: 400 ends within 0.02 of the Best-of-N frontier; README).
  c.batch_size = 16  # Prompts per step, across all hosts; divisible by the mesh's data x fsdp size.
  c.log_every = 10  # Steps between metric lines (JSONL, TensorBoard, console).
  c.eval_every = 100  # Steps between evaluations on held-out prompts (0: only at the end).
  c.eval_batches = 10  # Held-out batches per evaluation (the default task holds out 167 prompts: 160 are used).
  c.checkpoint_every = 100  # Steps between checkpoints (and one at the end).
  c.keep_checkpoints = 3  # How many recent checkpoints orbax keeps.
  c.max_consecutive_nonfinite = 5  # Non-finite losses in a row before the run stops.
  c.memory_limit_gib = 0.0  # Per-device memory the run may use, in GiB; 0: the device's own limit (host RAM / local
  # devices on CPU). A run whose estimate (`memory_estimate`) exceeds it stops before compiling.

  # Mesh: axis sizes in the order of `mesh_axes`; one -1 takes the remaining devices.
  c.mesh_shape = (-1, 1, 1)
  c.mesh_axes = ("data", "fsdp", "tensor")

  c.policy = ml_collections.ConfigDict()
  c.policy.source = "default"  # "default" (shipped tiny LM) | "hf_checkpoint" (local HF dir) | "init" (random).
  c.policy.path = ""  # Hugging Face checkpoint directory (local or gs://...), for source "hf_checkpoint".
  c.policy.tokenizer_path = ""  # Tokenizer directory; empty: the policy's directory (or the shipped one).
  c.policy.dtype = "float32"  # Compute dtype: "float32" | "bfloat16". The policy, the anchor and the optimizer
  # state stay float32; the frozen reference is held in the compute dtype (which changes none of its outputs).
  c.policy.pad_token = ""  # A token of the tokenizer to pad prompts with, for tokenizers without a pad token (Llama
  # 3: e.g. "<|finetune_right_pad_id|>" or its EOS token); empty: the tokenizer's own pad token.
  # Source "init": a randomly initialised transformer of this shape (seeded by `seed`), without EOS, and (unless
  # tokenizer_path is set) `id_tokenizer.IdTokenizer`, which reads and writes token ids as text.
  # LoRA (`bond_jax.lora`; docs/method.md, "LoRA"): with rank > 0 the optimizer trains low-rank adapters on a frozen
  # base that the policy, the anchor (base + the EMA of the adapters) and the reference share, not every parameter.
  c.policy.lora = ml_collections.ConfigDict()
  c.policy.lora.rank = 0  # Adapter rank r; 0: full fine-tune.
  c.policy.lora.alpha = 16.0  # Each adapted kernel is W + (alpha / rank) · A @ B.
  c.policy.lora.dropout = 0.0  # Only 0 (see run_config._FIELD_RULES); written to the peft adapter_config.json.
  c.policy.lora.targets = lora.DEFAULT_TARGETS  # Regexes searched in kernel paths ("layer_3/attn/q/kernel"); the
  # default: attention q/k/v/o and MLP gate/up/down of every layer.
  c.policy.lora.init_path = ""  # A peft LoRA adapter directory to start from (e.g. a run's workdir/adapter); empty:
  # A random, B = 0, so the policy starts as the base.
  c.policy.lora.reference = "base"  # The reference: "base" (alone) | "start" (the base with the starting adapter);
  # what KL(pi || pi_ref), REINFORCE's penalty and evaluation's Best-of-N compare against (docs/method.md, "LoRA").
  c.policy.lora.base_in_compute_dtype = False  # Hold the frozen base's matrices in policy.dtype (bfloat16: half the
  # memory) rather than float32; adapters and their optimizer state stay float32.
  c.policy.model = ml_collections.ConfigDict()
  c.policy.model.vocab_size = 8
  c.policy.model.num_layers = 2
  c.policy.model.d_model = 32
  c.policy.model.num_heads = 4
  c.policy.model.num_kv_heads = 4
  c.policy.model.head_dim = 8
  c.policy.model.mlp_dim = 64
  c.policy.model.max_seq_len = 32

  c.reward = ml_collections.ConfigDict()
  c.reward.kind = "default"  # "default" (shipped sentiment score) | "reward_model" (HF seq-cls dir) | "python" |
  # "python_tokens".
  c.reward.path = ""  # Reward model checkpoint directory (kind "reward_model").
  c.reward.dtype = "float32"  # The reward model's compute dtype, which its weights are held in: "float32" |
  # "bfloat16" (half the memory; its scores then round as a bfloat16 model's do).
  c.reward.tokenizer_path = ""  # The reward model's tokenizer directory; empty: `path`. A tokenizer other than the
  # policy's (vocabulary, BOS/EOS, chat template) has prompts and generations re-tokenized for the reward model.
  c.reward.max_len = 0  # Reward-model tokens per re-tokenized prompt + generation; 0: twice prompt_len +
  # max_new_tokens (at most the reward model's context).
  c.reward.function = ""  # "module:function": texts (prompts, generations) -> rewards (kind "python"), or token ids
  # (prompts [n, P], prompt_mask, generations [n, T], generation_mask) -> [n], jittable (kind "python_tokens").

  c.data = ml_collections.ConfigDict()
  c.data.source = "default"  # "default" (shipped prompts, via TFDS) | "prompt_file" (JSONL/text) | "tfds" |
  # "inline" (`data.prompts`, used for training and evaluation alike).
  c.data.prompts = ()  # Prompt texts for "inline".
  c.data.path = ""  # Prompt file for "prompt_file".
  c.data.tfds_name = ""  # Registered TFDS dataset for "tfds", e.g. "xsum".
  c.data.data_dir = ""  # TFDS data_dir (prepared offline; in a bucket: copied locally); empty: inside the workdir.
  c.data.text_key = "prompt"  # Feature (TFDS) or JSON key holding the prompt text.
  c.data.prompt_len = 16  # Prompt tokens; longer prompts are handled by `overlong`.
  c.data.overlong = "truncate"  # "truncate" (keep the last prompt_len tokens) | "reject" (skip, counted).
  c.data.chat_template = False  # Render prompts with the tokenizer's chat template (with the generation prompt):
  # conversations ("messages" lines of a JSONL prompt file) and texts (as one user turn).

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 24  # Generated tokens per sample.
  # Sampling temperature of every sample (training and evaluation). Every log-probability the losses and KL
  # estimates use is the tempered one, of the policy, the anchor and the reference alike: the methods train and
  # measure the tempered policy (docs/method.md, "Which distributions the estimates refer to").
  c.sampling.temperature = 1.0
  # Truncations, refused by the shipped methods (different supports per model make their KL terms infinite).
  c.sampling.top_k = 0  # 0: off.
  c.sampling.top_p = 1.0  # 1.0: off.

  # Memory at scale: what each pass keeps and how much of the batch it runs at once. None changes what a step
  # computes (up to float rounding); each trades time for memory. `memory_estimate` accounts for all of them.
  c.memory = ml_collections.ConfigDict()
  c.memory.remat = "none"  # What the update's backward pass keeps of each layer: "none" (everything), "block" (its
  # input only: the layer runs again) | "matmuls" (the outputs of its weight matmuls).
  c.memory.micro_batches = 1  # The update's gradient accumulated over this many parts of the prompts, one at a time
  # (one optimizer update per step; the loss, its baseline and metrics over the whole batch). It costs one more
  # forward pass. Must divide the prompts per device, batch_size / (data x fsdp).
  c.memory.inference_micro_batches = 1  # Parts of the prompts that sampling, rewards, the anchor's and the
  # reference's log-probabilities and evaluation run one after the other. Must divide the prompts per device of both
  # the train step and the evaluation (batch_size and eval.batch_size over data x fsdp).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4  # Peak AdamW learning rate (the paper: 3e-6 at Gemma scale).
  c.optimizer.warmup_steps = 10  # Linear warm-up steps (the paper: 100).
  c.optimizer.decay_steps = 0  # Cosine decay to 0 over this many steps after warm-up (0: constant after warm-up).
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.grad_clip = 1.0  # Global-norm clipping; 0 disables it.

  # How the anchor of "jbond" and "bond" moves after each step (`anchor.AnchorSchedule`).
  c.anchor = ml_collections.ConfigDict()
  c.anchor.mode = "ema"  # "ema" | "fixed" (stays at the reference: distil BoN of the reference) | "periodic".
  c.anchor.eta = 0.02  # EMA rate: anchor <- (1-eta) anchor + eta policy.
  c.anchor.period = 100  # Steps between copies of the policy, for mode "periodic".

  # One group per registered algorithm, its hyperparameters with their defaults.
  for name in algorithms.names():
    c[name] = algorithms.config_defaults(algorithms.get(name))

  # Evaluation on held-out prompts (`evaluation`): `eval_batches` x `eval_batch_size(config)` prompts.
  c.eval = ml_collections.ConfigDict()
  # Held-out prompts per evaluation batch; 0: batch_size. Lets runs of any batch size be measured on the same
  # prompts (e.g. 10 x 16 of the default task's 167), and a large batch on a small held-out split.
  c.eval.batch_size = 0
  # Policy samples per held-out prompt (reward, quantile, KL(π || π_ref)). On the default task 16 samples of 160
  # prompts give standard errors of about 0.003 (quantile) and 0.05 nats (KL at 4.5 nats), most of the KL's from
  # the samples.
  c.eval.num_policy_samples = 16
  # Reference samples per held-out prompt: the pool that ranks every sample (quantiles), estimates the reward
  # distribution (Best-of-N's exact KL and the frontier) and, in disjoint groups of N, gives the Best-of-N samples.
  c.eval.num_ref_samples = 32
  c.eval.bon_ns = (2, 4, 8, 16)  # Best-of-N sizes reported (each <= num_ref_samples / 2).

  c.exact = ml_collections.ConfigDict()
  # Steps between exact KLs over every generation (0: off), on the distinct prompts of the first held-out batch
  # (`eval_batch_size(config)` prompts; `exact_evaluation`). Needs an enumerable space: no stop token,
  # vocab_size ** max_new_tokens <= 65536.
  c.exact.every = 0
  c.exact.bon_ns = ()  # Best-of-N sizes of the reference with their own exact KLs (e.g. 2, 4, 8, 16 for iterative).

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "host:port"; empty: single process, or JAX's environment detection.
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """Held-out prompts per evaluation batch: `config.eval.batch_size`, or `config.batch_size` where that is 0.

  Example:
    >>> config = base_config()
    >>> config.batch_size = 128
    >>> eval_batch_size(config), config.eval_batches   # one evaluation: 10 batches of 128 prompts
    (128, 10)
    >>> config.eval.batch_size = 16
    >>> eval_batch_size(config)   # ... or 10 of 16, the default's held-out prompts
    16
  """
  return config.eval.batch_size or config.batch_size


def _allowed(choices: tuple[str, ...]) -> Callable[[Any], bool]:
  return lambda v: v in choices


def _positive(v) -> bool:
  return v > 0


def _non_negative(v) -> bool:
  return v >= 0


def _unit_interval(v) -> bool:
  return 0 <= v <= 1


# field -> (test, what is allowed)
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_steps": (_positive, "a positive integer"),
    "batch_size": (_positive, "a positive integer"),
    "log_every": (_positive, "a positive integer"),
    "eval_every": (_non_negative, "a non-negative integer (0: evaluate only at the end)"),
    "eval_batches": (_positive, "a positive integer"),
    "eval.batch_size": (_non_negative, "a non-negative integer (0: batch_size)"),
    "checkpoint_every": (_positive, "a positive integer"),
    "keep_checkpoints": (_positive, "a positive integer"),
    "max_consecutive_nonfinite": (_positive, "a positive integer"),
    "memory_limit_gib": (_non_negative, "a non-negative number (0: the device's own limit)"),
    "policy.source": (_allowed(POLICY_SOURCES), f"one of {POLICY_SOURCES}"),
    "policy.dtype": (_allowed(("float32", "bfloat16")), "'float32' or 'bfloat16'"),
    "policy.lora.rank": (_non_negative, "a non-negative integer (0: full fine-tune)"),
    "policy.lora.alpha": (_positive, "a positive number"),
    # Merged adapters have no input of their own to drop out, and a policy scored with dropout would not be the one
    # that drew the samples its score-function estimates need.
    "policy.lora.dropout": (lambda v: v == 0, "0.0 (adapters are merged into the kernels, and the score-function "
                            "estimates need the sampling policy itself)"),
    "policy.lora.targets": (lambda v: bool(v) and all(_is_regex(p) for p in v), "a non-empty sequence of regexes"),
    "policy.lora.reference": (_allowed(lora.REFERENCES), f"one of {lora.REFERENCES}"),
    **{f"policy.model.{name}": (_positive, "a positive integer") for name in (
        "vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len")},
    "reward.kind": (_allowed(REWARD_KINDS), f"one of {REWARD_KINDS}"),
    "reward.max_len": (_non_negative, "a non-negative integer (0: twice prompt_len + max_new_tokens)"),
    "reward.dtype": (_allowed(("float32", "bfloat16")), "'float32' or 'bfloat16'"),
    "memory.remat": (_allowed(REMAT_POLICIES), f"one of {REMAT_POLICIES}"),
    "memory.micro_batches": (_positive, "a positive integer"),
    "memory.inference_micro_batches": (_positive, "a positive integer"),
    "data.source": (_allowed(data.SOURCES), f"one of {data.SOURCES}"),
    "data.prompt_len": (_positive, "a positive integer"),
    "data.overlong": (_allowed(prompt_batches.OVERLONG_POLICIES), f"one of {prompt_batches.OVERLONG_POLICIES}"),
    "sampling.max_new_tokens": (_positive, "a positive integer"),
    "sampling.temperature": (_positive, "a positive number"),
    "sampling.top_k": (_non_negative, "a non-negative integer (0: off)"),
    "sampling.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "optimizer.learning_rate": (_positive, "a positive number"),
    "optimizer.warmup_steps": (_non_negative, "a non-negative integer"),
    "optimizer.decay_steps": (_non_negative, "a non-negative integer (0: constant learning rate)"),
    "optimizer.weight_decay": (_non_negative, "a non-negative number"),
    "optimizer.b1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.b2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.grad_clip": (_non_negative, "a non-negative number (0: off)"),
    "anchor.mode": (_allowed(anchor.ANCHOR_MODES), f"one of {anchor.ANCHOR_MODES}"),
    "anchor.eta": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "anchor.period": (_positive, "a positive integer"),
    "eval.num_policy_samples": (_positive, "a positive integer"),
    "eval.num_ref_samples": (lambda v: v >= 2, "an integer >= 2"),
    "exact.every": (_non_negative, "a non-negative integer (0: off)"),
    "exact.bon_ns": (lambda v: all(isinstance(n, int) and n >= 1 for n in v), "a sequence of integers >= 1"),
    "distributed.num_processes": (_positive, "a positive integer"),
    "distributed.process_id": (_non_negative, "a non-negative integer"),
}


def _is_regex(pattern: str) -> bool:
  try:
    re.compile(pattern)
  except re.error:
    return False
  return True


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field} = {value!r} is not allowed: expected {allowed}.")


def _check_against_schema(config, schema, prefix=""):
  """Unknown fields and wrong types, against `base_config()`."""
  for key, value in config.items():
    field = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"config.{field} is not a known field; known fields here: {sorted(schema.keys())}.")
    expected = schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(field, value, "a group of fields")
      _check_against_schema(value, expected, field + ".")
    elif isinstance(expected, bool) != isinstance(value, bool):
      _fail(field, value, f"a {type(expected).__name__}")
    elif isinstance(expected, (int, float)) and not isinstance(value, (int, float)):
      _fail(field, value, "a number")
    elif isinstance(expected, int) and not isinstance(expected, bool) and not isinstance(value, int):
      _fail(field, value, "an integer")  # 10.0 would pass the value rules and break range() and shapes later.
    elif isinstance(expected, str) and not isinstance(value, str):
      _fail(field, value, "a string")
    elif isinstance(expected, tuple) and not isinstance(value, (tuple, list)):
      _fail(field, value, "a sequence")
    elif isinstance(expected, tuple) and expected and not all(type(v) is type(expected[0]) for v in value):
      _fail(field, value, f"a sequence of {type(expected[0]).__name__}s")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every field and their combinations; raises `ConfigError` naming the first bad field.

  Args:
    config: a config made from `base_config()`.
    num_devices: devices available (all hosts); when given, the mesh is checked against it.
  """
  _check_against_schema(config, base_config())
  if config.algorithm not in algorithms.names():
    _fail("algorithm", config.algorithm, f"a registered algorithm, one of {algorithms.names()}")
  if config.algorithm not in config:
    _fail("algorithm", config.algorithm, f"an algorithm whose group config.{config.algorithm} the config has (make "
          "the config with run_config.base_config() after registering the algorithm)")
  # Groups of algorithms registered after the config was made are not in it.
  rules = _FIELD_RULES | {f"{name}.{field}": rule for name in algorithms.names() if name in config
                          for field, rule in algorithms.get(name).field_rules.items()}
  for field, (ok, allowed) in rules.items():
    value = _get(config, field)
    if not ok(value):
      _fail(field, value, allowed)

  if len(config.mesh_shape) != len(config.mesh_axes):
    _fail("mesh_shape", tuple(config.mesh_shape), f"one size per axis of mesh_axes {tuple(config.mesh_axes)}")
  try:
    mesh_shape = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)
  except ValueError as e:
    _fail("mesh_shape", tuple(config.mesh_shape), str(e))
  for axis in sharding.AXIS_NAMES:
    if axis not in config.mesh_axes:
      _fail("mesh_axes", tuple(config.mesh_axes), f"axes including {sharding.AXIS_NAMES}")

  algorithm = algorithms.from_config(config)
  for field, allowed in algorithm.problems():
    _fail(f"{algorithm.name}.{field}", config[algorithm.name][field], allowed)
  if not algorithm.supports_truncated_sampling:
    for field, off in (("top_k", 0), ("top_p", 1.0)):
      if config.sampling[field] != off:
        _fail(f"sampling.{field}", config.sampling[field],
              f"{off} (off) for algorithm {algorithm.name!r}: it scores each sample under the policy, the anchor and "
              "the reference, and truncating each to its own top tokens gives them different supports, so its KL "
              "terms would be infinite; sample with config.sampling.temperature instead")
  if (not config.eval.bon_ns or 2 * max(config.eval.bon_ns) > config.eval.num_ref_samples
      or min(config.eval.bon_ns) < 1):
    _fail("eval.bon_ns", tuple(config.eval.bon_ns),
          f"sizes between 1 and eval.num_ref_samples / 2 = {config.eval.num_ref_samples / 2:g} (each Best-of-N "
          "sample is ranked against the reference samples outside its group)")
  if config.policy.source == "hf_checkpoint" and not config.policy.path:
    _fail("policy.path", config.policy.path, "a checkpoint directory when policy.source is 'hf_checkpoint'")
  if config.policy.lora.reference == "start" and not config.policy.lora.init_path:
    _fail("policy.lora.reference", config.policy.lora.reference,
          "'base' when policy.lora.init_path is empty (there is no starting adapter)")
  if config.reward.kind == "reward_model" and not config.reward.path:
    _fail("reward.path", config.reward.path, "a local checkpoint directory when reward.kind is 'reward_model'")
  if config.reward.kind in USER_REWARD_KINDS and ":" not in config.reward.function:
    _fail("reward.function", config.reward.function,
          f"'module:function' when reward.kind is {config.reward.kind!r}")
  if config.data.source == "prompt_file" and not config.data.path:
    _fail("data.path", config.data.path, "a JSONL or text file when data.source is 'prompt_file'")
  if config.data.source == "inline" and not config.data.prompts:
    _fail("data.prompts", tuple(config.data.prompts), "at least one prompt when data.source is 'inline'")
  if config.data.source == "tfds" and not config.data.tfds_name:
    _fail("data.tfds_name", config.data.tfds_name, "a registered TFDS name when data.source is 'tfds'")

  if num_devices is None:
    return
  sizes = dict(zip(config.mesh_axes, mesh_shape))
  data_parallel = sizes["data"] * sizes["fsdp"]
  # The train step's prompts are split into update and inference micro-batches, the evaluation's into inference ones.
  batches = {"batch_size": (config.batch_size, ("micro_batches", "inference_micro_batches")),
             "eval.batch_size": (eval_batch_size(config), ("inference_micro_batches",))}
  for name, (prompts, micro_batch_fields) in batches.items():
    if prompts % data_parallel:
      _fail(name, _get(config, name),
            f"a multiple of the mesh's data x fsdp size ({data_parallel}) so prompts shard evenly")
    per_device = prompts // data_parallel
    for field in micro_batch_fields:
      if per_device % config.memory[field]:
        _fail(f"memory.{field}", config.memory[field],
              f"a divisor of the prompts per device, {name} / (data x fsdp) = {per_device}, so that every "
              "micro-batch spans every device")
