"""The examples and the README's "Use the losses in your own trainer" blocks run as written, and do what they say."""

import contextlib
import importlib.util
import io
import os
import re

import jax
import numpy as np

from bon_oracles import exact_quantiles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relative_path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(relative_path)[:-3], os.path.join(REPO, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def readme_blocks(language: str) -> list[str]:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme[readme.index("## Use the losses in your own trainer"):]
  section = section[:section.index("\n## ", 1)]
  return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_own_trainer_reaches_best_of_n():
  """The script's policy ends within 0.05 nats of Best-of-4 of its reference, by an independent numpy oracle."""
  example = load("examples/own_trainer.py")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    before, after, params, ref_params = example.main()
  assert f"{after:.4f} after" in out.getvalue()
  every = np.stack(np.meshgrid(*[np.arange(example.VOCAB)] * example.LENGTH, indexing="ij"), -1).reshape(
      -1, example.LENGTH)
  every = np.broadcast_to(every, (example.PROMPTS, *every.shape))
  log_probs = {name: np.asarray(jax.jit(example.token_log_probs)(p, every), np.float64).sum(-1)
               for name, p in (("policy", params), ("reference", ref_params))}
  rewards = np.asarray(example.reward(every), np.float64)
  kls = []
  for x in range(example.PROMPTS):
    ref, pi = np.exp(log_probs["reference"][x]), np.exp(log_probs["policy"][x])
    np.testing.assert_allclose([ref.sum(), pi.sum()], 1.0, rtol=1e-5)
    p_lt, p_le = exact_quantiles(ref / ref.sum(), rewards[x])
    gap = np.where(p_le > p_lt, p_le - p_lt, 1.0)
    bon = ref * np.where(p_le > p_lt, (p_le**example.N - p_lt**example.N) / gap, example.N * p_le**(example.N - 1))
    kls.append(np.sum(pi * (np.log(pi) - np.log(bon))))
  np.testing.assert_allclose(np.mean(kls), after, atol=2e-4)
  assert before > 0.5 and after < 0.05, (before, after)


def test_readme_example_runs_as_written():
  python_blocks = readme_blocks("python")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    exec(compile(python_blocks[0], "README.md", "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
  assert "BOND loss" in out.getvalue() and "J-BOND group advantages" in out.getvalue()


def test_readme_tunix_block_mirrors_the_tested_example():
  """Every line of the README's Tunix block is a line of examples/tunix_bond.py (tests/test_tunix_integration.py)."""
  with open(os.path.join(REPO, "examples", "tunix_bond.py"), encoding="utf-8") as f:
    script = {line.strip() for line in f}
  block = readme_blocks("python")[1]
  missing = [line for line in block.splitlines() if line.strip() and line.strip() not in script]
  assert not missing, missing
