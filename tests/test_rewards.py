"""Rewards: reward model vs the PyTorch classifier, token/text rewards vs direct Python, check_rewards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax import rewards
from bond_jax.models import config as model_config

EOS, PAD = 2, 0


def _batch(vocab):
  """Prompts [3, 5] (full, left-padded, right-padded) and generations [3, 2, 4] ending at EOS (or not)."""
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, vocab, size=(3, 5))
  prompt_mask = np.ones((3, 5), bool)
  prompt_mask[1, :2] = False
  prompt_mask[2, 3:] = False
  tokens = rng.integers(3, vocab, size=(3, 2, 4))
  lengths = np.array([[4, 2], [1, 3], [0, 4]])  # sample (2, 0) generated nothing
  mask = np.arange(4) < lengths[..., None]
  tokens[0, 1, 1] = tokens[1, 1, 2] = EOS  # the last generated token of those samples
  tokens = np.where(mask, tokens, PAD)
  return (jnp.asarray(np.where(prompt_mask, prompts, PAD), jnp.int32), jnp.asarray(prompt_mask),
          jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))


FILLER = 23  # Fills padded and masked-out positions: an ordinary id, so only the masks can tell them apart.


def _pooling_batch(pad):
  """Prompts [3, 4] (full; left-padded ending in pad-id tokens; right-padded, all pad-id tokens) and 4 samples each
  [3, 4, 4]: ending at EOS, ending in pad-id tokens, empty, all pad-id tokens. `pad` None: the classifier declares
  no pad id, the batch then uses 0 for the pad-id cases."""
  p = 0 if pad is None else pad
  prompts = np.array([[1, 5, 9, 13], [FILLER, 1, 6, p], [p, p, FILLER, FILLER]])
  prompt_mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]], bool)
  samples = np.array([[7, 11, EOS, FILLER], [7, p, p, FILLER], [FILLER] * 4, [p] * 4])
  sample_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  tokens, mask = np.broadcast_to(samples, (3, 4, 4)), np.broadcast_to(sample_mask, (3, 4, 4))
  return prompts, prompt_mask, tokens, mask


@pytest.fixture(scope="module", params=[EOS, PAD, None], ids=["pad_is_eos", "pad_is_not_eos", "no_pad"])
def reward_checkpoint(request, tmp_path_factory):
  """(PyTorch classifier, our params and config) of a tiny Llama reward model declaring pad id `param`."""
  pytest.importorskip("torch")
  import hf_reference
  from bond_jax.models import hf

  model = hf_reference.hf_model("llama", "score", pad_token_id=request.param)
  path = tmp_path_factory.mktemp("reward_model")
  model.save_pretrained(path)
  params, config = hf.load_checkpoint(path)
  # The checkpoint's declared pad id, None included (a loader that falls back to the EOS id would read EOS).
  return model, params, dataclasses.replace(config, pad_token_id=request.param)


def test_reward_model_pools_as_the_pytorch_classifier(reward_checkpoint):
  import torch

  model, params, config = reward_checkpoint
  prompts, prompt_mask, tokens, mask = _pooling_batch(config.pad_token_id)
  reward_fn = rewards.reward_model(params, config)
  score = jax.jit(lambda fn, *batch: fn(*batch))
  # Passed through jit as an argument, the weights are traced inputs, not constants of the program.
  lowered = score.lower(reward_fn, prompts, prompt_mask, tokens, mask)
  assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(params)) + 4
  got = np.asarray(score(reward_fn, prompts, prompt_mask, tokens, mask))

  # Oracle: transformers' classifier on each prompt + generation alone, real tokens only (no padding, batch 1).
  with torch.no_grad():
    want = [[float(model(input_ids=torch.tensor(np.concatenate([prompts[b][prompt_mask[b]],
                                                                 tokens[b, s][mask[b, s]]])[None])).logits[0, 0])
             for s in range(4)] for b in range(3)]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.std(want) > 0.1  # distinct scores, so a mis-pooled position would show


def test_reward_model_needs_a_scalar_score_head():
  with pytest.raises(ValueError, match="head='score' and num_labels=1"):
    rewards.reward_model({}, model_config.tiny())
  with pytest.raises(ValueError, match="num_labels=3"):
    rewards.reward_model({}, model_config.tiny(head="score", num_labels=3))


def test_token_reward_matches_python():
  prompts, prompt_mask, tokens, mask = _batch(32)

  def fn(p, pm, g, gm):  # generated 7s minus a tenth of the prompt's real length, plus the first prompt token
    return jnp.sum((g % 7 == 0) & gm, axis=-1) - 0.1 * pm.sum(-1) + p[:, 0]

  got = jax.jit(rewards.token_reward(fn))(prompts, prompt_mask, tokens, mask)
  p, pm, t, m = map(np.asarray, (prompts, prompt_mask, tokens, mask))
  want = [[sum(int(x % 7 == 0) for x, keep in zip(t[b, s], m[b, s]) if keep) - 0.1 * pm[b].sum() + p[b, 0]
           for s in range(2)] for b in range(3)]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.array(want, np.float32), rtol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(29)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
  return fast, words


def test_text_reward_matches_python(tokenizer):
  fast, words = tokenizer
  prompts, prompt_mask, tokens, mask = _batch(len(words))
  # A real, non-pad token hidden behind the mask must not reach fn.
  tokens = tokens.at[2, 1, 3].set(5).at[2, 1, 2].set(5)
  mask = mask.at[2, 1, 3].set(False)

  def fn(prompt_texts, generations):
    return [len(p.split()) + 10 * g.split().count("w2") + 100 * ("[EOS]" in g)
            for p, g in zip(prompt_texts, generations)]

  got = jax.jit(rewards.text_reward(fn, fast))(prompts, prompt_mask, tokens, mask)
  p, pm, t, m = map(np.asarray, (prompts, prompt_mask, tokens, mask))
  want = [[pm[b].sum() + 10 * sum(words[x] == "w2" for x, keep in zip(t[b, s], m[b, s]) if keep)
           for s in range(2)] for b in range(3)]
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, np.array(want, np.float32))
  assert np.asarray(got)[2, 1] >= 10  # the masked-out w2 was dropped, the masked-in one counted


def test_text_reward_rejects_wrong_number_of_values(tokenizer):
  fast, words = tokenizer
  bad = rewards.text_reward(lambda ps, gs: [0.0], fast)
  message = r"returned values of shape \(1,\); expected one per generation, \(6,\)"
  with pytest.raises(rewards.RewardError, match=message):  # Outside jit the host function runs directly.
    bad(*_batch(len(words)))
  with pytest.raises(jax.errors.JaxRuntimeError, match=message):
    jax.block_until_ready(jax.jit(bad)(*_batch(len(words))))


def test_check_rewards():
  good = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(rewards.check_rewards(jnp.asarray(good), 3, 2), good)
  with pytest.raises(ValueError, match=r"shape \(3, 2\); expected \(batch, samples\) = \(2, 3\)"):
    rewards.check_rewards(good, 2, 3)
  with pytest.raises(ValueError, match="dtype float64; expected float32"):
    rewards.check_rewards(good.astype(np.float64), 3, 2)
  bad = good.copy()
  bad[2, 1], bad[1, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"not finite at batch indices \[1, 2\]"):
    rewards.check_rewards(bad, 3, 2)


def test_text_reward_reads_real_tokens_by_their_mask_whatever_their_id():
  from bond_jax.data import id_tokenizer

  seen = {}

  def record(prompts, generations):
    seen.update(prompts=prompts, generations=generations)
    return [g.split().count("0") for g in generations]

  # IdTokenizer: 0 is an ordinary token and also the pad id; FILLER marks padding, which the masks tell.
  prompts, prompt_mask = jnp.array([[FILLER, 0, 3, 0]]), jnp.array([[False, True, True, True]])
  tokens = jnp.array([[[0, 0, 7, 0], [0, FILLER, FILLER, FILLER]]])
  mask = jnp.array([[[True, True, True, True], [True, False, False, False]]])
  got = jax.jit(rewards.text_reward(record, id_tokenizer.IdTokenizer(32)))(prompts, prompt_mask, tokens, mask)
  assert seen == {"prompts": ["0 3 0", "0 3 0"], "generations": ["0 0 7 0", "0"]}
  np.testing.assert_array_equal(got, [[3, 1]])


# Reward models with a tokenizer of their own.

RESPONSES = (" great movie", " bad.", "")  # what each policy sample says, as text


@pytest.fixture(scope="module")
def cross_tokenizer_dirs(tmp_path_factory):
  """{"rm": a reward model on the character tokenizer (no tokenizer in its directory), "chat"/"plain": that
  tokenizer with and without a chat template, "policy_chat": the shipped tokenizer with a template}."""
  pytest.importorskip("torch")
  from bond_jax.tasks import instruct_example
  import hf_reference

  root = tmp_path_factory.mktemp("cross_tokenizer")
  dirs = {"chat": instruct_example.character_tokenizer(str(root / "chat")),
          "plain": instruct_example.character_tokenizer(str(root / "plain"), chat_template=None),
          "policy_chat": instruct_example.shipped_tokenizer(str(root / "policy_chat")),
          "rm": str(root / "rm")}
  vocab = len(instruct_example.CHARACTER_SPECIALS) + 95
  model = hf_reference.hf_model("llama", "score", vocab_size=vocab, max_position_embeddings=128)
  model.save_pretrained(dirs["rm"])
  return dirs, model


def _reward_config(rm_dir, tokenizer_dir="", max_len=0):
  from bond_jax import run_config
  config = run_config.base_config()
  config.reward.kind, config.reward.path, config.reward.tokenizer_path = "reward_model", rm_dir, tokenizer_dir
  config.reward.max_len = max_len
  return config


def _policy_batch(policy, prompts):
  """Prompts encoded by the policy's PromptTokenizer, and samples [len(prompts), 3] saying `RESPONSES` (the first
  ending at EOS), right-padded with FILLER."""
  from bond_jax.data import prompt_batches
  batch = next(prompt_batches.PromptIterator(prompts, policy, batch_size=len(prompts), prompt_len=32,
                                             shuffle=False))
  rows = [policy.tokenizer.encode(r, add_special_tokens=False) for r in RESPONSES]
  rows[0].append(policy.eos_token_id)
  time = max(map(len, rows))
  tokens = np.array([r + [FILLER] * (time - len(r)) for r in rows])
  mask = np.arange(time) < np.array([len(r) for r in rows])[:, None]
  repeat = lambda x: np.broadcast_to(x, (len(prompts),) + x.shape)  # noqa: E731
  return batch["prompts"], batch["prompt_mask"], repeat(tokens), repeat(mask)


@pytest.mark.parametrize("policy_template, reward_template", [(False, True), (True, True), (False, False)],
                         ids=["text_prompts", "conversations", "no_templates"])
def test_reward_model_with_its_own_tokenizer_scores_the_conversation_the_policy_saw(
    cross_tokenizer_dirs, policy_template, reward_template):
  import torch
  from bond_jax import run_components
  from bond_jax.data import prompt_encoding
  from bond_jax.models import hf
  from bond_jax.tasks import default_assets

  dirs, model = cross_tokenizer_dirs
  if policy_template:
    policy = prompt_encoding.PromptTokenizer(hf.load_tokenizer(dirs["policy_chat"]), chat_template=True)
    prompts = [[{"role": "system", "content": "Be honest."}, {"role": "user", "content": "The movie was"}],
               [{"role": "user", "content": "The room"}]]
  else:
    policy = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
    prompts = ["The movie was", "The room"]
  tokenizer_dir = dirs["chat" if reward_template else "plain"]
  reward_fn = run_components.load_reward(_reward_config(dirs["rm"], tokenizer_dir, max_len=96), policy)
  got = jax.jit(lambda fn, *batch: fn(*batch))(reward_fn, *_policy_batch(policy, prompts))

  # Oracle: the reward model's own tokenizer on each conversation (or text) and response, then its PyTorch forward.
  rm_tokenizer = hf.load_tokenizer(tokenizer_dir)

  def ids(prompt, response):
    if reward_template:
      turns = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
      return rm_tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                              tokenize=True, return_dict=False)
    return rm_tokenizer(prompt + response)["input_ids"]

  with torch.no_grad():
    want = [[float(model(input_ids=torch.tensor([ids(p, r)])).logits[0, 0]) for r in RESPONSES] for p in prompts]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.std(want) > 0.1


def test_reward_model_with_the_policys_tokenizer_reads_its_ids_on_the_device(cross_tokenizer_dirs, tmp_path):
  from bond_jax.tasks import instruct_example
  from bond_jax import run_components
  from bond_jax.data import prompt_encoding
  from bond_jax.tasks import default_assets

  dirs, _ = cross_tokenizer_dirs
  same = instruct_example.shipped_tokenizer(str(tmp_path), chat_template=None)
  policy = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
  batch = _policy_batch(policy, ["The room"])
  jaxpr = str(jax.make_jaxpr(run_components.load_reward(_reward_config(dirs["rm"], same), policy))(*batch))
  assert "callback" not in jaxpr
  jaxpr = str(jax.make_jaxpr(run_components.load_reward(_reward_config(dirs["rm"], dirs["plain"]), policy))(*batch))
  assert "callback" in jaxpr


def test_reward_model_tokenizer_faults_are_named(cross_tokenizer_dirs):
  from bond_jax import run_components
  from bond_jax import run_config
  from bond_jax.data import prompt_encoding
  from bond_jax.models import hf
  from bond_jax.tasks import default_assets

  dirs, _ = cross_tokenizer_dirs
  policy = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
  with pytest.raises(run_config.ConfigError,
                     match=r"config.reward.path = '.*rm' is not allowed: it holds no tokenizer"):
    run_components.load_reward(_reward_config(dirs["rm"]), policy)
  chat_policy = prompt_encoding.PromptTokenizer(hf.load_tokenizer(dirs["policy_chat"]), chat_template=True)
  with pytest.raises(run_config.ConfigError, match="has no chat template to render the conversations"):
    run_components.load_reward(_reward_config(dirs["rm"], dirs["plain"]), chat_policy)
  with pytest.raises(run_config.ConfigError, match="config.reward.max_len = 200 is not allowed"):
    run_components.load_reward(_reward_config(dirs["rm"], dirs["plain"], max_len=200), policy)



def test_reward_model_reads_the_last_max_len_tokens_of_a_longer_conversation(cross_tokenizer_dirs):
  import torch
  from bond_jax import run_components
  from bond_jax.data import prompt_encoding
  from bond_jax.models import hf
  from bond_jax.tasks import default_assets

  dirs, model = cross_tokenizer_dirs
  policy = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
  short = run_components.load_reward(_reward_config(dirs["rm"], dirs["plain"], max_len=8), policy)
  got = short(*_policy_batch(policy, ["The movie was"]))
  ids = [hf.load_tokenizer(dirs["plain"])("The movie was" + r)["input_ids"][-8:] for r in RESPONSES]
  with torch.no_grad():
    want = [float(model(input_ids=torch.tensor([i])).logits[0, 0]) for i in ids]
  np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)


def test_reward_model_is_read_onto_the_mesh_in_its_compute_dtype(cross_tokenizer_dirs, tmp_path):
  """`config.reward.dtype` bfloat16 with a mesh: every weight is read as bfloat16 straight into the shardings the
  steps take it in (so the trainer's `device_put` moves nothing), and its scores are the float32 model's up to
  bfloat16 rounding."""
  from bond_jax import run_components
  from bond_jax import sharding
  from bond_jax.data import prompt_encoding
  from bond_jax.tasks import default_assets, instruct_example

  dirs, _ = cross_tokenizer_dirs
  same = instruct_example.shipped_tokenizer(str(tmp_path), chat_template=None)
  policy = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
  batch = _policy_batch(policy, ["The room", "The movie was"])
  mesh = sharding.make_mesh((1, 8, 1))
  config = _reward_config(dirs["rm"], same)
  config.reward.dtype = "bfloat16"
  reward_fn = run_components.load_reward(config, policy, mesh)
  for leaf, expected in zip(jax.tree.leaves(reward_fn), jax.tree.leaves(sharding.param_shardings(reward_fn, mesh))):
    assert leaf.dtype == jnp.bfloat16 and leaf.sharding == expected
  score = jax.jit(lambda fn, *batch: fn(*batch))
  expected = score(run_components.load_reward(_reward_config(dirs["rm"], same), policy), *batch)
  np.testing.assert_allclose(score(reward_fn, *batch), expected, atol=0.05 * float(np.abs(expected).max()))
