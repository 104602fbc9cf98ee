"""The verifiable arithmetic task: checker, shipped assets, corpus noise, reference pass rate, experiment configs."""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import transformers

from bond_jax import algorithms
from bond_jax import run_config
from bond_jax import sampling
from bond_jax.data import prompt_sources
from bond_jax.models import hf
from bond_jax.tasks import arithmetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_scores_exact_sums_only():
  prompts = ["12+7=", "12+7=", "12+7=", "0+0=", "3+4=", "3+4", "a+4="]
  generations = ["19", " 19 ", "190", "0", "8", "7", "4"]
  assert arithmetic.check(prompts, generations) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="`generations`"):
    arithmetic.check(["1+1="], [])


def test_committed_assets_equal_a_regeneration(tmp_path):
  arithmetic.write_assets(str(tmp_path))
  for name in ("prompts.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
    with open(tmp_path / name, encoding="utf-8") as f, open(os.path.join(arithmetic.ASSETS_DIR, name),
                                                            encoding="utf-8") as g:
      assert f.read() == g.read(), name
  with open(arithmetic.PROMPTS_PATH, encoding="utf-8") as f:
    assert len({json.loads(line)["prompt"] for line in f}) == (arithmetic.MAX_OPERAND + 1) ** 2


def test_tokenizer_round_trips_characters():
  tokenizer = transformers.AutoTokenizer.from_pretrained(arithmetic.TOKENIZER_DIR)
  ids = tokenizer.encode("29+3=32")
  assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("29+3=32")
  assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "29+3=32"


def test_corpus_is_right_at_the_stated_rate():
  lines = arithmetic.corpus_lines(20_000, seed=3)
  prompts, answers = zip(*(line.split("=") for line in lines))
  right = np.mean(arithmetic.check([p + "=" for p in prompts], list(answers)))
  # Binomial standard error is 0.0034; every slip is non-zero, so a slipped line is never scored right.
  assert abs(right - arithmetic.CORPUS_PASS_RATE) < 5 * np.sqrt(0.25 / len(lines))
  assert all(int(a) >= 0 for a in answers)


def test_shipped_reference_passes_sometimes():
  """Right often enough to learn from, wrong often enough for Best-of-N to help: the experiment's premise."""
  params, model_config = hf.load_checkpoint(arithmetic.POLICY_DIR)
  tokenizer = hf.load_tokenizer(arithmetic.POLICY_DIR)
  _, held_out = prompt_sources.load_prompt_splits("prompt_file", path=arithmetic.PROMPTS_PATH)
  prompts = list(held_out)
  tokens = np.zeros((len(prompts), 8), np.int32)
  for i, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt)
    tokens[i, :len(ids)] = ids
  config = sampling.SamplingConfig(max_new_tokens=3, num_samples=8, temperature=1.0, top_k=0, top_p=1.0,
                                   stop_token_ids=model_config.stop_token_ids, pad_token_id=model_config.pad_token_id)
  out = sampling.sample(params, tokens, tokens != 0, jax.random.PRNGKey(0), config, model_config)
  generated, mask = np.asarray(out.tokens), np.asarray(out.mask)
  texts = [tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
           for rows, keeps in zip(generated, mask) for row, keep in zip(rows, keeps)]
  pass_rate = np.mean(arithmetic.check([p for p in prompts for _ in range(8)], texts))
  assert 0.2 < pass_rate < 0.6


@pytest.mark.parametrize("method", ["jbond_tie_aware", "jbond_paper", "reinforce"])
def test_experiment_configs_are_valid(method):
  spec = importlib.util.spec_from_file_location("verifiable", os.path.join(REPO, "configs", "verifiable.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(method)
  run_config.validate(config, num_devices=1)
  expected = {"jbond_tie_aware": algorithms.JBond(reward_form="tie_aware"),
              "jbond_paper": algorithms.JBond(reward_form="penalty"), "reinforce": algorithms.Reinforce()}[method]
  assert dataclasses.replace(algorithms.from_config(config), anchor=None) == expected
