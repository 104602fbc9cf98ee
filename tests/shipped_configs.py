"""Loads the shipped `configs/*.py` files by path, as `experiments/run.py` does."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
  """`get_config()` of `configs/{name}.py`."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
