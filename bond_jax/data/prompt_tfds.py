"""Prompts through TensorFlow Datasets, offline and without TensorFlow: ArrayRecord files read by random access.

`BondPrompts` (registered as "bond_prompts") builds a prompt file (JSONL or text, see `prompt_files`) into a TFDS
`data_dir` with splits "train" and "validation" (held out by a hash of the text); `build_prompt_dataset` wraps
it. `tfds_text_split` reads one text feature of one split of any TFDS dataset prepared in a `data_dir` in the
ArrayRecord format: ours, or e.g. XSum (feature "document") prepared by the user with
`tfds build xsum --data_dir=DIR --file_format=array_record`.

Example:
  >>> import tempfile
  >>> from bond_jax.tasks import default_assets
  >>> data_dir = tempfile.mkdtemp()
  >>> build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir=data_dir)  # doctest: +ELLIPSIS
  Downloading and preparing dataset ...
  Dataset bond_prompts downloaded and prepared to ...
  >>> train = tfds_text_split("bond_prompts", data_dir=data_dir, split="train", text_key="prompt")
  >>> len(train), type(train[0])   # random access; items are str or bytes
  (1833, <class 'bytes'>)
"""

import hashlib
import json

from absl import logging
import tensorflow_datasets as tfds

from bond_jax import paths
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_files

PROMPT_FEATURE = "prompt"


class BondPrompts(tfds.core.GeneratorBasedBuilder):
  """A prompt file as a TFDS dataset: feature "prompt" (text), splits "train" and "validation".

  Reading a prepared dataset needs no arguments (`tfds.builder("bond_prompts", data_dir=...)`); generating one
  needs `source_path`. Undecodable lines are stored as their raw bytes, so the iterator can count and skip them.
  Text prompts only: a prompt file holding conversations ("messages") is read directly (source "prompt_file").
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prompt files (JSONL or text) with a hash-based validation split."}

  def __init__(self, *, source_path: str | None = None, text_key: str = "prompt", eval_fraction: float = 0.1,
               **kwargs):
    self._source_path = source_path
    self._text_key = text_key
    self._eval_fraction = eval_fraction
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # Nothing is downloaded, so there are no URL checksums to find. (TFDS's own lookup of its checksum file
  # imports `importlib_resources`, which TFDS does not declare as a dependency on Python >= 3.9.)
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None

  def source_fingerprint(self) -> str:
    """sha256 of the source file's bytes and the build arguments (empty when reading, not generating)."""
    if self._source_path is None:
      return ""
    digest = hashlib.sha256(paths.as_path(self._source_path).read_bytes())
    digest.update(json.dumps([self._text_key, self._eval_fraction]).encode())
    return digest.hexdigest()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Prompts for BOND, one per example.",
        features=tfds.features.FeaturesDict({PROMPT_FEATURE: tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(source_fingerprint=self.source_fingerprint()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if self._source_path is None:
      raise ValueError("BondPrompts needs source_path=<prompt file> to generate the dataset.")
    prompts = prompt_files.read_prompt_file(self._source_path, self._text_key)
    train, held_out = prompt_files.split_holdout(prompts, self._eval_fraction)
    return {"train": self._generate_examples(train), "validation": self._generate_examples(held_out)}

  def _generate_examples(self, prompts):
    for i, prompt in enumerate(prompts):
      if not isinstance(prompt, str):
        raise prompt_batches.PromptError(
            f"{self._source_path}: prompt {i} is a conversation; {self.name!r} stores text prompts only (read a "
            "file of conversations with data.source = 'prompt_file').")
      yield i, {PROMPT_FEATURE: prompt.encode("utf-8", "surrogateescape")}


def build_prompt_dataset(source_path: str, data_dir: str, text_key: str = "prompt",
                         eval_fraction: float = 0.1) -> None:
  """Builds `source_path` into `data_dir` as "bond_prompts" (ArrayRecord), or reuses an identical earlier build.

  Raises ValueError if `data_dir` already holds "bond_prompts" built from other content or arguments (delete it
  or pick another `data_dir`). In a multi-host job call it on one host per file system, then read on all.

  Example:
    >>> import tempfile
    >>> from bond_jax.tasks import default_assets
    >>> data_dir = tempfile.mkdtemp()
    >>> build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir, eval_fraction=0.1)  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    Dataset bond_prompts downloaded and prepared to ...
    >>> build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir, eval_fraction=0.2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: data_dir=... already holds 'bond_prompts' built from other prompts or arguments than ...
  """
  builder = BondPrompts(source_path=source_path, text_key=text_key, eval_fraction=eval_fraction,
                        data_dir=data_dir)
  if builder.is_prepared():
    stored = tfds.builder(BondPrompts.name, data_dir=data_dir).info.metadata.get("source_fingerprint")
    if stored != builder.source_fingerprint():
      raise ValueError(
          f"data_dir={data_dir!r} already holds {BondPrompts.name!r} built from other prompts or arguments than "
          f"source_path={source_path!r}, text_key={text_key!r}, eval_fraction={eval_fraction}; delete "
          f"{builder.data_dir} or use another data_dir.")
    logging.info("Reusing %s prepared at %s.", BondPrompts.name, builder.data_dir)
    return
  builder.download_and_prepare()
  logging.info("Built %s from %s into %s: %s.", BondPrompts.name, source_path, builder.data_dir,
               {name: split.num_examples for name, split in builder.info.splits.items()})


class TextColumn:
  """Random access to one text feature of a TFDS data source: `column[i]` is that feature of record i."""

  def __init__(self, data_source, text_key: str):
    self._source = data_source
    self._key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str | bytes:
    return self._source[index][self._key]


def tfds_text_split(name: str, data_dir: str, split: str, text_key: str) -> TextColumn:
  """Feature `text_key` of split `split` of TFDS dataset `name` prepared (ArrayRecord) in `data_dir`.

  Never downloads or prepares. Raises `prompt_batches.PromptError` naming what is missing: the dataset, the split
  or the feature.

  Example:
    >>> import tempfile
    >>> tfds_text_split("my_documents", tempfile.mkdtemp(), split="train", text_key="document")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bond_jax.data.prompt_encoding.PromptError: TFDS dataset name='my_documents' is neither registered nor prepared ...
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise prompt_batches.PromptError(
        f"TFDS dataset name={name!r} is neither registered nor prepared in data_dir={data_dir!r}.") from e
  if not builder.is_prepared():
    raise prompt_batches.PromptError(
        f"TFDS dataset name={name!r} is not prepared in data_dir={data_dir!r}; prepare it offline first, e.g. "
        f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` (for {BondPrompts.name!r}: "
        "`build_prompt_dataset`).")
  if split.split("[")[0] not in builder.info.splits:
    raise prompt_batches.PromptError(
        f"split={split!r} is not a split of {name!r}; it has {sorted(builder.info.splits)}.")
  features = builder.info.features
  if text_key not in features:
    raise prompt_batches.PromptError(
        f"text_key={text_key!r} is not a feature of {name!r}; it has {sorted(features.keys())}.")
  if not isinstance(features[text_key], tfds.features.Text):
    raise prompt_batches.PromptError(
        f"text_key={text_key!r} of {name!r} is a {type(features[text_key]).__name__}, not Text.")
  return TextColumn(builder.as_data_source(split=split), text_key)
