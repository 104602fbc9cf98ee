"""Decoder-only transformer models: config, parameters, forward pass and KV cache."""

from bond_jax.models.config import ModelConfig, Rotary, tiny
from bond_jax.models.transformer import (Cache, cast_to_compute_dtype, forward, init_cache, init_params,
                                         positions_from_mask)

__all__ = ["Cache", "ModelConfig", "Rotary", "cast_to_compute_dtype", "forward", "init_cache", "init_params",
           "positions_from_mask", "tiny"]
