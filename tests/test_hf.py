"""Hugging Face conversion: our forward on converted weights equals the PyTorch reference models."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_reference  # noqa: E402
from bond_jax import sharding  # noqa: E402
from bond_jax.models import hf, transformer  # noqa: E402

CASES = [(family, head) for family in hf_reference.FAMILIES for head in hf_reference.HEADS]
_forward = jax.jit(transformer.forward, static_argnums=1)


def _batch():
  """Tokens [3, 9]: a full row, a right-padded row and a left-padded row; pad id never used by real tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, hf_reference.VOCAB, size=(3, 9))
  mask = np.ones((3, 9), bool)
  mask[1, 6:] = False
  mask[2, :4] = False
  return np.where(mask, tokens, hf_reference.PAD).astype(np.int32), mask


def _ours(params, config, tokens, mask):
  out, _ = _forward(params, config, tokens, transformer.positions_from_mask(mask), mask)
  return np.asarray(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(family, head) -> (torch model, checkpoint directory saved by transformers)."""
  out = {}
  for family, head in CASES:
    model = hf_reference.hf_model(family, head)
    path = tmp_path_factory.mktemp(f"{family}_{head}")
    model.save_pretrained(path)
    out[family, head] = (model, str(path))
  return out


@pytest.mark.parametrize("family,head", CASES)
def test_outputs_match_pytorch(checkpoints, family, head):
  model, path = checkpoints[family, head]
  params, config = hf.load_checkpoint(path)
  tokens, mask = _batch()
  ours, theirs = _ours(params, config, tokens, mask), hf_reference.hf_outputs(model, tokens, mask)
  if head == "lm":
    np.testing.assert_array_less(np.abs(ours - theirs)[mask].max(), 1e-4)
    assert theirs[mask].std() > 1.0  # The comparison is not vacuous: logits vary on the tolerance's scale.
  else:
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # HF pools the last non-pad token.
    np.testing.assert_allclose(ours[np.arange(len(last)), last], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,head", CASES)
def test_save_round_trips_through_transformers(checkpoints, family, head, tmp_path):
  model, path = checkpoints[family, head]
  params, config = hf.load_checkpoint(path)
  hf.save_checkpoint(params, config, tmp_path)
  reloaded = getattr(transformers, model.config.architectures[0]).from_pretrained(tmp_path).eval()
  tokens, mask = _batch()
  np.testing.assert_array_equal(
      hf_reference.hf_outputs(reloaded, tokens, mask), hf_reference.hf_outputs(model, tokens, mask))
  assert hf.config_from_hf(json.load(open(tmp_path / hf.CONFIG_FILE))) == config


def test_config_mapping(checkpoints):
  config = hf.config_from_hf(checkpoints["gemma2", "lm"][0].config)
  assert (config.norm_plus_one, config.embed_scale, config.post_norms, config.tie_embeddings) == (True,) * 4
  assert (config.attn_logit_softcap, config.final_logit_softcap, config.query_pre_attn_scalar) == (3.0, 4.0, 16)
  assert (config.mlp_activation, config.rope_theta, config.norm_eps) == ("gelu_tanh", 500.0, 1e-5)
  qwen = hf.config_from_hf(checkpoints["qwen2", "score"][0].config)
  assert (qwen.qkv_bias, qwen.head, qwen.num_labels, qwen.num_kv_heads, qwen.head_dim) == (True, "score", 1, 2, 8)
  assert (qwen.pad_token_id, qwen.bos_token_id, qwen.eos_token_id) == (0, 1, 2)
  legacy_gemma = hf.config_to_hf(hf.config_from_hf(checkpoints["gemma", "lm"][0].config))
  legacy_gemma.update(hidden_act="gelu", hidden_activation=None, pad_token_id=None, eos_token_id=[5, 7])
  legacy = hf.config_from_hf(legacy_gemma)
  assert (legacy.mlp_activation, legacy.eos_token_id, legacy.pad_token_id) == ("gelu_tanh", 5, 5)
  with pytest.raises(ValueError, match="Unsupported hidden activation 'gelu'"):
    hf.config_from_hf(legacy_gemma | dict(model_type="llama", architectures=["LlamaForCausalLM"]))


def test_sharded_and_bfloat16_checkpoints(checkpoints, tmp_path):
  model, path = checkpoints["llama", "lm"]
  reference, _ = hf.load_checkpoint(path)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / hf.WEIGHTS_INDEX_FILE)
  sharded, _ = hf.load_checkpoint(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, sharded, reference)

  bf16_model = hf_reference.hf_model("llama", "lm").to(torch.bfloat16)
  bf16_model.save_pretrained(tmp_path / "bf16")
  as_bf16, config = hf.load_checkpoint(tmp_path / "bf16", dtype="bfloat16")
  assert config.dtype == config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(as_bf16)} == {jax.numpy.dtype("bfloat16")}
  as_f32, _ = hf.load_checkpoint(tmp_path / "bf16")
  # bf16 -> f32 is exact, so the f32 load equals the bf16 reference weights widened.
  want = bf16_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(as_f32["layer_1"]["attn"]["q"]["kernel"]).reshape(32, -1).T, want)


def test_load_onto_mesh(checkpoints):
  path = checkpoints["qwen2", "lm"][1]
  mesh = sharding.make_mesh((1, 4, 2))
  placed, _ = hf.load_checkpoint(path, mesh=mesh)
  reference, _ = hf.load_checkpoint(path)
  want = sharding.param_shardings(reference, mesh)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
               placed, want)
  jax.tree.map(np.testing.assert_array_equal, placed, reference)


def test_tied_checkpoint_storing_lm_head_loads(checkpoints, tmp_path):
  """Some tied checkpoints store the shared matrix twice; the copy is ignored."""
  _, path = checkpoints["gemma", "lm"]
  tensors = load_file(os.path.join(path, hf.WEIGHTS_FILE))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  save_file(tensors, tmp_path / hf.WEIGHTS_FILE)
  with open(tmp_path / hf.CONFIG_FILE, "w") as f:
    f.write(open(os.path.join(path, hf.CONFIG_FILE)).read())
  params, _ = hf.load_checkpoint(tmp_path)
  reference, _ = hf.load_checkpoint(path)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def _copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
  tensors = load_file(os.path.join(src, hf.WEIGHTS_FILE))
  config = json.load(open(os.path.join(src, hf.CONFIG_FILE)))
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  save_file(tensors, os.path.join(dst, hf.WEIGHTS_FILE))
  json.dump(config, open(os.path.join(dst, hf.CONFIG_FILE), "w"))
  return dst


@pytest.mark.parametrize("edit_tensors,edit_config,match", [
    (None, lambda c: c.update(architectures=["MistralForCausalLM"]), "MistralForCausalLM"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None, r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda t: t.update(extra=np.zeros(2, np.float32)), None, r"unexpected \['extra'\]"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}), None,
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\); the config implies \(16, 32\)"),
    (None, lambda c: c.update(rope_parameters=dict(rope_type="llama3", rope_theta=1.0)), "llama3"),
])
def test_load_errors_name_the_problem(checkpoints, tmp_path, edit_tensors, edit_config, match):
  path = _copy_checkpoint(checkpoints["llama", "lm"][1], tmp_path, edit_tensors, edit_config)
  with pytest.raises(ValueError, match=match):
    hf.load_checkpoint(path)


def test_save_errors(checkpoints, tmp_path):
  params, config = hf.load_checkpoint(checkpoints["llama", "lm"][1])
  with pytest.raises(ValueError, match="No Hugging Face architecture"):
    hf.save_checkpoint(params, dataclasses.replace(config, embed_scale=True), tmp_path)
  bad = jax.tree.map(lambda x: x, params)
  bad["layer_0"]["mlp"]["up"]["kernel"] = bad["layer_0"]["mlp"]["up"]["kernel"][:, :5]
  with pytest.raises(ValueError, match="'layer_0/mlp/up/kernel' has shape"):
    hf.save_checkpoint(bad, config, tmp_path)


def test_load_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  sentences = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"]
  model = tokenizers.models.WordLevel(unk_token="[UNK]")
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(sentences, tokenizers.trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
  fast.save_pretrained(tmp_path)
  loaded = hf.load_tokenizer(tmp_path)
  assert loaded("the dog sat")["input_ids"] == [tok.token_to_id(w) for w in ("the", "dog", "sat")]
  assert loaded.pad_token_id == 0
  with pytest.raises(ValueError, match="not a local directory"):
    hf.load_tokenizer(tmp_path / "missing")
