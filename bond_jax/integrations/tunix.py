"""BOND and J-BOND in Tunix's GRPO learner (`pip install "bond_jax[tunix]"`; google-tunix >= 0.1.7).

Tunix's GRPO-family learner (`tunix.rl.grpo.grpo_learner.GRPOLearner`) samples `num_generations` completions of
each prompt, scores them, and turns the flat rewards into advantages with an *advantage estimator* taken by name
from its registry; a *policy loss*, also taken by name, turns advantages into the update. Importing this module
registers:

- advantage estimators (`GRPOConfig(advantage_estimator=...)`), from `bond_jax.group_estimators`, each sample
  ranked against the other samples of its group, i.e. Best-of-n of the rollout policy as the target:
  `"bond"` (Jeffreys, n = 2, β = 0.5, tie-aware), `"jbond"` (J-BOND, the paper's penalty, β = 0.5),
  `"jbond_tie_aware"`; `register_advantage_estimator` registers other settings under a name of your own;
- the policy loss `"bond"` (`GRPOConfig(policy_loss_fn="bond")`): the exact score-function surrogate
  `-mean_i A_i · ρ_i` with the sequence-level ratio `ρ_i = π_θ(y_i) / π_old(y_i)` (1 at the first update of a
  batch, where its gradient is `-mean_i A_i ∇ log π_θ(y_i)`, the token log-probs summed per sequence), plus
  `beta · KL(π_θ || π_reference)` estimated by the score function (`losses.score_function_loss`, leave-one-out
  within each group), which Tunix's own per-token KL term is not. Tunix's `GRPOConfig.beta` is that coefficient:
  J-BOND's γ when the reference is the EMA anchor.

What the registry cannot give, `BondLearner` (a `GRPOLearner`) adds: the EMA anchor of J-BOND. After each global
step it moves Tunix's reference model towards the actor, `θ_ref <- (1 - η) θ_ref + η θ` (`anchor.ema_update`),
so the reference becomes J-BOND's moving anchor and `beta` weighs `KL(π || π_anchor)` (docs/method.md,
'J-BOND'). It needs a reference model of its own (not sharing weights with the actor).

Not done: drawing the Best-of-n targets from the EMA anchor rather than from the rollout policy. Tunix's learner
generates only with the actor's weights and builds every batch as `prompts x num_generations` rows of one
rollout, so anchor samples would need a second rollout with swapped weights and a batch layout of its own. The
estimators here target Best-of-n of the rollout policy instead (iterative BOND whose anchor is the policy itself;
`bond_jax.group_estimators` says exactly which gradient they follow).

Example (a runnable version: examples/tunix_bond.py):

    from bond_jax.integrations import tunix as bond_tunix
    from tunix.rl.grpo import grpo_learner

    config = grpo_learner.GRPOConfig(num_generations=4, advantage_estimator="jbond", policy_loss_fn="bond",
                                     beta=0.0)
    learner = bond_tunix.BondLearner(rl_cluster=cluster, algo_config=config, reward_fns=reward_fn, anchor_eta=0.02)
    learner.train(dataset)
"""

from collections.abc import Callable
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

try:
  from tunix.rl import algo_core  # pylint: disable=unused-import  (registers Tunix's own losses first)
  from tunix.rl import common
  from tunix.rl import function_registry
  from tunix.rl import rl_cluster as rlc
  from tunix.rl.grpo import grpo_learner
except ImportError as error:
  raise ImportError(f"bond_jax.integrations.tunix needs google-tunix: pip install \"bond_jax[tunix]\" ({error})"
                    ) from error

from bond_jax import anchor
from bond_jax import arguments
from bond_jax import group_estimators
from bond_jax import kl
from bond_jax import losses

POLICY_LOSS = "bond"


def register_advantage_estimator(name: str, estimator: Callable = group_estimators.bond_group_advantages,
                                 **hyperparameters) -> Callable:
  """Registers `estimator(rewards, group_size=num_generations, **hyperparameters)` in Tunix's registry as `name`.

  Args:
    name: the name to give `GRPOConfig(advantage_estimator=name)`.
    estimator: `group_estimators.bond_group_advantages` or `group_estimators.jbond_group_advantages`.
    **hyperparameters: its keyword arguments (`n`, `beta`, `reward_form`, ...), checked now on a dummy group.

  Returns:
    The registered function `(rewards, num_generations) -> advantages`, flat numpy float32 arrays.

  Example:
    >>> from bond_jax import group_estimators
    >>> fn = register_advantage_estimator("bond_n4", group_estimators.bond_group_advantages, n=4, beta=0.5)
    >>> fn(rewards=np.array([0., 1., 2., 3., 4., 9., 8., 7., 6., 5.]), num_generations=5).shape
    (10,)
  """
  fn = functools.partial(estimator, **hyperparameters)

  def advantage_estimator(rewards, num_generations: int) -> np.ndarray:
    return np.asarray(fn(jnp.asarray(rewards, jnp.float32), group_size=num_generations))

  function_registry.register_advantage_estimator(name)(advantage_estimator)
  return advantage_estimator


def policy_loss(model: nnx.Module, train_example, algo_config, pad_id: int, eos_id: int, **kwargs):
  """Tunix policy loss `"bond"`: the score-function surrogate of the advantages, plus `beta` times the KL.

  Args:
    model: the actor (Flax NNX).
    train_example: Tunix's `TrainExample` (prompt and completion ids and masks, `advantages` `[rows]`,
      `old_per_token_logps` and `ref_per_token_logps` `[rows, time]` or None).
    algo_config: the `GRPOConfig`; reads `num_generations`, `beta`, `temperature`.
    pad_id: the tokenizer's pad id.
    eos_id: the tokenizer's end-of-sequence id.
    **kwargs: ignored (Tunix passes extra context).

  Returns:
    `(loss, aux)`: scalar loss and Tunix's metrics (`kl`, `pg_clipfrac` (always 0: nothing is clipped),
    `pg_loss`, `bond/sequence_ratio_max`).

  Raises:
    ValueError: packed sequences (per-token advantages).
  """
  del kwargs
  if train_example.advantages.ndim != 1:
    raise ValueError("the 'bond' policy loss needs one advantage per sequence: turn off Tunix's sequence packing "
                     "(max_seq_token_per_tpu=None).")
  graphdef, state = nnx.split(model)
  per_token = common.compute_per_token_logps(
      graphdef, state, prompt_tokens=train_example.prompt_ids, completion_tokens=train_example.completion_ids,
      pad_id=pad_id, eos_id=eos_id, stop_gradient=False, temperature=getattr(algo_config, "temperature", 1.0))
  token_mask = train_example.completion_mask.astype(bool)
  group = algo_config.num_generations
  as_groups = lambda x: x.reshape(-1, group, *x.shape[1:])
  log_probs = jnp.sum(jnp.where(token_mask, per_token.astype(jnp.float32), 0.0), axis=-1)
  if train_example.old_per_token_logps is None:
    old_log_probs = jax.lax.stop_gradient(log_probs)
  else:
    old_log_probs = jnp.sum(jnp.where(token_mask, train_example.old_per_token_logps, 0.0), axis=-1)
  ratio = jnp.exp(log_probs - old_log_probs)
  pg_loss = -jnp.mean(train_example.advantages.astype(jnp.float32) * ratio)
  loss, kl_value = pg_loss, jnp.float32(0.0)
  if train_example.ref_per_token_logps is not None:
    ref_log_probs = jnp.sum(jnp.where(token_mask, train_example.ref_per_token_logps, 0.0), axis=-1)
    costs = kl.kl_k1(log_probs, ref_log_probs)
    kl_value = jnp.mean(costs)
    loss = loss + algo_config.beta * losses.score_function_loss(as_groups(log_probs), as_groups(costs))
  aux = {"kl": kl_value, "pg_clipfrac": jnp.float32(0.0), "pg_loss": pg_loss,
         "bond/sequence_ratio_max": jnp.max(jax.lax.stop_gradient(ratio))}
  return loss, aux


function_registry.register_policy_loss_fn(POLICY_LOSS)(policy_loss)
register_advantage_estimator("bond", group_estimators.bond_group_advantages, n=2, beta=0.5)
register_advantage_estimator("jbond", group_estimators.jbond_group_advantages, beta=0.5)
register_advantage_estimator("jbond_tie_aware", group_estimators.jbond_group_advantages, beta=0.5,
                             reward_form="tie_aware")


class BondLearner(grpo_learner.GRPOLearner):
  """Tunix's `GRPOLearner` whose reference model is J-BOND's EMA anchor of the actor.

  After every global step (one batch of rollouts and its updates), the reference model's parameters move towards
  the actor's by `anchor.ema_update(reference, actor, anchor_eta)`. With `GRPOConfig(beta=γ)` and the `"bond"`
  policy loss, the update then carries J-BOND's `γ · KL(π || π_anchor)`; with `beta=0`, Tunix computes no
  reference log-probs and the anchor only moves.

  Args:
    rl_cluster: Tunix's `RLCluster`, with a `reference` model that does not share the actor's weights.
    algo_config: a `GRPOConfig`.
    reward_fns: Tunix reward functions.
    anchor_eta: EMA rate in `(0, 1]` (0.02 in the paper; 1 copies the actor every step).
    **kwargs: the rest of `GRPOLearner`'s arguments.

  Raises:
    ValueError: a bad `anchor_eta`, or a cluster without a reference model of its own.
  """

  def __init__(self, *args, anchor_eta: float = 0.02, **kwargs):
    arguments.check_real(anchor_eta, "anchor_eta", 0.0, 1.0, traced=False)
    if anchor_eta == 0:
      raise ValueError("`anchor_eta` must be in (0, 1], got 0.")
    super().__init__(*args, **kwargs)
    worker = self.rl_cluster.inference_worker
    if "reference" not in worker._models or rlc.Role.REFERENCE in self.rl_cluster._backbone_sharing_map[  # pylint: disable=protected-access
        rlc.Role.ACTOR]:
      raise ValueError("BondLearner moves the reference model as the EMA anchor: give RLCluster a `reference` "
                       "model of its own, not sharing the actor's weights.")
    self.anchor_eta = anchor_eta

  @property
  def anchor(self) -> nnx.Module:
    """The anchor: Tunix's reference model."""
    return self.rl_cluster.inference_worker.get_model("reference")

  def anchor_params(self) -> nnx.State:
    """The anchor's parameters."""
    return nnx.state(self.anchor, nnx.Param)

  def _move_anchor(self) -> None:
    reference = self.anchor
    actor_params = nnx.state(self.rl_cluster.actor_trainer.model, nnx.Param)
    nnx.update(reference, anchor.ema_update(self.anchor_params(), actor_params, self.anchor_eta))
    # Tunix's inference worker computes reference log-probs from a split it keeps; refresh it.
    worker = self.rl_cluster.inference_worker
    worker._model_states["reference"] = nnx.split(reference)  # pylint: disable=protected-access

  def _run_global_step(self, *args, **kwargs) -> None:
    super()._run_global_step(*args, **kwargs)
    self._move_anchor()
