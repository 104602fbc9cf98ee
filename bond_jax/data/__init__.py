"""Prompt data: files and TFDS datasets of prompts, and the batches the trainer consumes."""
