"""Hugging Face conversion: our forward (full and KV-cached) on converted weights equals the PyTorch reference models,
for every family, head and rope scaling we load; what we save loads in transformers with the same outputs."""

import dataclasses
import functools
import json
import logging
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_reference  # noqa: E402
from bond_jax import sampling, sharding  # noqa: E402
from bond_jax.models import hf, transformer  # noqa: E402
from bond_jax.models.config import Rotary  # noqa: E402

# name -> (family, head, hf_config overrides)
CASES = {f"{family}-{head}": (family, head, {}) for family in hf_reference.FAMILIES for head in hf_reference.HEADS}
CASES |= {f"llama-{name}": ("llama", "lm", dict(rope_parameters=dict(rope_theta=500.0, **rope)))
          for name, rope in hf_reference.ROPE_VARIANTS.items()}
CASES["llama-llama3"][2]["tie_word_embeddings"] = True  # Llama 3.2 1B/3B: llama3 rope and a tied head (SmolLM too)
LM_CASES = [name for name, (_, head, _) in CASES.items() if head == "lm"]
_forward = jax.jit(transformer.forward, static_argnames=("config", "output_start"))


@dataclasses.dataclass
class Reference:
  model: torch.nn.Module  # transformers' model
  path: str  # its checkpoint directory (saved by transformers)
  params: dict  # ours, loaded from `path`
  config: object  # our ModelConfig


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """name -> Reference, each built once per session (on first use)."""
  @functools.cache
  def build(name: str) -> Reference:
    family, head, overrides = CASES[name]
    model = hf_reference.hf_model(family, head, **overrides)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    params, config = hf.load_checkpoint(path)
    return Reference(model, path, params, config)
  return build


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


def _assert_matches_pytorch(ours, theirs, mask, head):
  if head == "lm":
    np.testing.assert_array_less(np.abs(ours - theirs)[mask].max(), 1e-4)
    assert theirs[mask].std() > 1.0  # The comparison is not vacuous: logits vary on the tolerance's scale.
  else:
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # HF pools the last non-pad token.
    np.testing.assert_allclose(ours[np.arange(len(last)), last], theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_pytorch(reference, name):
  ref = reference(name)
  tokens, mask = _batch()
  _assert_matches_pytorch(_ours(ref.params, ref.config, tokens, mask), hf_reference.hf_outputs(ref.model, tokens, mask),
                          mask, CASES[name][1])


@pytest.mark.parametrize("name", CASES)
def test_cached_decode_matches_full_forward(reference, name):
  """Prefill 4 slots of the batch (one row all pads), then decode one token at a time, past the sliding windows."""
  ref = reference(name)
  tokens, mask = _batch()
  positions = transformer.positions_from_mask(mask)
  out, cache = _forward(ref.params, ref.config, tokens[:, :4], positions[:, :4], mask[:, :4],
                        transformer.init_cache(ref.config, 3, tokens.shape[1]))
  steps = [out]
  for t in range(4, tokens.shape[1]):
    out, cache = _forward(ref.params, ref.config, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(out)
  cached = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(cached[mask], _ours(ref.params, ref.config, tokens, mask)[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_save_round_trips_through_transformers(reference, name, tmp_path):
  ref = reference(name)
  hf.save_checkpoint(ref.params, ref.config, tmp_path)
  reloaded = getattr(transformers, ref.model.config.architectures[0]).from_pretrained(tmp_path).eval()
  tokens, mask = _batch()
  np.testing.assert_allclose(hf_reference.hf_outputs(reloaded, tokens, mask),
                             hf_reference.hf_outputs(ref.model, tokens, mask), atol=1e-5, rtol=0)
  assert hf.read_config(tmp_path) == ref.config


def test_config_mapping(reference):
  gemma3 = reference("gemma3-lm").config
  assert (gemma3.norm_plus_one, gemma3.embed_scale, gemma3.post_norms, gemma3.tie_embeddings) == (True,) * 4
  assert (gemma3.qk_norm, gemma3.sliding_window, gemma3.query_pre_attn_scalar) == ("head", (4, None), 16)
  assert gemma3.rotary == (Rotary(theta=200.0), Rotary(theta=1000.0, kind="linear", factor=8.0))
  assert (gemma3.mlp_activation, gemma3.norm_eps, gemma3.family) == ("gelu_tanh", 1e-5, "gemma3")
  qwen = reference("qwen2-score").config
  assert (qwen.qkv_bias, qwen.head, qwen.num_labels, qwen.num_kv_heads, qwen.head_dim) == (True, "score", 1, 2, 8)
  assert (qwen.pad_token_id, qwen.bos_token_id, qwen.stop_token_ids, qwen.sliding_window) == (0, 1, (2,), (None, 4))
  olmo = reference("olmo2-lm").config
  assert (olmo.pre_norms, olmo.post_norms, olmo.qk_norm) == (False, True, "projection")
  yarn = reference("llama-yarn").config.rotary[0]
  assert (yarn.kind, yarn.factor, yarn.original_max_len) == ("yarn", 4.0, 16)
  np.testing.assert_allclose(yarn.attention_factor, 0.1 * np.log(4.0) + 1)
  legacy_gemma = hf.config_to_hf(reference("gemma-lm").config)
  legacy_gemma.update(hidden_act="gelu", pad_token_id=None, eos_token_id=[5, 7])
  legacy = hf.config_from_hf(legacy_gemma)
  assert (legacy.mlp_activation, legacy.stop_token_ids, legacy.pad_token_id) == ("gelu_tanh", (5, 7), None)
  with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
    hf.config_from_hf(legacy_gemma | dict(model_type="llama", architectures=["LlamaForCausalLM"]))


def _write_like(src, dst, config_json, tensors=None):
  """`dst` with `src`'s weights (or `tensors`) and the given config.json dict."""
  os.makedirs(dst, exist_ok=True)
  save_file(tensors if tensors is not None else load_file(os.path.join(src, hf.WEIGHTS_FILE)),
            os.path.join(dst, hf.WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(dst, hf.CONFIG_FILE), "w") as f:
    json.dump(config_json, f)
  return dst


@pytest.mark.parametrize("name, legacy_keys", [
    # As on the Hub today (transformers 4.4x-4.5x layouts): flat rope keys, window patterns instead of layer_types.
    ("gemma3-lm", dict(rope_scaling=dict(rope_type="linear", factor=8.0), rope_theta=1000.0,
                       rope_local_base_freq=200.0, sliding_window_pattern=2)),
    ("llama-llama3", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=16), rope_theta=500.0)),
    ("qwen2-lm", dict(rope_theta=500.0)),  # use_sliding_window + max_window_layers, no layer_types
])
def test_old_config_layouts_load_alike(reference, tmp_path, name, legacy_keys):
  ref = reference(name)
  with open(os.path.join(ref.path, hf.CONFIG_FILE)) as f:
    legacy = {k: v for k, v in json.load(f).items() if k not in ("rope_parameters", "layer_types")}
  path = _write_like(ref.path, tmp_path, legacy | legacy_keys)
  assert hf.read_config(path) == ref.config
  reloaded = getattr(transformers, legacy["architectures"][0]).from_pretrained(path).eval()
  tokens, mask = _batch()
  np.testing.assert_allclose(hf_reference.hf_outputs(reloaded, tokens, mask),
                             hf_reference.hf_outputs(ref.model, tokens, mask), atol=1e-5, rtol=0)


def test_sharded_and_bfloat16_checkpoints(reference, tmp_path):
  ref = reference("llama-lm")
  ref.model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / hf.WEIGHTS_INDEX_FILE)
  sharded, _ = hf.load_checkpoint(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, sharded, ref.params)

  bf16_model = hf_reference.hf_model("llama", "lm").to(torch.bfloat16)
  bf16_model.save_pretrained(tmp_path / "bf16")
  # Weights in another layout beside the HF ones (as Mistral ships consolidated.safetensors): not the model's.
  save_file({"layers.0.attention.wq.weight": np.zeros((2, 2), np.float32)},
            tmp_path / "bf16" / "consolidated.safetensors")
  as_bf16, config = hf.load_checkpoint(tmp_path / "bf16", dtype="bfloat16")
  assert config.dtype == config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(as_bf16)} == {jax.numpy.dtype("bfloat16")}
  as_f32, _ = hf.load_checkpoint(tmp_path / "bf16")
  # bf16 -> f32 is exact, so the f32 load equals the bf16 reference weights widened.
  want = bf16_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(as_f32["layer_1"]["attn"]["q"]["kernel"]).reshape(32, -1).T, want)


# olmo2: q/k norms over whole projections, replicated by the sharding rules' catch-all; phi3: q/k/v and gate/up
# fused in one tensor, split on the mesh; gemma-score: a classifier head. Bands of rows per device that cut heads,
# tensors whose rows the devices do not divide (padded), bfloat16 on the mesh.
@pytest.mark.parametrize("name,mesh_shape,dtype", [("olmo2-lm", (1, 4, 2), "float32"),
                                                   ("phi3-lm", (2, 2, 2), "bfloat16"),
                                                   ("gemma-score", (1, 8, 1), "float32")])
def test_load_onto_mesh(reference, name, mesh_shape, dtype):
  ref = reference(name)
  mesh = sharding.make_mesh(mesh_shape)
  placed, _ = hf.load_checkpoint(ref.path, dtype=dtype, mesh=mesh)
  want = sharding.param_shardings(ref.params, mesh)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
               placed, want)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y.astype(dtype)), placed, ref.params)
  assert {x.dtype for x in jax.tree.leaves(placed)} == {np.dtype(dtype)}


@pytest.mark.parametrize("stored_head", ["different", "equal", "only"])
def test_tied_config_with_a_stored_head_loads_as_transformers_does(reference, tmp_path, caplog, stored_head):
  """Tied config, and the file stores lm_head.weight: transformers keeps a different one (untied, with a warning),
  ties an equal one, and takes a lone one as the shared matrix."""
  ref = reference("gemma-lm")
  tensors = load_file(os.path.join(ref.path, hf.WEIGHTS_FILE))
  embedding = tensors[hf.EMBEDDING]
  tensors[hf.LM_HEAD] = {"different": embedding[::-1].copy(), "equal": embedding, "only": embedding[::-1].copy()}[
      stored_head]
  if stored_head == "only":
    del tensors[hf.EMBEDDING]
  with open(os.path.join(ref.path, hf.CONFIG_FILE)) as f:
    path = _write_like(ref.path, tmp_path, json.load(f), tensors)
  with caplog.at_level(logging.WARNING):
    params, config = hf.load_checkpoint(path)
  assert (hf.LM_HEAD in caplog.text) == (stored_head == "different")
  assert config.tie_embeddings == (stored_head != "different")
  reloaded = transformers.GemmaForCausalLM.from_pretrained(path).eval()
  tokens, mask = _batch()
  theirs = hf_reference.hf_outputs(reloaded, tokens, mask)
  _assert_matches_pytorch(_ours(params, config, tokens, mask), theirs, mask, "lm")
  if stored_head != "equal":  # The head really changed the logits.
    assert np.abs(theirs - hf_reference.hf_outputs(ref.model, tokens, mask))[mask].max() > 1.0


@pytest.mark.parametrize("case, edit_tensors, edit_config, match", [
    ("llama-lm", None, lambda c: c.update(architectures=["MistralForCausalLM"]),
     "model_type='llama' does not match architecture 'MistralForCausalLM'"),
    ("llama-lm", None, lambda c: c.update(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"),
     "Unsupported architecture 'Gemma3ForConditionalGeneration'"),
    ("llama-lm", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None,
     r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
    ("llama-lm", lambda t: t.update(extra=np.zeros(2, np.float32)), None, r"unexpected \['extra'\]"),
    ("llama-lm", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}), None,
     r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"),
    ("qwen3-lm", lambda t: t.pop("model.layers.0.self_attn.k_norm.weight"), None,
     r"missing \['model.layers.0.self_attn.k_norm.weight'\]"),
    ("llama-lm", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}), None,
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\); the config implies \(16, 32\)"),
    ("phi3-lm", None, lambda c: c.update(rope_parameters=dict(
        rope_type="longrope", rope_theta=1.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
        original_max_position_embeddings=32)),
     "rope_type='longrope' is not supported"),
    ("phi3-lm", None, lambda c: c.update(partial_rotary_factor=0.5, rope_parameters=None),
     "partial_rotary_factor=0.5 is not supported"),
    ("llama-lm", None, lambda c: c.update(attention_bias=True), "attention_bias=True is not supported"),
    ("gemma3-lm", None, lambda c: c.update(use_bidirectional_attention=True),
     "use_bidirectional_attention=True is not supported"),
    ("llama-lm", None, lambda c: c.update(pad_token_id=[0, 1]),
     "rejected by transformers: Validation error for field 'pad_token_id'"),
])
def test_load_errors_name_the_problem(reference, tmp_path, case, edit_tensors, edit_config, match):
  src = reference(case).path
  tensors = load_file(os.path.join(src, hf.WEIGHTS_FILE))
  with open(os.path.join(src, hf.CONFIG_FILE)) as f:
    config = json.load(f)
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  with pytest.raises(ValueError, match=match):
    hf.load_checkpoint(_write_like(src, tmp_path, config, tensors))


def test_save_errors(reference, tmp_path):
  ref = reference("llama-lm")
  with pytest.raises(ValueError, match="No Hugging Face architecture of family 'llama' has the model features"):
    hf.save_checkpoint(ref.params, dataclasses.replace(ref.config, embed_scale=True), tmp_path)
  with pytest.raises(ValueError, match="sliding windows differ across layers"):
    hf.save_checkpoint(ref.params, dataclasses.replace(ref.config, family="mistral", sliding_window=(4, None)),
                       tmp_path)
  bad = jax.tree.map(lambda x: x, ref.params)
  bad["layer_0"]["mlp"]["up"]["kernel"] = bad["layer_0"]["mlp"]["up"]["kernel"][:, :5]
  with pytest.raises(ValueError, match="'layer_0/mlp/up/kernel' has shape"):
    hf.save_checkpoint(bad, ref.config, tmp_path)


@pytest.mark.parametrize("where", ["generation_config", "config"])
def test_generation_stops_where_generate_stops(reference, tmp_path, where):
  """Several stop ids, declared in generation_config.json (the extra one only there) or in config.json alone: our
  greedy sampler stops exactly where transformers' greedy `generate` stops, on a left-padded batch."""
  model = reference("llama-lm").model
  prompts = torch.tensor([[hf_reference.PAD, 1, 5, 9], [1, 7, 3, 4]])
  prompt_mask = prompts != hf_reference.PAD
  new = 10

  def generate(m, **kwargs):
    with torch.no_grad():
      out = m.generate(prompts, attention_mask=prompt_mask.long(), max_new_tokens=new, do_sample=False,
                       pad_token_id=hf_reference.PAD, **kwargs)
    return out[:, prompts.shape[1]:].numpy()

  free = generate(model, eos_token_id=None)
  # The second stop id is a token row 0 first emits at step 2 or later; the first one never appears.
  second = next(t for t in free[0, 2:] if t not in free[0, :2] and t not in free[1, :2])
  first = next(t for t in range(3, hf_reference.VOCAB) if t not in free)
  model.config.eos_token_id = int(first) if where == "generation_config" else [int(first), int(second)]
  model.generation_config = transformers.GenerationConfig(eos_token_id=[int(first), int(second)],
                                                          pad_token_id=hf_reference.PAD)
  model.save_pretrained(tmp_path)
  if where == "config":
    os.remove(tmp_path / hf.GENERATION_CONFIG_FILE)
  theirs = generate(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval())

  params, config = hf.load_checkpoint(tmp_path)
  assert config.stop_token_ids == (first, second)
  out = sampling.sample(params, prompts.numpy(), prompt_mask.numpy(), jax.random.key(0),
                        sampling.SamplingConfig(max_new_tokens=new, greedy=True, stop_token_ids=config.stop_token_ids,
                                                pad_token_id=sampling.fill_token_id(config)), config)
  tokens, mask = np.asarray(out.tokens)[:, 0], np.asarray(out.mask)[:, 0]
  assert 0 < mask[0].sum() < new  # row 0 stopped early
  np.testing.assert_array_equal(np.where(mask, tokens, hf_reference.PAD), theirs)


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
  with pytest.raises(ValueError, match="is not a directory"):
    hf.load_tokenizer(tmp_path / "missing")
