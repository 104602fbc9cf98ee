"""Test set-up: 8 simulated CPU devices, so sharding code is tested everywhere."""

import os

import pytest

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> str:
  """A random 1-layer policy on the shipped tokenizer, saved once per session as a Hugging Face checkpoint."""
  import tiny_run  # pylint: disable=g-import-not-at-top  (imports jax, after the flags above)
  return tiny_run.write_tiny_policy(str(tmp_path_factory.mktemp("tiny_policy")))


@pytest.fixture(scope="session")
def prompt_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the shipped prompts, built once per session and shared by the runs that use it."""
  from bond_jax.data import prompt_tfds  # pylint: disable=g-import-not-at-top
  from bond_jax.tasks import default_assets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prompt_tfds.build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir)
  return data_dir


@pytest.fixture(scope="session")
def full_run(tiny_policy_dir, prompt_data_dir, tmp_path_factory):
  """`(config, workdir, report)` of an uninterrupted tiny run (`tiny_run.FULL_RUN`) on this process's devices."""
  import tiny_run  # pylint: disable=g-import-not-at-top
  from bond_jax import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_run.tiny_config(tiny_policy_dir, prompt_data_dir, **tiny_run.FULL_RUN)
  workdir = str(tmp_path_factory.mktemp("full_run"))
  return config, workdir, trainer.train(config, workdir)
