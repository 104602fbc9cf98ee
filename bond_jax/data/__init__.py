"""Prompt data: files and TFDS datasets of prompts, and the batches the trainer consumes."""

# Where a run's prompts come from (`config.data.source`): the shipped prompts, a prompt file, a prepared TFDS dataset
# (`prompt_sources.load_prompt_splits`), or the config's own list (`run_components.load_prompts`).
SOURCES = ("default", "prompt_file", "tfds", "inline")
