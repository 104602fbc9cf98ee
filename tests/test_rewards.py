"""Rewards: reward model vs the PyTorch classifier, token/text rewards vs direct Python, check_rewards."""

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


def test_reward_model_matches_pytorch_classifier(tmp_path):
  pytest.importorskip("torch")
  import hf_reference
  from bond_jax.models import hf

  model = hf_reference.hf_model("qwen2", "score")
  model.save_pretrained(tmp_path)
  params, config = hf.load_checkpoint(tmp_path)
  prompts, prompt_mask, tokens, mask = _batch(hf_reference.VOCAB)
  reward_fn = rewards.reward_model(params, config)
  got = reward_fn(prompts, prompt_mask, tokens, mask)
  # Passed through jit as an argument, the weights are traced inputs, not constants of the program.
  score = jax.jit(lambda fn, *batch: fn(*batch))
  lowered = score.lower(reward_fn, prompts, prompt_mask, tokens, mask)
  assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(params)) + 4
  np.testing.assert_allclose(score(reward_fn, prompts, prompt_mask, tokens, mask), got, atol=1e-5, rtol=0)

  # Oracle: each prompt + generation with its pads squeezed out, right-padded, scored by the HF classifier.
  rows = [np.concatenate([np.asarray(prompts[b])[np.asarray(prompt_mask[b])],
                          np.asarray(tokens[b, s])[np.asarray(mask[b, s])]])
          for b in range(3) for s in range(2)]
  width = max(map(len, rows))
  ids = np.stack([np.pad(r, (0, width - len(r)), constant_values=PAD) for r in rows])
  want = hf_reference.hf_outputs(model, ids, ids != PAD)[:, 0].reshape(3, 2)
  assert np.asarray(got).dtype == np.float32
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
