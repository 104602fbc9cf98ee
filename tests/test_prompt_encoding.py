"""Prompt encoding: exactly the special tokens the model expects from every source, chat templates against
`apply_chat_template`, the pad-token override, and padding told by masks (oracles: the transformers tokenizers)."""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from bond_jax import run_components
from bond_jax import run_config
from bond_jax.data import id_tokenizer
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_encoding
from bond_jax.data import prompt_files
from bond_jax.data import prompt_tfds
from bond_jax.models import hf
from bond_jax.tasks import default_assets
from bond_jax.tasks import instruct_example


def _rows(batch):
  return [row[mask].tolist() for row, mask in zip(batch["prompts"], batch["prompt_mask"])]


def _one_batch(prompts, tokenizer, prompt_len=32):
  return next(prompt_batches.PromptIterator(prompts, tokenizer, batch_size=len(prompts), prompt_len=prompt_len,
                                            shuffle=False))


def test_prompts_holding_their_special_tokens_get_none_again_from_every_source(tmp_path):
  tokenizer = default_assets.load_tokenizer()
  texts = ["<bos>the film was", "the film was", "<bos><bos>twice"]
  # Oracle: transformers' encoding of the text without the special tokens it already holds.
  want = [tokenizer("the film was")["input_ids"]] * 2 + [tokenizer("<bos>twice")["input_ids"]]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  prompt_tfds.build_prompt_dataset(str(path), str(tmp_path / "tfds"), eval_fraction=0.6)  # 2 train, 1 validation
  tfds_splits = [prompt_tfds.tfds_text_split("bond_prompts", str(tmp_path / "tfds"), split, "prompt")
                 for split in ("train", "validation")]
  sources = {"inline": texts, "prompt_file": prompt_files.read_prompt_file(str(path)),
             "tfds": [tfds_splits[0][i] for i in range(2)] + [tfds_splits[1][0]]}
  for name, source in sources.items():
    batch = _one_batch(source, tokenizer)
    assert sorted(_rows(batch)) == sorted(want), name  # TFDS stores its splits in their own order.


def test_a_tokenizer_that_adds_an_eos_adds_it_once():
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A </s>",
                                                                special_tokens=[("<s>", 1), ("</s>", 2)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
  want = fast("hello world")["input_ids"]
  assert want == [1, 4, 5, 2]
  batch = _one_batch(["<s> hello world </s>", "hello world </s>", "<s> hello world", "hello world"], fast)
  assert _rows(batch) == [want] * 4


@pytest.fixture(scope="module")
def chat_policy_config(tmp_path_factory):
  """A run config whose policy ("init", vocabulary of the shipped tokenizer) reads the shipped tokenizer with a
  chat template, rendering prompts with it."""
  config = run_config.base_config()
  config.policy.source = "init"
  config.policy.tokenizer_path = instruct_example.shipped_tokenizer(str(tmp_path_factory.mktemp("chat")))
  config.policy.model.vocab_size = len(default_assets.load_tokenizer())
  config.data.chat_template = True
  return config


def test_chat_prompts_are_rendered_as_apply_chat_template_renders_them(chat_policy_config, tmp_path):
  conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The film was"}]
  lines = [{"messages": conversation}, {"prompt": "The room"}, {"prompt": "<bos>The room"},
           {"messages": [{"role": "user", "content": "  "}]}]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  _, model_config, tokenizer = run_components.load_policy(chat_policy_config)
  it = prompt_batches.PromptIterator(prompt_files.read_prompt_file(str(path)), tokenizer, batch_size=3,
                                     prompt_len=40, shuffle=False, vocab_size=model_config.vocab_size)
  batch = next(it)

  # Oracle: transformers' own rendering, with the generation prompt; a text is one user turn.
  reference = hf.load_tokenizer(chat_policy_config.policy.tokenizer_path)
  render = lambda turns: reference.apply_chat_template(turns, add_generation_prompt=True,  # noqa: E731
                                                       tokenize=True, return_dict=False)
  want = [render(conversation), render([{"role": "user", "content": "The room"}]),
          render([{"role": "user", "content": "<bos>The room"}])]
  assert _rows(batch) == want
  assert [row.count(reference.bos_token_id) for row in want] == [1, 1, 2]  # the template's BOS; the user typed one
  assert batch["text"] == ["The film was", "The room", "<bos>The room"]
  assert it.counts["empty"] == 0  # the blank conversation is not reached yet: batch of 3
  assert tokenizer.prompt_of(_rows(batch)[0]) == conversation  # what rewards read back


def test_chat_template_without_one_and_conversations_without_the_flag_are_refused(tmp_path):
  config = run_config.base_config()
  config.data.chat_template = True
  with pytest.raises(prompt_batches.PromptError, match=r"^chat_template = True \(config.data.chat_template\) is not "
                     r"allowed: the policy's tokenizer has no chat template"):
    run_components.load_policy(config)
  with pytest.raises(prompt_batches.PromptError, match=r"is a conversation; conversations need chat_template = True"):
    _one_batch([[{"role": "user", "content": "Hi"}]], default_assets.load_tokenizer())


def test_pad_token_override_for_a_tokenizer_without_one(tmp_path):
  pad = "<|finetune_right_pad_id|>"
  config = run_config.base_config()
  config.policy.source = "init"
  config.policy.tokenizer_path = instruct_example.shipped_tokenizer(str(tmp_path), chat_template=None, drop_pad=True,
                                                                   extra_tokens=(pad,))
  config.policy.model.vocab_size = len(default_assets.load_tokenizer()) + 1
  _, _, tokenizer = run_components.load_policy(config)
  with pytest.raises(prompt_batches.PromptError, match="no pad token .* name one of its tokens in config.policy.pad"):
    _one_batch(["The room"], tokenizer)
  config.policy.pad_token = "<nope>"
  with pytest.raises(prompt_batches.PromptError, match=r"^config.policy.pad_token = '<nope>' is not allowed: it is "
                     r"not a token of the tokenizer's vocabulary"):
    run_components.load_policy(config)
  config.policy.pad_token = pad
  _, _, tokenizer = run_components.load_policy(config)
  pad_id = hf.load_tokenizer(config.policy.tokenizer_path).convert_tokens_to_ids(pad)
  batch = _one_batch(["The room", "The film was"], tokenizer, prompt_len=6)
  assert tokenizer.pad_token_id == pad_id == 405
  np.testing.assert_array_equal(batch["prompts"][~batch["prompt_mask"]], pad_id)


def test_prompts_of_pad_id_tokens_are_real_prompts():
  # IdTokenizer: 0 is an ordinary token that doubles as the pad id; only the mask tells padding.
  batch = _one_batch(["0 0", "5 0 3"], id_tokenizer.IdTokenizer(8), prompt_len=4)
  assert _rows(batch) == [[0, 0], [5, 0, 3]]
  np.testing.assert_array_equal(batch["prompt_mask"], [[0, 0, 1, 1], [0, 1, 1, 1]])


def test_prompt_of_unknown_templated_ids_is_refused(chat_policy_config):
  _, _, tokenizer = run_components.load_policy(chat_policy_config)
  with pytest.raises(prompt_batches.PromptError, match="were not encoded by this PromptTokenizer"):
    tokenizer.prompt_of([1, 5, 6])
  plain = prompt_encoding.PromptTokenizer(default_assets.load_tokenizer())
  assert plain.prompt_of(plain.encode("The room")) == "The room"
