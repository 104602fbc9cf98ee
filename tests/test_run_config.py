"""Config validation: every bad field, type and combination is a `ConfigError` naming the field, before compiling;
`experiments/run.py` reports it in one line."""

import importlib.util
import os

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import ml_collections
import pytest

from bond_jax import algorithms
from bond_jax import anchor
from bond_jax import losses
from bond_jax import run_config
from bond_jax import trainer
from bond_jax.data import prompt_batches
import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_field(config: ml_collections.ConfigDict, dotted: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with `dotted` set to `value`, whatever its type (as a config file could write it)."""
  tree = config.to_dict()
  *groups, field = dotted.split(".")
  node = tree
  for group in groups:
    node = node[group]
  node[field] = value
  return ml_collections.ConfigDict(tree)


def assert_rejected(config, field: str, num_devices: int | None = None):
  with pytest.raises(run_config.ConfigError) as error:
    run_config.validate(config, num_devices)
  assert str(error.value).startswith(f"config.{field} "), str(error.value)


def test_shipped_configs_are_valid():
  run_config.validate(run_config.base_config(), num_devices=8)
  # The report's rows: reference, bon_2, bon_4, bon_8, bon_16 and policy.
  assert tuple(run_config.base_config().eval.bon_ns) == (2, 4, 8, 16)
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run_config.validate(module.get_config(), num_devices=1)


@pytest.mark.parametrize("field", ["foo", "bond.foo", "optimizer.learning_rte", "anchor.rate"])
def test_unknown_fields_are_named(field):
  assert_rejected(with_field(run_config.base_config(), field, 1), field)


@pytest.mark.parametrize("field,value", [
    ("num_steps", "10"), ("num_steps", 10.0), ("num_steps", True), ("bond.beta", "half"), ("jbond.ties_lose", 1),
    ("algorithm", 3), ("mesh_shape", 8), ("mesh_shape", (2.0, 2, 2)), ("eval.bon_ns", ("2",)), ("bond", 1),
])
def test_wrong_types_are_named(field, value):
  assert_rejected(with_field(run_config.base_config(), field, value), field)


def _not_in(choices):
  return st.text(max_size=8).filter(lambda v: v not in choices)


_NAN = st.just(float("nan"))
BAD_VALUES = {
    **{f: st.integers(max_value=0) for f in (
        "num_steps", "batch_size", "log_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
        "data.prompt_len", "sampling.max_new_tokens", "anchor.period", "bond.num_policy_samples",
        "reinforce.num_samples")},
    **{f: st.integers(max_value=-1) for f in ("eval_every", "sampling.top_k", "optimizer.warmup_steps")},
    "bond.n": st.integers(max_value=0),
    "eval.num_ref_samples": st.integers(max_value=1),
    "bond.beta": st.floats().filter(lambda v: not 0 <= v <= 1),
    "jbond.beta": st.floats().filter(lambda v: not 0 <= v <= 1),
    "anchor.eta": st.floats().filter(lambda v: not 0 < v <= 1),
    "sampling.top_p": st.floats().filter(lambda v: not 0 < v <= 1),
    "optimizer.b1": st.floats().filter(lambda v: not 0 <= v < 1),
    "optimizer.b2": st.floats().filter(lambda v: not 0 <= v < 1),
    "sampling.temperature": st.floats(max_value=0) | _NAN,
    "optimizer.learning_rate": st.floats(max_value=0) | _NAN,
    "jbond.gamma": st.floats(max_value=-1e-9) | _NAN,
    "jbond.penalty": st.floats(max_value=-1e-9) | _NAN,
    "reinforce.kl_coef": st.floats(max_value=-1e-9) | _NAN,
    "memory_limit_gib": st.floats(max_value=-1e-9) | _NAN,
    "algorithm": _not_in(algorithms.names()),
    "anchor.mode": _not_in(anchor.ANCHOR_MODES),
    "bond.reward_form": _not_in(losses.REWARD_FORMS),
    "jbond.reward_form": _not_in(losses.JBOND_REWARD_FORMS),
    "data.overlong": _not_in(prompt_batches.OVERLONG_POLICIES),
    "policy.source": _not_in(run_config.POLICY_SOURCES),
}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda f: st.tuples(st.just(f), BAD_VALUES[f])))
def test_bad_values_are_named(field_and_value):
  field, value = field_and_value
  assert_rejected(with_field(run_config.base_config(), field, value), field)


def _config(**fields):
  config = run_config.base_config()
  for dotted, value in fields.items():
    config = with_field(config, dotted.replace("__", "."), value)
  return config


@pytest.mark.parametrize("fields,field,num_devices", [
    ({"mesh_shape": (4, 4, 1)}, "mesh_shape", 8),  # more devices than there are
    ({"mesh_shape": (2, 2, 1)}, "mesh_shape", 8),  # fewer, with no -1 to take the rest
    ({"mesh_shape": (3, -1, 1)}, "mesh_shape", 8),
    ({"mesh_shape": (-1, -1, 1)}, "mesh_shape", None),
    ({"mesh_shape": (2, 2)}, "mesh_shape", None),
    ({"mesh_axes": ("data", "fsdp", "model")}, "mesh_axes", None),
    ({"batch_size": 6, "mesh_shape": (-1, 1, 1)}, "batch_size", 8),
    ({"batch_size": 6, "mesh_shape": (2, 2, 2)}, "batch_size", 8),  # data x fsdp = 4
    ({"batch_size": 8, "eval__batch_size": 6, "mesh_shape": (-1, 1, 1)}, "eval.batch_size", 8),
    ({"batch_size": 16, "eval__batch_size": 8, "memory__inference_micro_batches": 2}, "memory.inference_micro_batches",
     8),  # one held-out prompt per device
    ({"algorithm": "bond", "bond__n": 8, "bond__num_anchor_samples": 4}, "bond.num_anchor_samples", None),
    ({"algorithm": "bond", "bond__num_policy_samples": 1}, "bond.num_policy_samples", None),
    ({"algorithm": "reinforce", "reinforce__num_samples": 1}, "reinforce.num_samples", None),
    # Truncated sampling: the policy, anchor and reference would have different supports (infinite KL terms).
    *[({"algorithm": name, "sampling__top_k": 4}, "sampling.top_k", None) for name in ("jbond", "bond", "reinforce")],
    *[({"algorithm": name, "sampling__top_p": 0.9}, "sampling.top_p", None) for name in ("jbond", "bond", "reinforce")],
    ({"eval__bon_ns": (2, 32)}, "eval.bon_ns", None),
    ({"eval__bon_ns": ()}, "eval.bon_ns", None),
    ({"policy__source": "hf_checkpoint"}, "policy.path", None),
])
def test_bad_combinations_are_named(fields, field, num_devices):
  assert_rejected(_config(**fields), field, num_devices)


def test_good_mesh_and_batch_pass():
  run_config.validate(_config(batch_size=4, mesh_shape=(2, 2, 2)), num_devices=8)
  run_config.validate(_config(batch_size=8, mesh_shape=(-1, 1, 2)), num_devices=16)
  run_config.validate(_config(batch_size=64, eval__batch_size=8), num_devices=8)


@pytest.mark.parametrize("overrides,field", [
    ({"data.prompt_len": 16, "sampling.max_new_tokens": 16}, "data.prompt_len"),  # the tiny policy's context: 24
    ({"mesh_shape": (4, 4, 1)}, "mesh_shape"),
])
def test_trainer_rejects_before_compiling(overrides, field, tiny_policy_dir, prompt_data_dir, tmp_path):
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, **overrides)
  workdir = str(tmp_path / "run")
  with pytest.raises(run_config.ConfigError, match=rf"^config\.{field} "):
    trainer.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # Stopped before the train state existed.


@pytest.mark.parametrize("flag,message", [
    ("--config.batch_size=0", "error: config.batch_size = 0 is not allowed"),
    ("--config.bond.betaa=0.5", "error: a --config.* override names a field the config does not have: 'betaa'"),
])
def test_run_script_reports_a_bad_config_in_one_line(flag, message, tmp_path):
  last_line = tiny_run.run_script_error(str(tmp_path / "run"), [flag])
  assert last_line.startswith(message), last_line
