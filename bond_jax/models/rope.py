"""Rotary position embeddings: the frequencies of each `Rotary` kind and their application to queries and keys.

The frequencies follow transformers' `modeling_rope_utils` (default, linear, dynamic, llama3 and yarn rope types),
computed in float32 as there; the rotation uses the HF "rotate_half" convention (frequency i pairs dims i and
i + head_dim/2), so checkpoints need no permutation of q and k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bond_jax.models.config import Rotary


def _yarn_ramp_bounds(rotary: Rotary, head_dim: int) -> tuple[float, float]:
  """The dimensions between which YaRN blends interpolated into extrapolated frequencies (YaRN, arXiv 2309.00071)."""
  def dim_of(rotations: float) -> float:
    return head_dim * math.log(rotary.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(rotary.theta))

  low, high = dim_of(rotary.beta_fast), dim_of(rotary.beta_slow)
  if rotary.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  return low, (high + 0.001 if low == high else high)  # transformers' guard against a zero-width ramp


def inv_freq(rotary: Rotary, head_dim: int) -> jax.Array:
  """The inverse frequencies `[head_dim // 2]` float32 of `rotary` (radians per position).

  Args:
    rotary: the layer's rotary embedding.
    head_dim: the attention head size (even).

  Returns:
    As transformers' `ROPE_INIT_FUNCTIONS[rotary.kind]` (or the default rope) returns them.

  Example:
    >>> inv_freq(Rotary(theta=10_000.0), head_dim=4)
    Array([1.  , 0.01], dtype=float32)
    >>> inv_freq(Rotary(theta=10_000.0, kind="linear", factor=2.0), head_dim=4)
    Array([0.5  , 0.005], dtype=float32)
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  base = 1.0 / rotary.theta ** exponents
  if rotary.kind == "linear":
    return base / rotary.factor
  if rotary.kind == "llama3":
    wavelen = 2 * math.pi / base
    low_freq_wavelen = rotary.original_max_len / rotary.low_freq_factor
    high_freq_wavelen = rotary.original_max_len / rotary.high_freq_factor
    scaled = jnp.where(wavelen > low_freq_wavelen, base / rotary.factor, base)
    smooth = ((rotary.original_max_len / wavelen - rotary.low_freq_factor)
              / (rotary.high_freq_factor - rotary.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rotary.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)
  if rotary.kind == "yarn":
    pos_freqs = rotary.theta ** exponents
    low, high = _yarn_ramp_bounds(rotary, head_dim)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return 1.0 / (rotary.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
  # "default", and "dynamic" within max_position_embeddings, where transformers keeps the default frequencies.
  return base


def apply_rope(x: jax.Array, positions: jax.Array, rotary: Rotary) -> jax.Array:
  """Rotary embedding of queries or keys.

  Args:
    x: `[batch, time, heads, head_dim]`.
    positions: `[batch, time]` int.
    rotary: the layer's rotary embedding.

  Returns:
    `[batch, time, heads, head_dim]`, rotated (and, for "yarn", scaled by `attention_factor`), in `x.dtype`.

  Example:
    >>> q = jnp.ones((1, 2, 1, 4))
    >>> np.asarray(apply_rope(q, jnp.array([[0, 1]]), Rotary())[0, :, 0], np.float64).round(3).tolist()
    [[1.0, 1.0, 1.0, 1.0], [-0.301, 0.99, 1.382, 1.01]]
  """
  return rotate(x, positions, inv_freq(rotary, x.shape[-1]), rotary.attention_factor)


def rotate(x: jax.Array, positions: jax.Array, frequencies: jax.Array, scale: jax.Array | float) -> jax.Array:
  """`apply_rope` from a layer's frequencies and cos/sin scale as arrays, as a scan over layers passes them.

  Args:
    x: `[batch, time, heads, head_dim]`.
    positions: `[batch, time]` int.
    frequencies: `[head_dim // 2]` float32, `inv_freq` of the layer's `Rotary`.
    scale: float32 scalar, its `attention_factor` (1 but for "yarn").

  Returns:
    `[batch, time, heads, head_dim]` in `x.dtype`.

  Example:
    >>> q = jnp.ones((1, 2, 1, 4))
    >>> bool(jnp.all(rotate(q, jnp.array([[0, 1]]), inv_freq(Rotary(), 4), 1.0) == apply_rope(q, jnp.array([[0, 1]]),
    ...                                                                                       Rotary())))
    True
  """
  angles = positions[..., None].astype(jnp.float32) * frequencies
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
