"""Builds what a run config names: the reference policy, its tokenizer, the reward and the prompt iterators.

Example:
  >>> import tempfile
  >>> from bond_jax import run_config
  >>> config = run_config.base_config()   # the shipped policy and sentiment reward
  >>> config.data.source, config.data.prompts, config.batch_size = "inline", ("The plot was", "The room"), 2
  >>> ref_params, model_config, tokenizer = load_policy(config)
  >>> reward_fn = load_reward(config, tokenizer)
  >>> train_prompts, eval_prompts = load_prompts(config, tokenizer, model_config, tempfile.mkdtemp())
  >>> batch = next(eval_prompts)
  >>> batch["text"]
  ['The plot was', 'The room']
  >>> generations = jnp.asarray(tokenizer.tokenizer([" great.", " dirty."], add_special_tokens=False)["input_ids"])
  >>> reward_fn(batch["prompts"], batch["prompt_mask"], generations[:, None], jnp.ones((2, 1, 2), bool)) > 0
  Array([[ True],
         [False]], dtype=bool)
"""

import dataclasses
import functools
import importlib
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from bond_jax import paths
from bond_jax import rewards
from bond_jax import run_config
from bond_jax import sharding
from bond_jax.data import id_tokenizer
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_encoding
from bond_jax.data import prompt_sources
from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.tasks import default_assets
from bond_jax.tasks import sentiment

DEFAULT_POLICY_DIR = os.path.join(default_assets.ASSETS_DIR, "policy")


def load_policy(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
  """(reference params, model config, tokenizer) of `config.policy`; the policy starts as the reference.

  A checkpoint directory may be local or on an object store (`paths`). With `mesh`, the parameters are created or
  read straight onto the mesh, sharded by `sharding.param_shardings`, each process reading only its share of a
  checkpoint's bytes (`hf.load_checkpoint`); without, onto the default device. The tokenizer is a
  `prompt_encoding.PromptTokenizer`: the policy's tokenizer with `config.policy.pad_token` as its pad token if set,
  rendering prompts with its chat template if `config.data.chat_template`.
  """
  policy = config.policy
  if policy.source == "init":
    model_config = ModelConfig(**policy.model.to_dict(), dtype=policy.dtype, remat=config.memory.remat)
    init = functools.partial(transformer.init_params, model_config)
    key = jax.random.PRNGKey(config.seed)
    shardings = None if mesh is None else sharding.param_shardings(jax.eval_shape(init, key), mesh)
    params = jax.jit(init, out_shardings=shardings)(key)
    tokenizer = (hf.load_tokenizer(policy.tokenizer_path) if policy.tokenizer_path
                 else id_tokenizer.IdTokenizer(model_config.vocab_size))
    return params, model_config, _prompt_tokenizer(config, tokenizer)
  path = DEFAULT_POLICY_DIR if policy.source == "default" else policy.path
  if not paths.as_path(path).is_dir():
    raise FileNotFoundError(
        f"config.policy: no checkpoint directory at {path!r}"
        + (" (run `python experiments/pretrain.py` to make the shipped one)" if policy.source == "default" else ""))
  # Parameters stay float32 (the optimizer's updates are far below bfloat16's resolution); `dtype` is the compute's.
  params, model_config = hf.load_checkpoint(path, mesh=mesh)
  model_config = dataclasses.replace(model_config, dtype=policy.dtype, remat=config.memory.remat)
  if model_config.head != "lm":
    raise run_config.ConfigError(
        f"config.policy.path = {path!r} is not allowed: it holds a {model_config.head!r}-head model; a policy needs "
        "'lm' (a *ForCausalLM checkpoint).")
  if policy.tokenizer_path:
    tokenizer = hf.load_tokenizer(policy.tokenizer_path)
  elif policy.source == "default":
    tokenizer = default_assets.load_tokenizer()
  else:
    tokenizer = hf.load_tokenizer(path)
  return params, model_config, _prompt_tokenizer(config, tokenizer)


def _prompt_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> prompt_encoding.PromptTokenizer:
  if config.policy.pad_token:
    tokenizer = prompt_encoding.with_pad_token(tokenizer, config.policy.pad_token, field="config.policy.pad_token")
  return prompt_encoding.PromptTokenizer(tokenizer, chat_template=config.data.chat_template)


# A directory holding any of these holds a tokenizer `transformers.AutoTokenizer` can try to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_reward_tokenizer(config: ml_collections.ConfigDict):
  """The reward model's tokenizer: from `config.reward.tokenizer_path`, else from `config.reward.path`.

  Raises:
    run_config.ConfigError: naming `config.reward.path` when neither directory holds a tokenizer.
  """
  path = config.reward.tokenizer_path or config.reward.path
  if not any((paths.as_path(path) / name).is_file() for name in TOKENIZER_FILES):
    field = "tokenizer_path" if config.reward.tokenizer_path else "path"
    raise run_config.ConfigError(
        f"config.reward.{field} = {path!r} is not allowed: it holds no tokenizer (none of {TOKENIZER_FILES}), "
        "which the reward model's inputs are read with; set config.reward.tokenizer_path to its tokenizer.")
  return hf.load_tokenizer(path)


def load_reward(config: ml_collections.ConfigDict, tokenizer, mesh: jax.sharding.Mesh | None = None
                ) -> rewards.RewardFn:
  """The `RewardFn` of `config.reward`: the shipped sentiment score, a reward model, or a Python function of
  texts ("python") or of token ids ("python_tokens", see `rewards.token_reward`).

  A reward model reads the policy's ids when its tokenizer (`load_reward_tokenizer`) has the policy's vocabulary
  and BOS/EOS and either no chat template or the one the prompts are rendered with; otherwise each prompt and
  generation is re-tokenized for it (`rewards.retokenized_reward_model`: the prompt as written, its conversation
  with a chat template, and the generation as the assistant's turn).

  Args:
    config: the run config.
    tokenizer: the policy's tokenizer from `load_policy` (the one the prompts are encoded with).
    mesh: where to read a reward model's parameters onto, as `load_policy` does.

  Raises:
    run_config.ConfigError: a reward model directory without a tokenizer, conversations for a reward model
      whose own tokenizer has no chat template, or `config.reward.max_len` longer than its context.
  """
  tokenizer = prompt_encoding.as_prompt_tokenizer(tokenizer)
  kind = config.reward.kind
  if kind == "default":
    return rewards.text_reward(sentiment.sentiment_reward, tokenizer)
  if kind == "reward_model":
    return _load_reward_model(config, tokenizer, mesh)
  module_name, _, function_name = config.reward.function.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), function_name)
  except (ImportError, AttributeError) as e:
    raise run_config.ConfigError(
        f"config.reward.function = {config.reward.function!r} is not allowed: it cannot be imported ({e}).") from e
  if kind == "python_tokens":
    return rewards.token_reward(fn)
  return rewards.text_reward(fn, tokenizer)


def _load_reward_model(config: ml_collections.ConfigDict, policy: prompt_encoding.PromptTokenizer,
                       mesh: jax.sharding.Mesh | None) -> rewards.RewardFn:
  # Frozen: read straight onto the mesh in its compute dtype, which its weights are held in.
  params, model_config = hf.load_checkpoint(config.reward.path, config.reward.dtype, mesh)
  reward_tokenizer = load_reward_tokenizer(config)
  policy_template = policy.tokenizer.chat_template if policy.chat_template else None
  reward_template = getattr(reward_tokenizer, "chat_template", None)
  if (prompt_encoding.same_vocabulary(policy.tokenizer, reward_tokenizer)
      and reward_template in (None, policy_template)):
    return rewards.reward_model(params, model_config)
  if policy.chat_template and not reward_template:
    raise run_config.ConfigError(
        f"config.reward.path = {config.reward.path!r} is not allowed with config.data.chat_template = True: its "
        "tokenizer differs from the policy's and has no chat template to render the conversations with.")
  max_len = config.reward.max_len or min(2 * (config.data.prompt_len + config.sampling.max_new_tokens),
                                         model_config.max_seq_len)
  if max_len > model_config.max_seq_len:
    raise run_config.ConfigError(
        f"config.reward.max_len = {max_len} is not allowed: expected at most the reward model's context, "
        f"{model_config.max_seq_len}.")
  logging.info("The reward model's tokenizer differs from the policy's: prompts and generations are re-tokenized "
               "for it (up to %d tokens).", max_len)
  return rewards.retokenized_reward_model(params, model_config, reward_tokenizer, policy, max_len)


def load_prompts(config: ml_collections.ConfigDict, tokenizer, model_config: ModelConfig, workdir: paths.PathLike,
                 ) -> tuple[prompt_batches.PromptIterator, prompt_batches.PromptIterator]:
  """(train, eval) prompt iterators for this host; eval visits held-out prompts in order, forever ("inline"
  prompts are both: a synthetic task is measured on the prompts it trains on)."""
  data = config.data
  if data.source == "inline":
    train_texts = eval_texts = list(data.prompts)
  else:
    # Process 0 builds the default TFDS dataset first; the others then find it prepared on a shared file system
    # (or build their own copy on a local one) instead of racing to rename the same directory.
    if jax.process_index() != 0:
      multihost_utils.sync_global_devices("bond_jax: prompts prepared by process 0")
    train_texts, eval_texts = prompt_sources.load_prompt_splits(
        data.source, path=data.path, tfds_name=data.tfds_name,
        data_dir=data.data_dir or os.fspath(paths.as_path(workdir) / "tfds"), text_key=data.text_key)
    if jax.process_index() == 0 and jax.process_count() > 1:
      multihost_utils.sync_global_devices("bond_jax: prompts prepared by process 0")
  common = dict(tokenizer=tokenizer, prompt_len=data.prompt_len, overlong=data.overlong,
                process_index=jax.process_index(), process_count=jax.process_count(),
                vocab_size=model_config.vocab_size)
  train = prompt_batches.PromptIterator(train_texts, batch_size=config.batch_size, seed=config.seed, name="train",
                                        **common)
  evaluation = prompt_batches.PromptIterator(eval_texts, batch_size=run_config.eval_batch_size(config),
                                             shuffle=False, name="eval", **common)
  return train, evaluation
