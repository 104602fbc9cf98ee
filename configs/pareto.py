r"""The paper's comparison on the default task: reward (quantile) against KL(π || π_ref) along training.

  for s in 0 1 2; do for m in jbond bond_beta0 bond_beta05 bond_beta1 reinforce_0.01 reinforce_0.1 reinforce_0.5; do
    python experiments/run.py --config=configs/pareto.py:$m --workdir=/tmp/pareto/$m/seed$s --config.seed=$s \
      --config.eval_every=100
  done; done
  python experiments/run.py --config=configs/pareto.py:bon --workdir=/tmp/pareto/bon/seed0
  python experiments/plot.py --workdir=/tmp/pareto --out=docs

Methods (the config argument), all on the default task (shipped review LM, sentiment reward), evaluated every 50
steps (the README's table: every 100) on the same 160 held-out prompts:
- `jbond`: J-BOND, β = 0.5, EMA anchor η = 0.02, γ = 0 (the paper's practical algorithm);
- `bond_beta0`, `bond_beta05`, `bond_beta1`: BOND distilling Best-of-8 of the reference (fixed anchor, k = 16
  reference samples for the quantile, 2 policy samples), Jeffreys β = 0, 0.5, 1;
- `reinforce_<c>`: REINFORCE on the raw reward, 2 samples and a leave-one-out baseline, KL(π || π_ref) coefficient
  c (any positive number, e.g. `reinforce_0.01`);
- `bon`: no training to speak of (one step): its final evaluation draws 2 x 64 reference samples per held-out
  prompt and reports the empirical Best-of-N reward and quantile for N = 1, 2, 4, ..., 64.

Sized for a 2-core CPU: 200 steps of 16 prompts per run.
"""

from bond_jax import run_config

BOND_BETAS = {"bond_beta0": 0.0, "bond_beta05": 0.5, "bond_beta1": 1.0}
METHODS = ("jbond", *BOND_BETAS, "reinforce_<kl_coef>", "bon")


def get_config(method: str = "jbond"):
  config = run_config.base_config()
  config.num_steps = 200
  config.eval_every = 50  # The default evaluation: 160 held-out prompts, 16 policy and 32 reference samples each.
  config.checkpoint_every = config.num_steps
  config.eval.bon_ns = (1, 2, 4, 8, 16)

  if method == "jbond":
    config.algorithm = "jbond"
    config.jbond.beta = 0.5
  elif method in BOND_BETAS:
    config.algorithm = "bond"
    config.bond.n = 8
    config.bond.num_anchor_samples = 16
    config.bond.num_policy_samples = 2
    config.bond.beta = BOND_BETAS[method]
    config.anchor.mode = "fixed"
  elif method.startswith("reinforce_"):
    try:
      kl_coef = float(method[len("reinforce_"):])
    except ValueError:
      kl_coef = -1.0
    if kl_coef <= 0:
      raise ValueError(f"configs/pareto.py: {method!r} needs a positive KL coefficient, e.g. 'reinforce_0.1'.")
    config.algorithm = "reinforce"
    config.reinforce.num_samples = 2
    config.reinforce.kl_coef = kl_coef
  elif method == "bon":
    config.num_steps = 1
    config.eval_every = 0
    config.checkpoint_every = 1
    # 128 reference samples per prompt: empirical Best-of-N up to N = 64, to set beside the exact frontier.
    config.eval.num_ref_samples = 128
    config.eval.bon_ns = (1, 2, 4, 8, 16, 32, 64)
  else:
    raise ValueError(f"configs/pareto.py: the method argument must be one of {METHODS}, got {method!r}.")
  return config
