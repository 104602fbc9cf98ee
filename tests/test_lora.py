"""LoRA (`bond_jax.lora`, `fine_tuning`) against oracles: a fresh adapter (B = 0) is the reference exactly, in logits,
samples and a whole train step; full-rank LoRA BOND reaches the exact Best-of-4 on the enumerable task; the step's
adapter gradient matches finite differences; the anchor's adapter follows the EMA formula (and the periodic and
fixed schedules); exports reload in transformers and peft with our logits; a run's checkpoints hold the adapters only
and refuse another base; the memory estimate counts the step's copies of the adapted kernels."""

import dataclasses
import functools
import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shipped_configs
import tiny_run
from bond_jax import checkpointing
from bond_jax import exact_evaluation
from bond_jax import export
from bond_jax import fine_tuning
from bond_jax import lora
from bond_jax import memory_estimate
from bond_jax import rewards
from bond_jax import run_components
from bond_jax import run_config
from bond_jax import sampling
from bond_jax import sharding
from bond_jax import train_state
from bond_jax import train_step
from bond_jax import trainer
from bond_jax.models import config as config_lib
from bond_jax.models import hf
from bond_jax.models import transformer

EVEN_TOKEN_REWARD = rewards.token_reward(tiny_run.even_token_reward)


def perturbed(adapter, scale: float, seed: int):
  """`adapter` with Gaussian noise of std `scale` on every leaf (so that B is no longer zero)."""
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def lora_config(rank: int = 4, **overrides):
  """A tiny run config (vocabulary 16, 4 new tokens) with LoRA of `rank`; `overrides` as in `tiny_run.tiny_config`."""
  config = run_config.base_config()
  config.sampling.max_new_tokens = 4
  config.policy.lora.rank, config.policy.lora.alpha = rank, 2.0 * rank
  for dotted, value in overrides.items():
    *groups, field = dotted.split(".")
    functools.reduce(lambda node, group: node[group], groups, config)[field] = value
  return config


TINY = config_lib.tiny(vocab_size=16, num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
BATCH = {"prompts": jnp.array([[1, 2, 3], [4, 5, 6]]), "prompt_mask": jnp.array([[True] * 3, [False, True, True]])}


@pytest.fixture(scope="module")
def base():
  return transformer.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def ema_run(base):
  """Three jitted LoRA J-BOND steps on TINY with the token reward and an EMA anchor (eta 0.25): host copies of the
  state before and after each step."""
  config = lora_config(**{"anchor.eta": 0.25})
  frozen, initial, _ = fine_tuning.setup(config, base, TINY)
  optimizer = train_state.make_optimizer(config.optimizer)
  step = jax.jit(train_step.make_train_step(config, TINY, EVEN_TOKEN_REWARD, optimizer))
  states = [train_state.create_train_state(initial, optimizer, config.seed)]
  for _ in range(3):
    states.append(step(states[-1], frozen, BATCH)[0])
  return jax.device_get(states)


def test_a_fresh_adapter_is_the_reference_exactly_in_logits_and_samples(base):
  config = lora_config()
  frozen, initial, _ = fine_tuning.setup(config, base, TINY)
  assert not np.all(initial["layer_0"]["attn"]["q"]["lora_a"] == 0)  # Only B starts at zero.
  policy = fine_tuning.from_config(config).policy(initial, frozen)
  mask = BATCH["prompt_mask"]
  logits = lambda p: transformer.forward(p, TINY, BATCH["prompts"], transformer.positions_from_mask(mask),  # noqa
                                         mask)[0]
  np.testing.assert_array_equal(logits(policy), logits(base))
  sample_config = sampling.make_sampling_config(config.sampling, TINY, 3)
  draw = jax.jit(lambda p: sampling.sample(p, BATCH["prompts"], mask, jax.random.key(5), sample_config, TINY))
  for ours, theirs in zip(draw(policy), draw(base)):
    np.testing.assert_array_equal(ours, theirs)


def test_ema_anchor_adapter_follows_the_formula(ema_run):
  """anchor_t = (1 - η) anchor_{t-1} + η params_t, leaf by leaf: an average in adapter-parameter space. (The fixed
  anchor is checked by the gradient test, the periodic one by the run's checkpoints.)"""
  for before, after in zip(ema_run, ema_run[1:]):
    expected = jax.tree.map(lambda a, p: 0.75 * a + 0.25 * p, before.anchor_params, after.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), after.anchor_params, expected)
  moved, anchor = (state["layer_0"]["mlp"]["up"]["lora_b"] for state in (ema_run[3].params,
                                                                          ema_run[3].anchor_params))
  assert not np.allclose(moved, 0) and not np.allclose(anchor, moved)


def test_step_gradient_of_the_adapter_matches_finite_differences(base):
  """With SGD at rate 1 the step's update is minus its gradient; central differences of the same loss (the samples
  of that step held fixed) along random directions agree with it. The loss is J-BOND's forward term alone (beta =
  gamma = 0), a plain log-likelihood: the score-function terms' values are estimates whose gradient is not theirs.
  The anchor is fixed and stays where it started."""
  config = lora_config(**{"anchor.mode": "fixed", "jbond.beta": 0.0, "jbond.gamma": 0.0})
  frozen, initial, _ = fine_tuning.setup(config, base, TINY)
  adapter = perturbed(initial, 0.2, seed=1)
  step = train_step.make_train_step(config, TINY, EVEN_TOKEN_REWARD, optax.sgd(1.0))
  state = train_state.create_train_state(adapter, optax.sgd(1.0), config.seed)
  new_state, _ = jax.jit(step)(state, frozen, BATCH)
  gradient = jax.tree.map(jnp.subtract, state.params, new_state.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.anchor_params, state.anchor_params)

  tuning = step.fine_tuning

  @jax.jit
  def phases(state):
    models = state.replace(params=tuning.policy(state.params, frozen), anchor_params=tuning.policy(
        state.anchor_params, frozen))
    samples = step.sample(models, BATCH, jax.random.split(state.rng)[1])
    rewards_ = step.score(BATCH, samples)
    return samples, rewards_, step.estimate(models, base, BATCH, samples, rewards_, with_reference=True)

  held = phases(state)
  loss = jax.jit(lambda a: step.loss(tuning.policy(a, frozen), BATCH, *held)[0])
  eps = 1e-2
  for seed in range(3):
    direction = perturbed(jax.tree.map(jnp.zeros_like, adapter), 1.0, seed=10 + seed)
    shifted = lambda sign: jax.tree.map(lambda a, d: a + sign * eps * d, adapter, direction)  # noqa: E731,B023
    numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(gradient), jax.tree.leaves(direction)))
    assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-3), seed


@pytest.mark.slow
def test_full_rank_lora_bond_reaches_best_of_4_exactly():
  """configs/exact.py (BOND towards Best-of-4 of the reference, fixed anchor) with full-rank adapters (rank 64 =
  d_model) on every projection, at batch 64: the exact KL(π || π_BoN) falls below 0.05 nats."""
  config = shipped_configs.load("exact")
  steps = 300  # 0.021 nats at the end; 0.036 at 200. The steps take ~15 s on 2 cores, the compiles more.
  config.num_steps, config.batch_size = steps, 64
  config.optimizer.decay_steps = steps - config.optimizer.warmup_steps
  config.policy.lora.rank, config.policy.lora.alpha = 64, 64.0
  ref_params, model_config, tokenizer = run_components.load_policy(config)
  reward_fn = run_components.load_reward(config, tokenizer)
  train_prompts, _ = run_components.load_prompts(config, tokenizer, model_config, "")
  frozen, initial, _ = fine_tuning.setup(config, ref_params, model_config)
  optimizer = train_state.make_optimizer(config.optimizer)
  step = jax.jit(train_step.make_train_step(config, model_config, reward_fn, optimizer), donate_argnums=0)
  state = train_state.create_train_state(initial, optimizer, config.seed)
  for _ in range(steps):
    batch = next(train_prompts)
    state, _ = step(state, frozen, {k: jnp.asarray(batch[k]) for k in ("prompts", "prompt_mask")})
  tuning = fine_tuning.from_config(config)
  exact = jax.jit(exact_evaluation.make_exact_step(config, model_config, reward_fn))
  metrics = exact(tuning.policy(state.params, frozen), tuning.policy(state.anchor_params, frozen),
                  tuning.reference(frozen), exact_evaluation.distinct_prompts(batch))
  assert float(metrics["exact/kl_pi_bon"]) < 0.05, metrics
  assert float(metrics["exact/kl_pi_ref"]) > 0.5  # Best-of-4's own KL to the reference is about 0.6.


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family, targets", [
    ("llama", lora.DEFAULT_TARGETS),
    ("phi3", (r"attn/[qv]/", r"mlp/up/")),  # Parts of Phi-3's fused qkv_proj and gate_up_proj.
    ("gemma", (r"attn/[ko]/", r"mlp/(gate|down)/")),
])
def test_exports_reload_in_transformers_and_peft_with_our_logits(family, targets, tmp_path):
  features = {"gemma": dict(norm_plus_one=True, embed_scale=True, mlp_activation="gelu_tanh", tie_embeddings=True)}
  model_config = config_lib.tiny(family=family, vocab_size=40, **features.get(family, {}))
  base_params = transformer.init_params(model_config, jax.random.key(0))
  tuning = lora.Lora(rank=3, alpha=5.0, targets=targets)
  adapter = perturbed(lora.init_adapter(base_params, tuning, jax.random.key(1)), 0.3, seed=2)
  merged = tuning.policy(adapter, lora.Frozen(base_params))
  hf.save_checkpoint(base_params, model_config, tmp_path / "base")
  export.export_policy(merged, model_config, None, tmp_path / "merged")
  export.export_adapter(adapter, tuning, model_config, tmp_path / "adapter", base_model=str(tmp_path / "base"))

  tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  mask = np.ones_like(tokens, bool)
  ours = np.asarray(transformer.forward(merged, model_config, tokens, transformer.positions_from_mask(mask), mask)[0])
  with torch.no_grad():
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for model in (adapted, merged_model):
      np.testing.assert_allclose(model(input_ids=torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=0)
    base_logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")(
        input_ids=torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(base_logits - ours).max() > 0.05  # The adapter matters.
  # And it reads back as it was, at another alpha (B rescaled so that the update is the same).
  other = dataclasses.replace(tuning, alpha=2.0)
  loaded = fine_tuning.load_adapter(str(tmp_path / "adapter"), adapter, other, model_config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               other.policy(loaded, lora.Frozen(base_params)), merged)


def test_the_reference_is_the_base_or_the_starting_adapter_as_configured(base, tmp_path):
  """With a starting adapter (`init_path`) the policy and the anchor start at base + that adapter; the reference is
  the base alone (`reference = "base"`) or the policy's start exactly (`"start"`), in logits."""
  tuning = fine_tuning.from_config(lora_config())
  start = perturbed(lora.init_adapter(base, tuning, jax.random.key(1)), 0.3, seed=5)
  export.export_adapter(start, tuning, TINY, tmp_path / "start")
  mask = BATCH["prompt_mask"]
  logits = jax.jit(lambda p: transformer.forward(p, TINY, BATCH["prompts"], transformer.positions_from_mask(mask),
                                                 mask)[0])
  started = logits(tuning.policy(start, lora.Frozen(base)))
  for reference, expected in (("base", logits(base)), ("start", started)):
    config = lora_config(**{"policy.lora.init_path": str(tmp_path / "start"), "policy.lora.reference": reference})
    run_config.validate(config)
    frozen, initial, _ = fine_tuning.setup(config, base, TINY)
    np.testing.assert_array_equal(logits(tuning.policy(initial, frozen)), started)
    np.testing.assert_array_equal(logits(tuning.reference(frozen)), expected)
  assert np.abs(started - logits(base)).max() > 0.05  # The starting adapter matters.


def test_adapter_exports_to_and_starts_from_a_bucket(base, gcs_bucket):
  """The adapter directory goes through `bond_jax.paths` like every run path: written to a GCS emulator's bucket
  and read back as a starting adapter (`policy.lora.init_path`), value for value."""
  tuning = lora.Lora(rank=2, alpha=4.0)
  adapter = perturbed(lora.init_adapter(base, tuning, jax.random.key(1)), 0.3, seed=4)
  export.export_adapter(adapter, tuning, TINY, f"{gcs_bucket}/lora/adapter")
  loaded = fine_tuning.load_adapter(f"{gcs_bucket}/lora/adapter", adapter, tuning, TINY)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(adapter))


@pytest.fixture(scope="module")
def lora_run(tiny_policy_dir, prompt_data_dir, tmp_path_factory):
  """A 2-step LoRA run of the tiny policy on a (2, 2, 2) mesh with a periodic anchor (a copy after step 2):
  (config, workdir)."""
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, **{
      "num_steps": 2, "mesh_shape": (2, 2, 2), "policy.lora.rank": 4, "policy.lora.alpha": 8.0,
      "optimizer.learning_rate": 0.05, "anchor.mode": "periodic", "anchor.period": 2})
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  trainer.train(config, workdir)
  return config, workdir


def test_run_checkpoints_adapters_only_and_exports_merged_policy_and_adapter(lora_run, tiny_policy_dir):
  config, workdir = lora_run
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, read_only=True)
  saved = checkpointer._manager.item_metadata(2)["state"]  # pylint: disable=protected-access
  checkpointer.close()
  leaves = {path for path in checkpointing._shapes(saved)}  # pylint: disable=protected-access
  params = [p for p in leaves if p.startswith(("params/", "anchor_params/"))]
  assert params and all(p.endswith(("lora_a", "lora_b")) for p in params)
  assert not any("kernel" in p or "embedding" in p for p in leaves)  # No base weight, in any optimizer moment.
  with open(os.path.join(workdir, "checkpoints", "2", "data", "metadata"), encoding="utf-8") as f:
    assert "base_fingerprint" in f.read()
  # The periodic anchor: where it started after step 1, a copy of the policy after step 2.
  states = {step: state for step, (state, _) in tiny_run.restore_every_checkpoint(workdir, config).items()}
  _, initial, _ = fine_tuning.setup(config, *run_components.load_policy(config)[:2])
  jax.tree.map(np.testing.assert_array_equal, states[1].anchor_params, jax.device_get(initial))
  jax.tree.map(np.testing.assert_array_equal, states[2].anchor_params, states[2].params)

  policy, model_config, _, step = export.restore_run_policy(workdir)  # Checks the base's fingerprint too.
  assert step == 2
  tokens = np.array([[1, 7, 9, 11, 13]])
  mask = np.ones_like(tokens, bool)
  ours = np.asarray(transformer.forward(policy, model_config, tokens, transformer.positions_from_mask(mask), mask)[0])
  with torch.no_grad():
    exported = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, trainer.EXPORT_DIR))
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                                             os.path.join(workdir, trainer.ADAPTER_DIR))
    for model in (exported.eval(), adapted.eval()):
      np.testing.assert_allclose(model(input_ids=torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4, rtol=0)
  with open(os.path.join(workdir, trainer.ADAPTER_DIR, lora.PEFT_CONFIG_FILE), encoding="utf-8") as f:
    assert json.load(f)["base_model_name_or_path"] == tiny_policy_dir


def test_resume_against_another_base_stops_with_one_line(lora_run, tmp_path):
  config, workdir = lora_run
  config = config.copy_and_resolve_references()
  config.policy.path = tiny_run.write_tiny_policy(str(tmp_path / "other"))
  params = hf.load_checkpoint(config.policy.path)[0]
  hf.save_checkpoint(perturbed(params, 0.01, seed=3), hf.read_config(config.policy.path), config.policy.path)
  with pytest.raises(checkpointing.CheckpointMismatchError, match="another base model") as error:
    trainer.train(config, workdir)
  assert "\n" not in str(error.value)


def test_bad_lora_fields_are_named():
  for field, value, named in [("dropout", 0.1, "policy.lora.dropout"), ("targets", ("(",), "policy.lora.targets"),
                              ("reference", "start", "policy.lora.reference"), ("rank", -1, "policy.lora.rank")]:
    config = lora_config(**{f"policy.lora.{field}": value})
    with pytest.raises(run_config.ConfigError, match=named.replace(".", r"\.")):
      run_config.validate(config)
  for targets, problem in [((r"attn/x",), "matches no kernel"), ((r"lm_head|mlp/up",), "no adapter can target")]:
    config = lora_config(**{"policy.lora.targets": targets})
    model_config = dataclasses.replace(TINY, tie_embeddings=False)
    params = transformer.init_params(model_config, jax.random.key(0))
    with pytest.raises(run_config.ConfigError, match=f"config.policy.lora.targets .* {problem}"):
      fine_tuning.setup(config, params, model_config)


def test_adapters_are_sharded_over_fsdp_never_tensor(base):
  adapter = lora.init_adapter(base, lora.Lora(rank=4, alpha=1.0), jax.random.key(0))
  specs = sharding.param_partition_specs(adapter, mesh=sharding.make_mesh((1, 4, 2)))
  assert specs["layer_0"]["mlp"]["down"] == {"lora_a": jax.sharding.PartitionSpec("fsdp", None),
                                             "lora_b": jax.sharding.PartitionSpec(None, "fsdp")}
  assert all("tensor" not in spec for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)))


def test_merged_kernels_are_laid_out_as_the_base_is_stored(base):
  """A LoRA product `A @ B` has both axes split over fsdp, so nothing in its inputs says how to lay it out: the
  merged kernel must come out split as the base's (ZeRO-3), not whole on every device, with the same values. Here
  the inputs are not placed on the mesh (at real widths XLA laid the merge out whole even from placed inputs:
  benchmarks/RESULTS.md, "Memory estimate per step"). On a mesh without our axes (another program's), and on one
  whose axes are Explicit, the merge leaves layouts alone."""
  adapter = perturbed(lora.init_adapter(base, lora.Lora(rank=4, alpha=8.0), jax.random.key(0)), 0.1, seed=1)
  mesh = sharding.make_mesh((1, 4, 2))
  with jax.set_mesh(mesh):
    merged = jax.jit(lambda p, a: lora.merge(p, a, scale=2.0))(base, adapter)
  stored = sharding.param_partition_specs(base, mesh=mesh)
  for module in ("mlp/down", "attn/q"):
    kernel = traverse_util.flatten_dict(merged, sep="/")[f"layer_0/{module}/kernel"]
    expected = traverse_util.flatten_dict(stored, sep="/")[f"layer_0/{module}/kernel"]
    assert "fsdp" in expected and kernel.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, expected), kernel.ndim), (module, kernel.sharding.spec)
  unsharded = lora.merge(base, adapter, scale=2.0)
  np.testing.assert_allclose(merged["layer_0"]["mlp"]["down"]["kernel"], unsharded["layer_0"]["mlp"]["down"]["kernel"],
                             rtol=1e-6)
  devices = np.array(jax.devices())
  for other in (jax.sharding.Mesh(devices, ("dp",)), jax.make_mesh((len(devices),), ("dp",),
                                                                  axis_types=(jax.sharding.AxisType.Explicit,))):
    with jax.set_mesh(other):
      elsewhere = jax.jit(lambda p, a: lora.merge(p, a, scale=2.0))(base, adapter)
    np.testing.assert_allclose(elsewhere["layer_0"]["mlp"]["down"]["kernel"],
                               unsharded["layer_0"]["mlp"]["down"]["kernel"], rtol=1e-6)


def test_memory_estimate_counts_the_adapters_and_the_step_copies_of_the_adapted_kernels():
  """BOND with LoRA on an (8, 1, 1) mesh (abstract: nothing is allocated): the trained state is the adapters and
  their AdamW moments, the reference the base, and the step's copies of the adapted kernels are counted (float32
  compute: the policy's and the anchor's merged kernels, three models' layer-stacked copies and the kernels'
  gradient, replicated over `data`). The bound against XLA's plan of a LoRA step is test_memory_estimate's (its
  "fsdp" case)."""
  config = lora_config(rank=8, **{"algorithm": "bond", "bond.n": 4, "bond.num_anchor_samples": 16, "batch_size": 8,
                                  "sampling.max_new_tokens": 12, "mesh_shape": (8, 1, 1)})
  model_config = config_lib.tiny(vocab_size=1024, num_layers=1, d_model=512, num_heads=8, num_kv_heads=4,
                                 head_dim=64, mlp_dim=2048, max_seq_len=32, stop_token_ids=(2,))
  ref_params = jax.eval_shape(lambda: transformer.init_params(model_config, jax.random.key(0)))
  tuning = fine_tuning.from_config(config)
  frozen, initial = lora.Frozen(ref_params), jax.eval_shape(lambda p: lora.init_adapter(p, tuning, jax.random.key(0)),
                                                            ref_params)
  optimizer = train_state.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(config.mesh_shape)
  estimate = memory_estimate.estimate_train_memory(config, model_config, frozen, optimizer, mesh, None, initial)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  assert estimate.reference_params == nbytes(frozen)
  assert estimate.policy_params == estimate.anchor_params == nbytes(initial) < nbytes(ref_params) / 10
  adapted = lora.targeted_kernels(ref_params, tuple(config.policy.lora.targets))
  flat = traverse_util.flatten_dict(ref_params, sep="/")
  assert estimate.steps[memory_estimate.TRAIN_STEP].merged_params == 6 * sum(nbytes(flat[path]) for path in adapted)
