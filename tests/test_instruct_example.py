"""configs/instruct.py on the tiny random stand-ins of an instruct run: conversations through the policy's chat
template, a reward model with its own tokenizer, every stop id, and the export (each piece has its oracle tests in
test_prompt_encoding, test_rewards, test_hf and test_export; here they run together as the README says)."""

import json
import math
import os

from bond_jax import trainer
from bond_jax.models import hf
from bond_jax.tasks import instruct_example
import shipped_configs


def test_the_instruct_config_trains_on_the_stand_ins_and_exports_a_chat_policy(tmp_path):
  paths = instruct_example.write_assets(str(tmp_path / "assets"))
  config = shipped_configs.load("instruct")
  config.policy.path, config.reward.path, config.data.path = paths["policy"], paths["reward_model"], paths["prompts"]
  config.num_steps, config.log_every, config.checkpoint_every = 2, 1, 2
  config.sampling.max_new_tokens, config.eval.num_ref_samples, config.eval.bon_ns = 4, 4, (2,)  # Fast to compile.
  workdir = str(tmp_path / "run")
  report = trainer.train(config, workdir)
  assert all(math.isfinite(v) for row in report.values() for v in row.values()), report

  exported = os.path.join(workdir, trainer.EXPORT_DIR)
  assert hf.read_config(exported).stop_token_ids == hf.read_config(paths["policy"]).stop_token_ids
  assert len(hf.read_config(exported).stop_token_ids) == 2  # <eos> and <end_of_turn>
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["data"]["chat_template"] is True
  assert hf.load_tokenizer(exported).chat_template == instruct_example.SHIPPED_TEMPLATE
