"""Faulty prompts in a run: empty, only padding, overlong and undecodable prompts are skipped or truncated, counted
and never reach the model; prompts the tokenizer cannot encode for the model, or no usable prompt at all, stop the
run before anything is compiled, with a one-line error from the run script."""

import os

import pytest

from bond_jax import trainer
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_files
import faulty_rewards
import tiny_run

CANDIDATES = [f"the {noun} was {word}" for noun in ("room", "food", "staff", "view")
              for word in ("good", "bad", "nice", "clean", "small", "quiet", "great", "fine", "dirty", "warm")]
# Each kind of bad line, with variants to pick one that the hash split puts in the training prompts.
BAD = {
    "empty": ["", " ", "  ", "\t", " \t"],
    "only padding": ["<pad><pad>", "<pad>", "<pad><pad><pad>", "<eos>", "<pad><eos>"],
    "undecodable": [b"\xff\xfe bad bytes", b"\xff", b"\xc3\x28 x", b"caf\xe9", b"\x80 y"],
    "overlong": [" ".join(["the food was good and the staff were kind"] * k) for k in range(2, 7)],
}


def held_out(raw: bytes) -> bool:
  return bool(prompt_files.split_holdout([raw.decode("utf-8", "surrogateescape")], 0.1)[1])


def write_prompt_file(path: str) -> tuple[list[str], list[str], dict[str, bytes]]:
  """A text prompt file: 12 good training prompts, some good held-out ones, and one bad line of each kind that
  lands in the training split. Returns (good training prompts, good held-out prompts, bad line by kind)."""
  good_train = [p for p in CANDIDATES if not held_out(p.encode())][:12]
  good_eval = [p for p in CANDIDATES if held_out(p.encode())]
  bad = {kind: next(raw for raw in (v if isinstance(v, bytes) else v.encode() for v in variants) if not held_out(raw))
         for kind, variants in BAD.items()}
  assert len(good_train) == 12 and good_eval
  with open(path, "wb") as f:
    f.write(b"\n".join([p.encode() for p in good_train + good_eval] + list(bad.values())) + b"\n")
  return good_train, good_eval, bad


@pytest.fixture
def seen_prompts():
  faulty_rewards.SEEN_PROMPTS.clear()
  yield faulty_rewards.SEEN_PROMPTS
  faulty_rewards.SEEN_PROMPTS.clear()


def test_unusable_prompts_are_skipped_counted_and_never_reach_the_model(
    tiny_policy_dir, tmp_path, seen_prompts, caplog, fault_tally):
  path = str(tmp_path / "prompts.txt")
  good_train, good_eval, bad = write_prompt_file(path)
  for kind in bad:
    fault_tally.record(f"prompt: {kind}", injected=1, survived=0)
  train_texts, _ = prompt_files.split_holdout(prompt_files.read_prompt_file(path), 0.1)
  config = tiny_run.tiny_config(tiny_policy_dir, **{
      "data.source": "prompt_file", "data.path": path, "data.prompt_len": 16, "reward.kind": "python",
      "reward.function": "faulty_rewards:recording"})
  workdir = str(tmp_path / "run")
  with caplog.at_level("WARNING"):
    trainer.train(config, workdir)

  _, data_state = tiny_run.restore_train_state(workdir, config)
  counts = data_state["train"]
  # 3 steps of 8 prompts from a training split of 16 lines: every line was visited at least once.
  assert len(train_texts) == len(good_train) + len(bad)
  visited = counts["epoch"] * len(train_texts) + counts["index"]
  assert visited >= len(train_texts) and counts["counts"]["yielded"] == config.num_steps * config.batch_size
  assert counts["counts"]["empty"] >= 2 and counts["counts"]["undecodable"] >= 1
  assert counts["counts"]["truncated"] >= 1
  skipped = counts["counts"]["empty"] + counts["counts"]["undecodable"]
  assert visited == counts["counts"]["yielded"] + skipped
  for kind in ("empty", "undecodable", "truncated"):
    assert f"is {kind}" in caplog.text, kind

  # Training scored every good training prompt, the final evaluation held-out ones; besides those, only the
  # overlong prompt reached the reward: its last tokens, after BOS.
  seen = set(seen_prompts)
  assert set(good_train) <= seen
  (truncated,) = seen - set(good_train) - set(good_eval)
  assert truncated and bad["overlong"].decode().endswith(truncated)
  for kind in bad:
    fault_tally.record(f"prompt: {kind}", injected=0, survived=1)


@pytest.mark.parametrize("prompts,message", [
    (("1 2 3", "4 9"), r"IdTokenizer: ids of '4 9' must lie in \[0, vocab_size=8\)"),
    (("1 2 three",), "IdTokenizer reads space-separated integers, got '1 2 three'"),
    (("", "   "), "no usable prompt in the 'train' prompts"),
])
def test_prompts_the_model_cannot_take_stop_the_run_before_compiling(prompts, message, tmp_path, fault_tally):
  kind = "prompt: invalid token ids" if "ids" in message or "integers" in message else "prompt: none usable"
  fault_tally.record(kind, injected=1, survived=0)
  config = tiny_run.tiny_config("", **{"policy.source": "init", "data.source": "inline", "data.prompts": prompts,
                                       "data.prompt_len": 4})
  workdir = str(tmp_path / "run")
  with pytest.raises(prompt_batches.PromptError, match=message):
    trainer.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  fault_tally.record(kind, injected=0, survived=1)


def test_the_run_script_reports_unusable_prompts_in_one_line(tmp_path):
  config = tiny_run.tiny_config("", **{"policy.source": "init", "data.source": "inline", "data.prompts": ("4 9",),
                                       "data.prompt_len": 4})
  last_line = tiny_run.run_script_error(str(tmp_path / "run"), tiny_run.command_line_flags(config))
  assert last_line.startswith("error: IdTokenizer: ids of '4 9' must lie"), last_line
