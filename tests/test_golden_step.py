"""Golden values: every metric of the second train step of each algorithm on the tiny run, pinned.

The tiny run (`tiny_run.tiny_config`: a random 1-layer policy on the shipped tokenizer, 8 prompts of the shipped
data, 4 new tokens) with the jittable even-token reward, two steps on one device from the same initial state; the
second step's metrics are compared with the values below (the first step's KLs are all 0, the second's are not).

These values come from bond_jax itself: they do not say the step is right (the oracle tests do), they say it has
not changed. A change that moves them unintentionally is a regression. When a change moves them ON PURPOSE (a new
estimator, a different random split, another initialisation), run `python tests/test_golden_step.py` from the
repository root, check that the new values differ only where and as the change explains, and paste its output
over `GOLDEN`, saying in the commit message which metrics moved and why.
"""

import json
import os
import sys
import tempfile

import numpy as np
import pytest

import tiny_run

GOLDEN = {
    "jbond": {
        "entropy/sequence": 21.544994354248047,
        "grad_norm": 9.779023170471191,
        "kl/policy_anchor": 0.01086115837097168,
        "kl/policy_ref": 0.014393329620361328,
        "length/policy": 4.0,
        "loss/backward": 0.7040083408355713,
        "loss/forward": 22.514358520507812,
        "loss/kl": 0.01086115837097168,
        "loss/kl_anchor_k3": 0.3102155923843384,
        "loss/reward": -0.6931471824645996,
        "loss/total": 11.609183311462402,
        "nonfinite": 0.0,
        "quantile/policy_vs_anchor": 0.75,
        "reward/anchor": 0.578125,
        "reward/anchor_best": 0.65625,
        "reward/first_nonfinite_prompt": -1.0,
        "reward/nonfinite_prompts": 0.0,
        "reward/policy": 0.53125,
        "tokens/generated": 96.0
    },
    "bond": {
        "entropy/sequence": 21.570478439331055,
        "grad_norm": 5.472775459289551,
        "kl/policy_anchor": 0.14095020294189453,
        "kl/policy_ref": 0.14980876445770264,
        "length/policy": 4.0,
        "loss/backward/bond_reward": 0.09400483965873718,
        "loss/backward/kl_bon": 0.04694536328315735,
        "loss/backward/kl_ref": 0.14095020294189453,
        "loss/forward/nll": 22.0006103515625,
        "loss/total": 11.023777961730957,
        "nonfinite": 0.0,
        "quantile/policy_vs_anchor": 0.65625,
        "reward/anchor": 0.515625,
        "reward/anchor_best": 0.609375,
        "reward/first_nonfinite_prompt": -1.0,
        "reward/nonfinite_prompts": 0.0,
        "reward/policy": 0.53125,
        "tokens/generated": 192.0
    },
    "reinforce": {
        "entropy/sequence": 21.87141227722168,
        "grad_norm": 1.7549176216125488,
        "kl/policy_ref": 0.2209641933441162,
        "length/policy": 4.0,
        "loss/kl_ref": 0.2209641933441162,
        "loss/reward": 0.546875,
        "loss/total": -0.5358267426490784,
        "nonfinite": 0.0,
        "reward/first_nonfinite_prompt": -1.0,
        "reward/nonfinite_prompts": 0.0,
        "reward/policy": 0.546875,
        "tokens/generated": 64.0
    }
}


def second_step_metrics(algorithm: str, policy_dir: str, data_dir: str) -> dict[str, float]:
  config = tiny_run.tiny_config(policy_dir, data_dir, algorithm=algorithm, **{
      "reward.kind": "python_tokens", "reward.function": "tiny_run:even_token_reward"})
  components = tiny_run.load_components(config, tempfile.mkdtemp())
  _, history = tiny_run.run_steps(config, tiny_run.one_device_mesh(), components, num_steps=2)
  return {name: float(value) for name, value in history[-1][1].items()}


@pytest.mark.parametrize("algorithm", sorted(GOLDEN))
def test_second_step_metrics_are_unchanged(algorithm, tiny_policy_dir, prompt_data_dir):
  metrics = second_step_metrics(algorithm, tiny_policy_dir, prompt_data_dir)
  assert sorted(metrics) == sorted(GOLDEN[algorithm]), "the step's metric names changed: see the module docstring"
  for name, expected in GOLDEN[algorithm].items():
    np.testing.assert_allclose(metrics[name], expected, rtol=1e-5, atol=1e-6,
                               err_msg=f"{algorithm} {name} moved: see the module docstring for what to do")


if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from bond_jax.data import prompt_tfds  # pylint: disable=g-import-not-at-top
  from bond_jax.tasks import default_assets  # pylint: disable=g-import-not-at-top
  policy = tiny_run.write_tiny_policy(tempfile.mkdtemp())
  data = tempfile.mkdtemp()
  prompt_tfds.build_prompt_dataset(default_assets.PROMPTS_PATH, data)
  print(json.dumps({alg: second_step_metrics(alg, policy, data) for alg in sorted(GOLDEN)}, indent=4, sort_keys=True))
