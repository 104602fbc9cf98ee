"""Export: a run's trained policy, written by `experiments/export.py`, loads in transformers with our logits, its
stop ids and its tokenizer."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bond_jax import checkpointing, export, run_config, train_state  # noqa: E402
from bond_jax.models import hf, transformer  # noqa: E402
from bond_jax.models.config import ModelConfig  # noqa: E402
from bond_jax.tasks import default_assets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run whose policy is a Phi-3 (fused q/k/v and gate/up on disk, sliding window) with two stop ids, and whose
  checkpoint at step 3 holds a policy moved away from the reference: (workdir, the checkpoint's policy params)."""
  tmp = tmp_path_factory.mktemp("export_run")
  tokenizer = default_assets.load_tokenizer()
  policy_dir = str(tmp / "policy")
  model_config = ModelConfig(vocab_size=len(tokenizer), num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                             head_dim=8, mlp_dim=48, max_seq_len=32, sliding_window=4, family="phi3",
                             pad_token_id=default_assets.PAD_ID, bos_token_id=default_assets.BOS_ID,
                             stop_token_ids=(default_assets.EOS_ID, 7))
  ref_params = transformer.init_params(model_config, jax.random.key(0))
  hf.save_checkpoint(ref_params, model_config, policy_dir)
  for name in os.listdir(default_assets.TOKENIZER_DIR):
    shutil.copy(os.path.join(default_assets.TOKENIZER_DIR, name), policy_dir)

  config = run_config.base_config()
  config.policy.source = "hf_checkpoint"
  config.policy.path = policy_dir
  workdir = tmp / "run"
  os.makedirs(workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  state = train_state.create_train_state(ref_params, train_state.make_optimizer(config.optimizer), config.seed)
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  trained = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), keep=3, async_save=False)
  checkpointer.save(3, state.replace(step=jax.numpy.asarray(3, jax.numpy.int32), params=trained), {"train": {}})
  checkpointer.close()
  return str(workdir), trained, model_config


def test_exported_policy_loads_in_transformers_with_our_logits(run_dir, tmp_path):
  workdir, trained, model_config = run_dir
  out = tmp_path / "exported"
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "export.py"), f"--workdir={workdir}",
                  f"--out={out}"], check=True, cwd=REPO, env=os.environ | {"PYTHONPATH": REPO})

  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == "Phi3ForCausalLM"
  assert model.generation_config.eos_token_id == [default_assets.EOS_ID, 7]
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  text = "The plot was great"
  assert tokenizer.encode(text) == default_assets.load_tokenizer().encode(text)

  tokens = np.array([[default_assets.BOS_ID] + tokenizer.encode(text, add_special_tokens=False) * 2])
  mask = np.ones_like(tokens, bool)
  ours, _ = transformer.forward(trained, model_config, tokens, transformer.positions_from_mask(mask), mask)
  with torch.no_grad():
    theirs = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
  assert tokens.shape[1] > 4  # past the sliding window
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_restore_errors_name_the_problem(run_dir, tmp_path):
  workdir, _, _ = run_dir
  with pytest.raises(ValueError, match=r"step=5: .* has checkpoints at steps \[3\] only"):
    export.restore_run_policy(workdir, step=5)
  with pytest.raises(FileNotFoundError, match="is .* the --workdir of a run"):
    export.restore_run_policy(str(tmp_path))
