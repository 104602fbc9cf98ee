"""Sampler: cached log-probs vs the full forward, greedy/top-k/top-p, empirical frequencies, stop ids, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond_jax.models import forward, init_params, positions_from_mask, tiny
from bond_jax.sampling import SamplingConfig, generation_kl, generation_log_probs, sample, to_left_padding

MODEL = tiny(vocab_size=32)  # 4 query heads on 2 kv heads
PAD = 31
# Row 0 left-padded (3 real tokens), row 1 right-padded (5), row 2 right-padded (3), in one [3, 6] batch.
PROMPTS = np.array([[PAD, PAD, PAD, 4, 5, 6], [7, 8, 9, 10, 11, PAD], [12, 13, 14, PAD, PAD, PAD]], np.int32)
PROMPT_MASK = PROMPTS != PAD
STEPS = 6


@pytest.fixture(scope="module")
def params():
  params = init_params(MODEL, jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def row_keys():
  return jax.random.split(jax.random.key(42), len(PROMPTS))


@pytest.fixture(scope="module")
def no_eos(params, row_keys):
  config = SamplingConfig(max_new_tokens=STEPS, num_samples=3, pad_token_id=PAD)
  return sample(params, PROMPTS, PROMPT_MASK, row_keys, config, MODEL)


@pytest.fixture(scope="module")
def with_eos(params, row_keys, no_eos):
  # Two stop ids, so that row 0, sample 0 stops by step 2 and row 2, sample 1 by step 3, each on a different id.
  stop = tuple(dict.fromkeys([int(no_eos.tokens[0, 0, 2]), int(no_eos.tokens[2, 1, 3])]))
  config = SamplingConfig(max_new_tokens=STEPS, num_samples=3, stop_token_ids=stop, pad_token_id=PAD)
  return config, sample(params, PROMPTS, PROMPT_MASK, row_keys, config, MODEL)


def next_token_logits(params, prompts, prompt_mask, tokens):
  """Full-forward logits predicting each of `tokens` `[batch, time]` after its (left-aligned) prompt."""
  prompts, prompt_mask = to_left_padding(jnp.asarray(prompts), jnp.asarray(prompt_mask))
  sequence = jnp.concatenate([prompts, tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones(tokens.shape, bool)], axis=1)
  logits, _ = forward(params, MODEL, sequence, positions_from_mask(mask), mask)
  return logits[:, prompts.shape[1] - 1:-1]


def full_forward_log_probs(params, tokens, mask):
  """The oracle: each sample's prompt + generation as one sequence through one uncached forward, `[b, s, t]`."""
  per_sample = [jax.nn.log_softmax(next_token_logits(params, PROMPTS, PROMPT_MASK, tokens[:, s]), axis=-1)
                for s in range(tokens.shape[1])]
  log_probs = jnp.stack([jnp.take_along_axis(lp, tokens[:, s, :, None], axis=-1)[..., 0]
                         for s, lp in enumerate(per_sample)], axis=1)
  return jnp.where(mask, log_probs, 0.0)


def test_to_left_padding_moves_real_tokens_right():
  tokens, mask = to_left_padding(jnp.asarray(PROMPTS), jnp.asarray(PROMPT_MASK))
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(tokens)[np.asarray(mask)], PROMPTS[PROMPT_MASK])


def test_cached_log_probs_equal_full_forward(params, no_eos, with_eos):
  for out in (no_eos, with_eos[1]):
    assert out.tokens.shape == out.log_probs.shape == out.mask.shape == (3, 3, STEPS)
    full = full_forward_log_probs(params, out.tokens, out.mask)
    np.testing.assert_allclose(out.log_probs, full, rtol=1e-5, atol=1e-5)
    scored = generation_log_probs(params, MODEL, PROMPTS, PROMPT_MASK, out.tokens, out.mask)
    np.testing.assert_allclose(scored, full, rtol=1e-5, atol=1e-5)
  assert np.all(no_eos.mask) and np.all(no_eos.log_probs < 0)


def test_generation_log_probs_gradient_equals_full_forward(params, with_eos):
  """The shared-prompt cache is differentiated too: same gradient as one uncached forward per sample."""
  out = with_eos[1]
  weights = jnp.asarray(np.random.default_rng(0).normal(size=out.tokens.shape), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(weights * generation_log_probs(  # noqa: E731
      p, MODEL, PROMPTS, PROMPT_MASK, out.tokens, out.mask)))(params)
  expected = jax.grad(lambda p: jnp.sum(weights * full_forward_log_probs(p, out.tokens, out.mask)))(params)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-4), grads, expected)
  assert np.abs(grads["embedder"]["embedding"]).max() > 0


def test_samples_differ_and_same_key_repeats(params, row_keys, no_eos):
  tokens = np.asarray(no_eos.tokens)
  assert all(len({tuple(s) for s in row}) == 3 for row in tokens)  # three distinct samples per prompt
  config = SamplingConfig(max_new_tokens=STEPS, num_samples=3, pad_token_id=PAD)
  again = sample(params, PROMPTS, PROMPT_MASK, row_keys, config, MODEL)
  np.testing.assert_array_equal(again.tokens, tokens)
  # A single key is split into the same per-row keys.
  single = sample(params, PROMPTS, PROMPT_MASK, jax.random.key(42), config, MODEL)
  np.testing.assert_array_equal(single.tokens, tokens)


def test_stop_ids_stop_each_sequence(no_eos, with_eos):
  """Same keys with and without stop ids: identical up to the first stop id, then pad / mask False / log-prob 0."""
  config, out = with_eos
  reference = np.asarray(no_eos.tokens)
  is_eos = np.isin(reference, config.stop_token_ids)
  first = np.where(is_eos.any(-1), is_eos.argmax(-1), STEPS)
  expected_mask = np.arange(STEPS) <= first[..., None]
  assert not expected_mask.all() and expected_mask[..., 0].all()
  stopped_on = {int(reference[i][first[i]]) for i in np.ndindex(first.shape) if first[i] < STEPS}
  assert stopped_on == set(config.stop_token_ids) and len(stopped_on) == 2  # sequences stopped on each id
  np.testing.assert_array_equal(out.mask, expected_mask)
  np.testing.assert_array_equal(out.tokens, np.where(expected_mask, reference, PAD))
  np.testing.assert_allclose(out.log_probs, np.where(expected_mask, no_eos.log_probs, 0.0), atol=1e-6)


def test_batch_equals_each_prompt_alone(params, row_keys, with_eos):
  config, out = with_eos
  for b in range(len(PROMPTS)):
    alone = sample(params, PROMPTS[b][PROMPT_MASK[b]][None], np.ones((1, PROMPT_MASK[b].sum()), bool),
                   row_keys[b:b + 1], config, MODEL)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[b])
    np.testing.assert_array_equal(alone.mask[0], out.mask[b])
    np.testing.assert_allclose(alone.log_probs[0], out.log_probs[b], rtol=1e-5, atol=1e-5)


def test_greedy_top_k_1_and_small_top_p_follow_the_argmax(params):
  greedy = sample(params, PROMPTS, PROMPT_MASK, jax.random.key(0),
                  SamplingConfig(max_new_tokens=STEPS, greedy=True), MODEL)
  tokens = greedy.tokens[:, 0]
  np.testing.assert_array_equal(tokens, next_token_logits(params, PROMPTS, PROMPT_MASK, tokens).argmax(-1))
  np.testing.assert_array_equal(greedy.log_probs, 0.0)
  for config in (SamplingConfig(max_new_tokens=STEPS, top_k=1), SamplingConfig(max_new_tokens=STEPS, top_p=1e-3)):
    out = sample(params, PROMPTS, PROMPT_MASK, jax.random.key(1), config, MODEL)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.log_probs, 0.0, atol=1e-6)


def renormalised(logits, temperature, top_k, top_p):
  """Numpy oracle of the sampling distribution: `[vocab]` logits -> `[vocab]` probabilities."""
  z = logits.astype(np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  keep = np.zeros_like(probs, bool)
  mass = 0.0
  for rank, token in enumerate(order):
    if (top_k and rank >= top_k) or mass >= top_p:
      break
    keep[token] = True
    mass += probs[token]
  probs = np.where(keep, probs, 0.0)
  return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 6, 1.0), (1.5, 0, 0.6)])
def test_first_token_frequencies_match_renormalised_distribution(params, temperature, top_k, top_p):
  num = 4000
  config = SamplingConfig(max_new_tokens=1, num_samples=num, temperature=temperature, top_k=top_k, top_p=top_p)
  out = sample(params, PROMPTS[1:2], PROMPT_MASK[1:2], jax.random.key(7), config, MODEL)
  logits = next_token_logits(params, PROMPTS[1:2], PROMPT_MASK[1:2], jnp.zeros((1, 1), jnp.int32))[0, 0]
  probs = renormalised(logits, temperature, top_k, top_p)
  assert 2 < np.count_nonzero(probs) < MODEL.vocab_size  # the truncation is neither trivial nor total
  tokens = np.asarray(out.tokens[0, :, 0])
  freqs = np.bincount(tokens, minlength=MODEL.vocab_size) / num
  np.testing.assert_array_less(np.abs(freqs - probs), 5 * np.sqrt(probs * (1 - probs) / num) + 1e-9)
  np.testing.assert_allclose(out.log_probs[0, :, 0], np.log(probs[tokens]), rtol=1e-4, atol=1e-4)


def test_config_validation():
  for kwargs, field in [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                        (dict(top_k=-1), "top_k"), (dict(num_samples=0), "num_samples")]:
    with pytest.raises(ValueError, match=field):
      SamplingConfig(max_new_tokens=4, **kwargs)
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="stop_token_ids"):
    SamplingConfig(max_new_tokens=4, stop_token_ids=[1, 2])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.4, 0, 1.0), (0.7, 6, 1.0), (1.5, 0, 0.6)])
def test_generation_log_probs_score_the_sampling_distribution(params, temperature, top_k, top_p):
  """Given the sampler's config, the scorer's log-probs are those of the distribution sampled: every first token
  against the numpy oracle (-inf outside the truncation), and whole samples against the sampler's own."""
  config = SamplingConfig(max_new_tokens=STEPS, num_samples=3, temperature=temperature, top_k=top_k, top_p=top_p,
                          pad_token_id=PAD)
  every_token = jnp.arange(MODEL.vocab_size, dtype=jnp.int32)[None, :, None]  # [1, vocab, 1]: one token each
  scored = generation_log_probs(params, MODEL, PROMPTS[1:2], PROMPT_MASK[1:2], every_token,
                                jnp.ones(every_token.shape, bool), config)
  logits = next_token_logits(params, PROMPTS[1:2], PROMPT_MASK[1:2], jnp.zeros((1, 1), jnp.int32))[0, 0]
  with np.errstate(divide="ignore"):
    expected = np.log(renormalised(np.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_allclose(scored[0, :, 0], expected, rtol=1e-4, atol=1e-4)

  out = sample(params, PROMPTS, PROMPT_MASK, jax.random.key(3), config, MODEL)
  np.testing.assert_allclose(generation_log_probs(params, MODEL, PROMPTS, PROMPT_MASK, out.tokens, out.mask, config),
                             out.log_probs, rtol=1e-4, atol=1e-4)


def test_generation_kl_weighted_by_sequence_probabilities_is_the_sequence_kl(params):
  """Chain rule: over every 2-token generation y (enumerated), the expectation under π of `generation_kl` is
  KL(π || π') between the distributions over whole generations."""
  other = jax.tree.map(lambda x: 0.7 * x, params)
  config = SamplingConfig(max_new_tokens=2, temperature=0.8)
  vocab = MODEL.vocab_size
  every = jnp.stack(jnp.meshgrid(jnp.arange(vocab), jnp.arange(vocab), indexing="ij"), -1).reshape(1, -1, 2)
  mask = jnp.ones(every.shape, bool)
  prompts, prompt_mask = PROMPTS[:1], PROMPT_MASK[:1]
  log_p, log_q = (generation_log_probs(p, MODEL, prompts, prompt_mask, every, mask, config).sum(-1)
                  for p in (params, other))
  np.testing.assert_allclose(jnp.exp(log_p).sum(), 1.0, rtol=1e-4)
  sequence_kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q))
  kl = generation_kl(params, other, MODEL, prompts, prompt_mask, every, mask, config)
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_p) * kl), sequence_kl, rtol=1e-4)
  assert float(jnp.std(kl)) > 0.01  # Per sample it varies: the identity holds in expectation, not per sample.
