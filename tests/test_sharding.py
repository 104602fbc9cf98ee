"""Sharding: partition rules give the intended specs, fall back when indivisible, and keep logits unchanged."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from bond_jax import sharding
from bond_jax.models import forward, init_params, positions_from_mask, tiny


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((2, 2, 2))


def test_make_mesh_shapes():
  assert dict(sharding.make_mesh((-1, 1, 2)).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="mesh_shape"):
    sharding.make_mesh((3, 1, 2))
  with pytest.raises(ValueError, match="mesh_shape"):
    sharding.make_mesh((-1, -1, 2))


def test_default_rules_assign_intended_specs(mesh):
  params = jax.eval_shape(lambda: init_params(tiny(qkv_bias=True, post_norms=True), jax.random.key(0)))
  specs = sharding.param_partition_specs(params, mesh=mesh)
  layer = specs["layer_1"]
  assert specs["embedder"]["embedding"] == P("tensor", "fsdp")
  assert layer["attn"]["q"]["kernel"] == P("fsdp", "tensor", None)
  assert layer["attn"]["k"]["bias"] == P("tensor", None)
  assert layer["attn"]["o"]["kernel"] == P("tensor", None, "fsdp")
  assert layer["mlp"]["gate"]["kernel"] == P("fsdp", "tensor")
  assert layer["mlp"]["up"]["kernel"] == P("fsdp", "tensor")
  assert layer["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
  assert layer["post_mlp_norm"]["scale"] == P(None)
  assert specs["final_norm"]["scale"] == P(None)
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")


def test_indivisible_dims_fall_back_to_replication(mesh):
  params = jax.eval_shape(lambda: init_params(
      tiny(vocab_size=63, num_kv_heads=1, head="score", num_labels=3), jax.random.key(0)))
  specs = sharding.param_partition_specs(params, mesh=mesh)
  assert specs["embedder"]["embedding"] == P(None, "fsdp")
  assert specs["layer_0"]["attn"]["k"]["kernel"] == P("fsdp", None, None)
  assert specs["layer_0"]["attn"]["q"]["kernel"] == P("fsdp", "tensor", None)
  assert specs["score"]["kernel"] == P("fsdp", None)
  # Without a mesh the rules are returned as written.
  assert sharding.param_partition_specs(params)["embedder"]["embedding"] == P("tensor", "fsdp")


def test_unmatched_parameter_is_an_error():
  with pytest.raises(ValueError, match="norm/scale"):
    sharding.param_partition_specs({"norm": {"scale": jnp.ones(3)}}, rules=((r"kernel$", P()),))


def test_sharded_forward_matches_single_device(mesh):
  config = tiny(qkv_bias=True)
  params = init_params(config, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 6)), jnp.int32)
  mask = jnp.asarray(np.arange(6)[None, :] >= np.arange(8)[:, None] % 3)
  expected = forward(params, config, tokens, positions_from_mask(mask), mask)[0]

  shardings = sharding.param_shardings(params, mesh)
  sharded_params = jax.device_put(params, shardings)
  embedding = sharded_params["embedder"]["embedding"]
  assert embedding.addressable_shards[0].data.shape == (32, 16)  # vocab over tensor, d_model over fsdp
  batch = sharding.batch_sharding(mesh, 2)
  assert batch.spec == P(("data", "fsdp"), None)
  tokens, mask = jax.device_put((tokens, mask), batch)
  run = jax.jit(lambda p, t, m: forward(p, config, t, positions_from_mask(m), m)[0])
  logits = run(sharded_params, tokens, mask)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
