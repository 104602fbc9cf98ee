r"""Verifiable rewards: addition checked right/wrong, from a reference LM that is right about a third of the time.

  for s in 0 1 2; do for m in jbond_tie_aware jbond_paper reinforce; do
    python experiments/run.py --config=configs/verifiable.py:$m --workdir=/tmp/verifiable/$m/seed$s --config.seed=$s
  done; done

(under a minute each on 2 CPU cores), then the plot of pass rate against KL(π || π_ref), with exact Best-of-N of
the reference:

  python experiments/plot_verifiable.py --workdir=/tmp/verifiable --seeds=0,1,2

The task (`bond_jax/tasks/arithmetic.py`): prompts "a+b=" with a, b <= 29 (10% held out for evaluation), reward 1
for the exact sum and 0 otherwise, so most samples tie. The reference is the shipped tiny LM in
`bond_jax/assets/arithmetic/policy` (`python experiments/pretrain.py --task=arithmetic ...`). Methods (the config
argument): `jbond_tie_aware` (J-BOND with `jbond.reward_form = "tie_aware"`), `jbond_paper` (the paper's J-BOND
reward) and `reinforce` (raw reward, leave-one-out baseline over 2 samples, KL to the reference).
"""

from bond_jax import run_config
from bond_jax.tasks import arithmetic

METHODS = ("jbond_tie_aware", "jbond_paper", "reinforce")


def get_config(method: str = "jbond_tie_aware"):
  if method not in METHODS:
    raise ValueError(f"configs/verifiable.py: the method argument must be one of {METHODS}, got {method!r}.")
  config = run_config.base_config()
  config.algorithm = "reinforce" if method == "reinforce" else "jbond"
  config.num_steps = 400
  config.batch_size = 32
  config.log_every = 10
  config.eval_every = 25
  config.eval_batches = 3  # 96 held-out prompts per evaluation, about all of them.
  config.checkpoint_every = 400

  config.policy.source = "hf_checkpoint"
  config.policy.path = arithmetic.POLICY_DIR
  config.reward.kind = "python"
  config.reward.function = "bond_jax.tasks.arithmetic:check"
  config.data.source = "prompt_file"
  config.data.path = arithmetic.PROMPTS_PATH
  config.data.prompt_len = 8  # <bos> + "29+29=" fits.
  config.sampling.max_new_tokens = 3  # Up to two digits and <eos>.

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.jbond.reward_form = "penalty" if method == "jbond_paper" else "tie_aware"
  config.jbond.beta = 0.5
  config.anchor.eta = 0.02
  config.reinforce.kl_coef = 0.05
  config.eval.num_ref_samples = 32
  config.eval.bon_ns = (2, 4, 8, 16)
  return config
