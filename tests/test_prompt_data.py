"""Prompt data: files, the bond_prompts TFDS builder, other TFDS datasets, and the batching iterator."""

import json
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bond_jax.data import prompt_batches
from bond_jax.data import prompt_encoding
from bond_jax.data import prompt_files
from bond_jax.data import prompt_sources
from bond_jax.data import prompt_tfds
from bond_jax.tasks import default_assets

PAD, BOS, EOS = 0, 1, 2


class WordTokenizer:
  """BOS followed by one id per whitespace-separated word: the token count of a prompt is known by eye."""

  pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS
  all_special_ids = (PAD, BOS, EOS)

  def encode(self, text, add_special_tokens=True):
    # A literal "<pad>" word encodes to the pad id, as a real tokenizer's pad token would.
    words = [PAD if w == "<pad>" else 3 + zlib.crc32(w.encode()) % 1000 for w in text.split()]
    return [BOS] * add_special_tokens + words


class ToyDocuments(tfds.core.GeneratorBasedBuilder):
  """Stands in for a user's TFDS dataset such as XSum: text features "document" and "summary"."""

  VERSION = tfds.core.Version("0.1.0")

  # As in BondPrompts: TFDS's checksum lookup would import the undeclared `importlib_resources`.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    return None

  def _info(self):
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"document": text,
                                                                                    "summary": text}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(7)), "validation": self._generate_examples(range(7, 10))}

  def _generate_examples(self, numbers):
    for i in numbers:
      yield i, {"document": f"document number {i}", "summary": f"summary {i}"}


def _prompts(n):
  return [f"prompt {i} " + "w " * (i % 5) for i in range(n)]


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["prompts"], y["prompts"])
    np.testing.assert_array_equal(x["prompt_mask"], y["prompt_mask"])
    assert x["text"] == y["text"]


# Files.


def test_text_and_jsonl_readers(tmp_path):
  text_path = tmp_path / "p.txt"
  text_path.write_bytes(b"first prompt\r\nsecond\n\nbad \xff byte\nlast\n")
  prompts = prompt_files.read_prompt_file(str(text_path))
  assert prompts[:3] == ["first prompt", "second", ""] and prompts[4] == "last" and len(prompts) == 5
  assert prompt_encoding.as_text(prompts[3]) is None  # Kept, then skipped and counted by the iterator.

  jsonl_path = tmp_path / "p.jsonl"
  conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode ☃", "name": "a"}]
  rows = [{"question": "Why is the sky blue?", "id": 1}, {"question": "Ünïcode ☃"}, {"messages": conversation}]
  jsonl_path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
  assert prompt_files.read_prompt_file(str(jsonl_path), text_key="question") == [
      "Why is the sky blue?", "Ünïcode ☃", conversation]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\nnot json\n', r"p\.jsonl:2: not a JSON object"),
    ('{"prompt": "ok"}\n{"text": "x"}\n',
     r"p\.jsonl:2: neither text_key='prompt' nor 'messages' found; the line holds \['text'\]"),
    ('{"messages": [{"role": "user"}]}\n', r"p\.jsonl:1: 'messages' must be a non-empty list of"),
    ('{"messages": []}\n', r"p\.jsonl:1: 'messages' must be a non-empty list of"),
    ('{"prompt": 5}\n', r"p\.jsonl:1: 'prompt' must be a string"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
  path = tmp_path / "p.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=message):
    prompt_files.read_prompt_file(str(path))


def test_missing_prompt_file_raises():
  with pytest.raises(ValueError, match="does not exist"):
    prompt_files.read_prompt_file("/nonexistent/prompts.jsonl")


def test_holdout_split_is_by_text_and_disjoint():
  prompts = _prompts(400) + _prompts(50)  # Repeats must not straddle the split.
  train, held_out = prompt_files.split_holdout(prompts, eval_fraction=0.2)
  assert sorted(train + held_out) == sorted(prompts)
  assert not set(train) & set(held_out)
  assert 0.1 < len(set(held_out)) / 400 < 0.3
  shuffled = list(reversed(prompts))
  assert set(prompt_files.split_holdout(shuffled, 0.2)[1]) == set(held_out)  # Order does not matter.


# TFDS.


def test_bond_prompts_builder_reads_back_exactly_the_prompts(tmp_path):
  prompts = _prompts(60) + ["Ünïcode ☃ prompt", "duplicate", "duplicate"]
  source = tmp_path / "prompts.jsonl"
  source.write_text("".join(json.dumps({"p": p}) + "\n" for p in prompts))
  data_dir = str(tmp_path / "tfds")
  prompt_tfds.build_prompt_dataset(str(source), data_dir, text_key="p", eval_fraction=0.25)
  read = {split: prompt_tfds.tfds_text_split("bond_prompts", data_dir, split, "prompt")
          for split in ("train", "validation")}
  texts = {split: [column[i].decode("utf-8") for i in range(len(column))] for split, column in read.items()}
  assert sorted(texts["train"] + texts["validation"]) == sorted(prompts)
  assert (sorted(texts["train"]), sorted(texts["validation"])) == tuple(
      map(sorted, prompt_files.split_holdout(prompts, 0.25)))

  prompt_tfds.build_prompt_dataset(str(source), data_dir, text_key="p", eval_fraction=0.25)  # Reused.
  with pytest.raises(ValueError, match="already holds 'bond_prompts' built from other"):
    prompt_tfds.build_prompt_dataset(str(source), data_dir, text_key="p", eval_fraction=0.5)


def test_user_tfds_dataset_with_text_key(tmp_path):
  data_dir = str(tmp_path / "tfds")
  ToyDocuments(data_dir=data_dir, file_format="array_record").download_and_prepare()
  train, held_out = prompt_sources.load_prompt_splits("tfds", tfds_name="toy_documents", data_dir=data_dir,
                                                      text_key="document")
  assert sorted(train[i] for i in range(len(train))) == sorted(f"document number {i}".encode() for i in range(7))
  assert len(held_out) == 3
  sliced = prompt_tfds.tfds_text_split("toy_documents", data_dir, "train[:4]", "summary")
  assert len(sliced) == 4 and sliced[0].startswith(b"summary ")

  with pytest.raises(ValueError, match=r"text_key='body' is not a feature .* \['document', 'summary'\]"):
    prompt_tfds.tfds_text_split("toy_documents", data_dir, "train", "body")
  with pytest.raises(ValueError, match=r"split='test' is not a split .* \['train', 'validation'\]"):
    prompt_tfds.tfds_text_split("toy_documents", data_dir, "test", "document")
  with pytest.raises(ValueError, match="is not prepared in data_dir"):
    prompt_tfds.tfds_text_split("toy_documents", str(tmp_path / "empty"), "train", "document")
  with pytest.raises(ValueError, match="neither registered nor prepared"):
    prompt_tfds.tfds_text_split("no_such_dataset_xyz", data_dir, "train", "document")


def test_default_source_goes_through_tfds_and_holds_out_disjoint_eval(tmp_path):
  train, held_out = prompt_sources.load_prompt_splits("default", data_dir=str(tmp_path / "tfds"))
  assert isinstance(train, prompt_tfds.TextColumn)
  train_texts = {train[i].decode() for i in range(len(train))}
  eval_texts = {held_out[i].decode() for i in range(len(held_out))}
  shipped = prompt_files.read_prompt_file(default_assets.PROMPTS_PATH)
  assert not train_texts & eval_texts
  assert train_texts | eval_texts == set(shipped)
  assert len(eval_texts) >= 64  # Enough for the default config's evaluation batches.


def test_prompt_file_source_and_bad_source(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("\n".join(_prompts(100)) + "\n")
  train, held_out = prompt_sources.load_prompt_splits("prompt_file", path=str(path), eval_fraction=0.3)
  assert (train, held_out) == prompt_files.split_holdout(_prompts(100), 0.3)
  with pytest.raises(ValueError, match="source='hub' is not a source of prompt files or datasets"):
    prompt_sources.load_prompt_splits("hub")


# Batches.


def test_left_pad_matches_oracle():
  tokens, mask = prompt_batches.left_pad([[5], [6, 7, 8], []], prompt_len=3, pad_token_id=9)
  np.testing.assert_array_equal(tokens, [[9, 9, 5], [6, 7, 8], [9, 9, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1], [1, 1, 1], [0, 0, 0]])
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_fit_to_length_keeps_bos_and_the_end():
  assert prompt_batches.fit_to_length([BOS, 5, 6, 7, 8], 3, BOS) == [BOS, 7, 8]
  assert prompt_batches.fit_to_length([5, 6, 7, 8], 3, BOS) == [6, 7, 8]
  assert prompt_batches.fit_to_length([BOS, 5], 3, BOS) == [BOS, 5]


def test_batches_are_left_padded_encodings_of_their_text():
  tokenizer = WordTokenizer()
  it = prompt_batches.PromptIterator(_prompts(20), tokenizer, batch_size=5, prompt_len=8, seed=3)
  for batch in _batches(it, 6):
    assert batch["prompts"].shape == batch["prompt_mask"].shape == (5, 8)
    for row, mask, text in zip(batch["prompts"], batch["prompt_mask"], batch["text"]):
      length = len(tokenizer.encode(text))
      np.testing.assert_array_equal(mask, np.arange(8) >= 8 - length)
      assert list(row[mask]) == tokenizer.encode(text) and np.all(row[~mask] == PAD)


def _one_epoch_texts_and_counts(texts, **kwargs):
  it = prompt_batches.PromptIterator(texts, WordTokenizer(), batch_size=1, shuffle=False, num_epochs=1, **kwargs)
  batches = list(it)
  return batches, it.counts


def test_overlong_prompts_truncated_or_rejected_with_counts():
  texts = ["a b", "a b c d e f", "x y z", "p q r s t u v w"]  # 3, 7, 4, 9 tokens with BOS.
  batches, counts = _one_epoch_texts_and_counts(texts, prompt_len=4, overlong="truncate")
  assert [b["text"][0] for b in batches] == texts
  tokenizer = WordTokenizer()
  for batch, text in zip(batches, texts):
    ids = tokenizer.encode(text)
    expected = ids if len(ids) <= 4 else [BOS] + ids[-3:]
    assert list(batch["prompts"][0][batch["prompt_mask"][0]]) == expected
  assert counts["truncated"] == 2 and counts["rejected"] == 0

  batches, counts = _one_epoch_texts_and_counts(texts, prompt_len=4, overlong="reject")
  assert [b["text"][0] for b in batches] == ["a b", "x y z"]
  assert counts["rejected"] == 2 and counts["truncated"] == 0 and counts["yielded"] == 2


def test_empty_and_undecodable_prompts_skipped_with_counts():
  texts = ["good one", "", "   \t", b"\xff\xfe", "<pad> <pad>", "\ud800 lone surrogate", b"bytes ok", "last"]
  batches, counts = _one_epoch_texts_and_counts(texts, prompt_len=6)
  assert [b["text"][0] for b in batches] == ["good one", "bytes ok", "last"]
  assert counts == {"yielded": 3, "truncated": 0, "rejected": 0, "empty": 3, "undecodable": 2}


def test_unusable_prompts_and_bad_token_ids_raise():
  with pytest.raises(ValueError, match="no usable prompt"):
    next(prompt_batches.PromptIterator(["", " ", b"\xff"], WordTokenizer(), batch_size=2, prompt_len=4))
  it = prompt_batches.PromptIterator(["a b c"], WordTokenizer(), batch_size=1, prompt_len=4, vocab_size=4)
  with pytest.raises(ValueError, match=r"outside \[0, vocab_size=4\)"):
    next(it)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=6, process_count=4), "multiple of process_count"),
    (dict(process_index=2, process_count=2), "process_index=2"),
    (dict(overlong="drop"), "overlong='drop'"),
    (dict(prompt_len=0), "prompt_len=0"),
])
def test_bad_arguments_raise(kwargs, message):
  args = dict(batch_size=4, prompt_len=4) | kwargs
  with pytest.raises(ValueError, match=message):
    prompt_batches.PromptIterator(_prompts(8), WordTokenizer(), **args)


def test_hosts_split_the_global_batch():
  texts = _prompts(23)
  make = lambda index, count: prompt_batches.PromptIterator(  # noqa: E731
      texts, WordTokenizer(), batch_size=6, prompt_len=8, seed=1, process_index=index, process_count=count)
  whole, first, second = make(0, 1), make(0, 2), make(1, 2)
  for _ in range(9):  # Past two epoch ends.
    w, a, b = next(whole), next(first), next(second)
    np.testing.assert_array_equal(np.concatenate([a["prompt_mask"], b["prompt_mask"]]), w["prompt_mask"])
    assert a["text"] + b["text"] == w["text"] and not set(a["text"]) & set(b["text"])
    assert a["prompts"].shape == (3, 8)


def test_seeded_shuffle_visits_each_prompt_once_per_epoch():
  texts = _prompts(24)

  def epochs(seed):
    it = prompt_batches.PromptIterator(texts, WordTokenizer(), batch_size=4, prompt_len=8, seed=seed)
    return [sum((b["text"] for b in _batches(it, 6)), []) for _ in range(2)]

  first, second = epochs(0)
  assert sorted(first) == sorted(second) == sorted(texts) and first != second
  assert epochs(0) == [first, second]
  assert epochs(1)[0] != first


@pytest.mark.parametrize("steps_before", [1, 4, 5])  # Mid-epoch, at a batch spanning the epoch end, after it.
def test_resume_continues_exactly(steps_before):
  texts = _prompts(22) + [""]  # 22 usable prompts, batch 5: the 5th batch spans the end of epoch 0.
  make = lambda: prompt_batches.PromptIterator(texts, WordTokenizer(), batch_size=5, prompt_len=8,  # noqa: E731
                                               seed=7, overlong="reject")
  uninterrupted = make()
  _batches(uninterrupted, steps_before)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_batches(resumed, 6), _batches(uninterrupted, 6))
  assert resumed.counts == uninterrupted.counts and resumed.counts["empty"] >= 1


def test_set_state_rejects_other_prompts_or_seed():
  it = prompt_batches.PromptIterator(_prompts(10), WordTokenizer(), batch_size=2, prompt_len=8, seed=0)
  other = prompt_batches.PromptIterator(_prompts(11), WordTokenizer(), batch_size=2, prompt_len=8, seed=0)
  with pytest.raises(ValueError, match="does not fit"):
    other.set_state(it.get_state())


def test_finite_epochs_drop_the_incomplete_last_batch():
  it = prompt_batches.PromptIterator(_prompts(10), WordTokenizer(), batch_size=4, prompt_len=8, shuffle=False,
                                     num_epochs=1)
  assert [b["text"] for b in it] == [_prompts(10)[:4], _prompts(10)[4:8]]
