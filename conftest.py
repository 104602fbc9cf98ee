"""Set-up for everything pytest collects (the tests and the doctests of `bond_jax`): 8 simulated CPU devices.

Must run before jax is imported anywhere, so it lives here, at the root, where pytest reads it first.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  """The names every docstring example may use without importing them: `jax`, `jnp`, `np`."""
  import jax  # pylint: disable=g-import-not-at-top  (after the flags above)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  doctest_namespace.update(jax=jax, jnp=jnp, np=np)
