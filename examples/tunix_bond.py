"""J-BOND in Tunix's GRPO learner: a tiny random Llama learns to write the letter "a".

Needs `pip install "bond_jax[tunix]"` (google-tunix). Everything but the block marked "BOND" is the usual Tunix
set-up of a GRPO run (model, tokenizer, cluster, reward); the BOND part is about ten lines: import
`bond_jax.integrations.tunix` (which registers the estimators and the policy loss), name them in the
`GRPOConfig`, and train with `BondLearner`, whose reference model is J-BOND's EMA anchor.

Run: python examples/tunix_bond.py   (about a minute on 2 CPU cores; prints the mean reward of each step)
"""

import string

from flax import nnx
import jax
import numpy as np
import optax
from tunix.models.llama3 import model as llama
from tunix.rl import rl_cluster as rlc
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

from bond_jax.integrations import tunix as bond_tunix  # registers BOND's estimators and policy loss in Tunix

LETTERS = string.ascii_lowercase[:13]  # ids 3..15; 0, 1, 2 are padding, begin and end of sequence
PROMPTS = ["b", "c", "d", "e"]
NUM_GENERATIONS, NEW_TOKENS = 4, 6


class LetterTokenizer:
  """One token per letter (Tunix's tokenizer protocol)."""

  def encode(self, text, **_):
    return [3 + LETTERS.index(c) for c in str(text)]

  def decode(self, ids, **_):
    return "".join(LETTERS[i - 3] for i in ids if i >= 3)

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return 0


def reward(prompts, completions, **_):
  """The fraction of the completion's tokens that are "a"."""
  del prompts
  return [completion.count("a") / NEW_TOKENS for completion in completions]


def tiny_llama(seed: int) -> llama.Llama3:
  config = llama.ModelConfig(num_layers=1, vocab_size=16, embed_dim=32, hidden_dim=64, num_heads=2, head_dim=16,
                             num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6)
  return llama.Llama3(config, rngs=nnx.Rngs(seed))


def make_cluster(steps: int, learning_rate: float = 3e-2) -> rlc.RLCluster:
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  prompt_length = max(len(p) for p in PROMPTS) + 1
  cluster_config = rlc.ClusterConfig(
      role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rlc.RLTrainingConfig(actor_optimizer=optax.adam(learning_rate), eval_every_n_steps=10**9,
                                           max_steps=steps),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=NEW_TOKENS, max_prompt_length=prompt_length,
          kv_cache_size=prompt_length + NEW_TOKENS + 1, temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[2]))
  # The actor and the reference start equal; the reference is a copy of its own, since BondLearner moves it.
  return rlc.RLCluster(actor=tiny_llama(0), reference=tiny_llama(0), tokenizer=LetterTokenizer(),
                       cluster_config=cluster_config)


def make_learner(steps: int, metric_fns=()) -> bond_tunix.BondLearner:
  cluster = make_cluster(steps)
  config = grpo_learner.GRPOConfig(num_generations=NUM_GENERATIONS, advantage_estimator="jbond",
                                   policy_loss_fn="bond", beta=0.1)  # beta: J-BOND's γ, the KL to the anchor
  learner = bond_tunix.BondLearner(rl_cluster=cluster, algo_config=config, reward_fns=reward,
                                   metric_fns=list(metric_fns), anchor_eta=0.02)
  return learner


def main(steps: int = 12):
  def print_reward(rewards, **_):
    print(f"mean reward {np.mean(rewards):.3f}")
    return {}

  learner = make_learner(steps, metric_fns=[print_reward])
  learner.train({"prompts": np.array(PROMPTS)} for _ in range(steps))


if __name__ == "__main__":
  main()
