"""The package surface: `import bond_jax` is light, submodules load on first access, `__all__` and `__version__`."""

import json
import os
import re
import subprocess
import sys

import pytest

import bond_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("tensorflow_datasets", "tensorflow", "transformers", "torch")


def run_python(code: str) -> str:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                        cwd=REPO).stdout


def test_import_is_light_and_submodules_load_on_access():
  out = run_python(
      "import json, sys\n"
      "import bond_jax\n"
      f"heavy_at_import = [m for m in {HEAVY!r} if m in sys.modules]\n"
      "names = [bond_jax.rewards.__name__, bond_jax.sampling.__name__, bond_jax.exact_oracle.__name__,\n"
      "         bond_jax.losses.__name__, bond_jax.models.__name__]\n"
      f"heavy_after = [m for m in {HEAVY!r} if m in sys.modules]\n"
      "print(json.dumps([heavy_at_import, names, heavy_after]))\n")
  heavy_at_import, names, heavy_after = json.loads(out)
  assert heavy_at_import == []
  assert names == ["bond_jax.rewards", "bond_jax.sampling", "bond_jax.exact_oracle", "bond_jax.losses",
                   "bond_jax.models"]
  assert heavy_after == []


def test_all_and_unknown_attributes():
  assert sorted(bond_jax.__all__) == bond_jax.__all__
  for name in bond_jax.__all__:
    assert callable(getattr(bond_jax, name)), name
  assert "trainer" in dir(bond_jax)
  with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
    bond_jax.no_such_module  # pylint: disable=pointless-statement


def test_setup_reads_the_version_from_the_package():
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    assert "version=_version()" in f.read()
  assert re.fullmatch(r"\d+\.\d+\.\d+", bond_jax.__version__)
  out = subprocess.run([sys.executable, "setup.py", "--version"], check=True, capture_output=True, text=True,
                       cwd=REPO).stdout
  assert out.split()[-1] == bond_jax.__version__
