r"""Pretrains a task's reference policy: a tiny Llama-style LM on the task's corpus (default: the review corpus).

  python experiments/pretrain.py [--steps=1500] [--out=bond_jax/assets/policy]
  python experiments/pretrain.py --task=arithmetic --steps=1500 --seq_len=12   # -> bond_jax/assets/arithmetic/policy
  python experiments/pretrain.py --d_model=256 --steps=500 --out=/tmp/models/d256   # a wider review LM (3.3M)

For `--task=review` the corpus and tokenizer come from `bond_jax/assets` (`experiments/make_default_assets.py`);
for `--task=arithmetic` from `bond_jax.tasks.arithmetic` (a generated corpus, its shipped tokenizer). The result is a
Hugging Face checkpoint directory (config.json + model.safetensors + tokenizer), loadable by `bond_jax.models.hf`
and by `transformers`. It is what `configs/default.py` fine-tunes with BOND. Deterministic for a given seed on a
given machine; takes a few minutes on 2 CPU cores.
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bond_jax import losses
from bond_jax.models import hf
from bond_jax.models import transformer
from bond_jax.models.config import ModelConfig
from bond_jax.run_components import DEFAULT_POLICY_DIR
from bond_jax.tasks import arithmetic
from bond_jax.tasks import default_assets

_TASK = flags.DEFINE_enum("task", "review", ["review", "arithmetic"], "Corpus, tokenizer and model shape.")

_STEPS = flags.DEFINE_integer("steps", 1500, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch", 64, "Reviews per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 48, "Tokens per training sequence (BOS + review + EOS, padded).")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (cosine decay after warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds init and batch order.")
_OUT = flags.DEFINE_string("out", "", "Output checkpoint directory; empty: the task's shipped policy directory.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", None, "Review task: transformer blocks (default: the shipped 4).")
_D_MODEL = flags.DEFINE_integer("d_model", None, "Review task: width, a multiple of 64 (default: the shipped 128); "
                                "heads of 32 dimensions (half as many key/value heads) and an MLP of 3 x d_model.")


def policy_config(tokenizer, num_layers: int = 4, d_model: int = 128) -> ModelConfig:
  """The shipped policy's shape (4 layers, d_model 128: ~0.9M parameters), context 64 (prompt 16 + 24 new tokens
  fit easily); other depths and widths keep its head size (32), its 2 query heads per key/value head and its MLP
  of 3 x d_model (the capacity study of README's "Against the Best-of-N frontier")."""
  if d_model % 64:
    raise app.UsageError(f"--d_model must be a multiple of 64 (heads of 32, 2 per key/value head), got {d_model}.")
  return ModelConfig(vocab_size=len(tokenizer), num_layers=num_layers, d_model=d_model, num_heads=d_model // 32,
                     num_kv_heads=d_model // 64, head_dim=32, mlp_dim=3 * d_model, max_seq_len=64, tie_embeddings=True,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     stop_token_ids=(tokenizer.eos_token_id,))


def arithmetic_policy_config(tokenizer) -> ModelConfig:
  """The arithmetic task's policy: ~0.1M parameters, context 16 (prompt 8 + 3 new tokens)."""
  return ModelConfig(vocab_size=len(tokenizer), num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=256, max_seq_len=16, tie_embeddings=True,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     stop_token_ids=(tokenizer.eos_token_id,))


def review_lines() -> list[str]:
  with open(default_assets.CORPUS_PATH, encoding="utf-8") as f:
    return f.read().splitlines()


# task -> (tokenizer directory, corpus lines, model config, default output directory)
TASKS = {
    "review": (default_assets.TOKENIZER_DIR, review_lines, policy_config, DEFAULT_POLICY_DIR),
    "arithmetic": (arithmetic.TOKENIZER_DIR, arithmetic.corpus_lines, arithmetic_policy_config, arithmetic.POLICY_DIR),
}


def encode_corpus(tokenizer, lines: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Lines as `[num_lines, seq_len]` tokens (BOS line EOS, right-padded, truncated) and their mask."""
  tokens = np.full((len(lines), seq_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(lines), seq_len), bool)
  for i, line in enumerate(lines):
    ids = (tokenizer.encode(line) + [tokenizer.eos_token_id])[:seq_len]  # encode adds BOS.
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
  return tokens, mask


def main(argv):
  del argv
  tokenizer_dir, corpus, make_config, default_out = TASKS[_TASK.value]
  out = _OUT.value or default_out
  tokenizer = default_assets.load_tokenizer(tokenizer_dir)
  shape = {name: flag.value for name, flag in (("num_layers", _NUM_LAYERS), ("d_model", _D_MODEL))
           if flag.value is not None}
  if shape and _TASK.value != "review":
    raise app.UsageError(f"--num_layers and --d_model shape the review task's policy only, not {_TASK.value!r}'s.")
  config = make_config(tokenizer, **shape)
  tokens, mask = encode_corpus(tokenizer, corpus(), _SEQ_LEN.value)
  schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, min(100, _STEPS.value // 10), _STEPS.value, _LR.value / 20)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  params = transformer.init_params(config, jax.random.PRNGKey(_SEED.value))
  opt_state = optimizer.init(params)
  print(f"policy: {sum(x.size for x in jax.tree.leaves(params)):,} parameters; corpus: {len(tokens):,} lines")

  @jax.jit
  def update(params, opt_state, batch_tokens, batch_mask):
    def nll(p):
      logits, _ = transformer.forward(p, config, batch_tokens[:, :-1], transformer.positions_from_mask(
          batch_mask[:, :-1]), batch_mask[:, :-1])
      target_mask = batch_mask[:, 1:]
      return -jnp.sum(losses.sequence_log_probs(logits, batch_tokens[:, 1:], target_mask)) / jnp.sum(target_mask)
    loss, grads = jax.value_and_grad(nll)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(_SEED.value)
  start = time.perf_counter()
  for step in range(1, _STEPS.value + 1):
    rows = rng.integers(0, len(tokens), _BATCH.value)
    params, opt_state, loss = update(params, opt_state, tokens[rows], mask[rows])
    if step % 100 == 0 or step == _STEPS.value:
      print(f"step {step:5d}  loss {float(loss):.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)

  hf.save_checkpoint(jax.device_get(params), config, out)
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), out)
  print(f"saved {out}")


if __name__ == "__main__":
  app.run(main)
