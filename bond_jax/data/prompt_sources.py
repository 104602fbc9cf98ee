"""Where prompts come from (`config.data.source`): the shipped default, a prompt file, or a prepared TFDS dataset.

- "default": the shipped `bond_jax/assets/prompts.jsonl`, built offline into `data_dir` by the `bond_prompts`
  TFDS builder and read back through TFDS, the same path as "tfds";
- "prompt_file": a JSONL (texts under `text_key` or conversations under "messages") or text file (one prompt per
  line), eval held out by hash;
- "tfds": any TFDS dataset prepared (ArrayRecord) in `data_dir`, e.g. XSum with text_key="document".

Paths may be local or on an object store (`bond_jax.paths`). ArrayRecord files are read by random access from local
files only, so a remote `data_dir` stands for a local mirror (`paths.local_mirror`): "default" builds there, and
"tfds" copies the dataset's prepared files there first (once per machine).

Example:
  >>> import tempfile
  >>> train, held_out = load_prompt_splits("default", data_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
  Downloading and preparing dataset ...
  Dataset bond_prompts downloaded and prepared to ...
  >>> len(train), len(held_out)   # 2000 prompts, about 10% held out
  (1833, 167)
"""

import os

from bond_jax import data
from bond_jax import paths
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_files
from bond_jax.data import prompt_tfds
from bond_jax.tasks import default_assets


def load_prompt_splits(source: str, *, path: str = "", tfds_name: str = "", data_dir: str = "",
                       text_key: str = "prompt", train_split: str = "train", eval_split: str = "validation",
                       eval_fraction: float = 0.1
                       ) -> tuple[prompt_batches.TextSource, prompt_batches.TextSource]:
  """(train, eval) prompt texts with random access, for `prompt_batches.PromptIterator`.

  Args:
    source: "default" | "prompt_file" | "tfds" (see the module docstring).
    path: the prompt file, for "prompt_file".
    tfds_name: the TFDS dataset name, for "tfds".
    data_dir: the TFDS data_dir: where "default" builds its dataset, where "tfds" finds a prepared one.
    text_key: the JSON field (JSONL files) or TFDS feature holding the prompt text ("default": always "prompt").
    train_split, eval_split: TFDS split names (slices like "train[:1000]" work), for "tfds".
    eval_fraction: share of prompts held out by text hash, for "default" (when first built) and "prompt_file".
  """
  if source == "default":
    if not data_dir:
      raise ValueError("source='default' needs a data_dir to build the shipped prompts into.")
    data_dir = paths.local_mirror(data_dir)
    prompt_tfds.build_prompt_dataset(default_assets.PROMPTS_PATH, data_dir, "prompt", eval_fraction)
    return tuple(prompt_tfds.tfds_text_split(prompt_tfds.BondPrompts.name, data_dir, split, "prompt")
                 for split in ("train", "validation"))
  if source == "prompt_file":
    return prompt_files.split_holdout(prompt_files.read_prompt_file(path, text_key), eval_fraction)
  if source == "tfds":
    if not tfds_name or not data_dir:
      raise ValueError(f"source='tfds' needs tfds_name and data_dir, got tfds_name={tfds_name!r}, "
                       f"data_dir={data_dir!r}.")
    data_dir = _local_tfds_dir(data_dir, tfds_name)
    return tuple(prompt_tfds.tfds_text_split(tfds_name, data_dir, split, text_key)
                 for split in (train_split, eval_split))
  raise ValueError(f"source={source!r} is not a source of prompt files or datasets among {data.SOURCES}.")


def _local_tfds_dir(data_dir: str, tfds_name: str) -> str:
  """`data_dir` if local; else its local mirror, holding a copy of dataset `tfds_name`'s files (copied if absent)."""
  local = paths.local_mirror(data_dir)
  dataset = tfds_name.split(":")[0].split("/")[0]
  remote, copy = paths.as_path(data_dir) / dataset, paths.as_path(local) / dataset
  if paths.is_remote(data_dir) and not copy.is_dir() and remote.is_dir():  # Else TFDS reports it missing.
    # Copied aside and renamed into place: a copy cut short is never taken for the dataset.
    aside = copy.with_name(f"{dataset}.incomplete{os.getpid()}")
    paths.copy_files(remote, aside)
    aside.rename(copy)
  return local
