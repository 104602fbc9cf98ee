"""BOND in a trainer of your own: a tiny Flax MLP language model distils Best-of-4 of itself-at-start.

Nothing here comes from bond_jax but the losses and estimators. The model (an MLP over the prompt, the position and
the tokens so far), the sampler, the reward and the optax loop are this script's own. Each step draws 4 policy
samples and 16 reference samples per prompt, ranks the policy samples against the reference samples
(`reward_quantiles`), takes the Best-of-4 of each disjoint group of 4 reference samples (`best_of_n`,
`take_samples`), and minimises the Jeffreys divergence to Best-of-4 of the reference from per-token log-probs
and a token mask. The space is small enough to enumerate (4 prompts, 3 tokens over 4 symbols), so the script
prints the exact `KL(π || π_BoN)` before and after training.

Run: python examples/own_trainer.py   (about 15 seconds on 2 CPU cores, most of it compiling)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import bond_jax

VOCAB, LENGTH, PROMPTS = 4, 3, 4
N, POLICY_SAMPLES, REF_SAMPLES, STEPS = 4, 4, 16, 200


class MLPLanguageModel(nn.Module):
  """Next-token logits from the prompt, the position and the tokens before it."""

  @nn.compact
  def __call__(self, prompts, tokens):  # [batch], [batch, samples, LENGTH] -> [batch, samples, LENGTH, VOCAB]
    before = jnp.tril(jnp.ones((LENGTH, LENGTH)), -1)  # before[t, s] = 1 if s < t
    prefix = jnp.einsum("ts,bnsv->bntsv", before, jax.nn.one_hot(tokens, VOCAB)).reshape(*tokens.shape, -1)
    prompt = jnp.broadcast_to(jax.nn.one_hot(prompts, PROMPTS)[:, None, None], (*tokens.shape, PROMPTS))
    position = jnp.broadcast_to(jnp.eye(LENGTH), (*tokens.shape, LENGTH))
    hidden = nn.gelu(nn.Dense(64)(jnp.concatenate([prompt, position, prefix], axis=-1)))
    return nn.Dense(VOCAB)(nn.gelu(nn.Dense(64)(hidden)))


model = MLPLanguageModel()
prompts = jnp.arange(PROMPTS)


def token_log_probs(params, tokens):
  return bond_jax.token_log_probs(model.apply(params, prompts, tokens), tokens)  # [batch, samples, LENGTH]


def sample(params, key, num_samples):
  tokens = jnp.zeros((PROMPTS, num_samples, LENGTH), jnp.int32)
  for t, step_key in enumerate(jax.random.split(key, LENGTH)):
    logits = model.apply(params, prompts, tokens)[:, :, t]
    tokens = tokens.at[:, :, t].set(jax.random.categorical(step_key, logits))
  return tokens


def reward(tokens):  # How many tokens follow the prompt's pattern (prompt + t) mod VOCAB: ties are common.
  target = (prompts[:, None, None] + jnp.arange(LENGTH)) % VOCAB
  return jnp.sum(tokens == target, axis=-1).astype(jnp.float32)


def exact_kl_to_best_of_n(params, ref_params):
  """KL(π || π_BoN), π_BoN = Best-of-N of π_ref, from every one of the VOCAB**LENGTH generations of each prompt."""
  every = jnp.stack(jnp.meshgrid(*[jnp.arange(VOCAB)] * LENGTH, indexing="ij"), -1).reshape(-1, LENGTH)
  every = jnp.broadcast_to(every, (PROMPTS, *every.shape))
  log_pi, log_ref = (token_log_probs(p, every).sum(-1) for p in (params, ref_params))
  rewards = reward(every)
  below = rewards[:, None, :] < rewards[:, :, None]  # [prompt, y, y']: r(y') < r(y)
  p_lt = jnp.einsum("pyz,pz->py", below, jnp.exp(log_ref))
  p_le = jnp.einsum("pyz,pz->py", below | (rewards[:, None, :] == rewards[:, :, None]), jnp.exp(log_ref))
  log_bon = bond_jax.bon_log_prob(log_ref, p_lt, p_le, N)
  return jnp.mean(jnp.sum(jnp.exp(log_pi) * (log_pi - log_bon), axis=-1))


def train(params, ref_params, key, optimizer):
  def step(carry, key):
    params, opt_state = carry
    policy_key, ref_key = jax.random.split(key)
    tokens, ref_tokens = sample(params, policy_key, POLICY_SAMPLES), sample(ref_params, ref_key, REF_SAMPLES)
    ref_rewards = reward(ref_tokens)
    p_lt, p_le = bond_jax.reward_quantiles(reward(tokens), ref_rewards)
    groups = (PROMPTS, REF_SAMPLES // N, N)  # disjoint groups of N reference samples, one Best-of-N each
    best = bond_jax.take_samples(ref_tokens.reshape(*groups, LENGTH), bond_jax.best_of_n(ref_rewards.reshape(groups)))
    token_mask = jnp.ones(tokens.shape, bool)  # every generation has LENGTH tokens here; padding would be False
    ref_log_probs = token_log_probs(ref_params, tokens)

    def loss_fn(params):
      forward = bond_jax.forward_kl_loss(token_log_probs(params, best), token_mask=token_mask[:, : groups[1]])
      backward = bond_jax.backward_kl_loss(token_log_probs(params, tokens), ref_log_probs, p_lt, p_le, N,
                                           floor=bond_jax.quantile_floor(REF_SAMPLES), token_mask=token_mask)
      return bond_jax.jeffreys_loss(forward, backward, beta=0.5)[0]

    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, STEPS))
  return params


def main():
  """Trains the policy; prints and returns the exact KL to Best-of-N before and after, with both parameter sets."""
  init_key, train_key = jax.random.split(jax.random.key(0))
  ref_params = model.init(init_key, prompts, jnp.zeros((PROMPTS, 1, LENGTH), jnp.int32))
  optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, STEPS))
  params = jax.jit(train, static_argnums=3)(ref_params, ref_params, train_key, optimizer)
  before, after = (float(jax.jit(exact_kl_to_best_of_n)(p, ref_params)) for p in (ref_params, params))
  print(f"exact KL(pi || pi_BoN), N = {N}: {before:.4f} nats before training, {after:.4f} after {STEPS} steps")
  return before, after, params, ref_params


if __name__ == "__main__":
  main()
