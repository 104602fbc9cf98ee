"""Device mesh and parameter partitioning by path regex over the axes `data`, `fsdp` and `tensor`.

Parameters are sharded Megatron-style over `tensor` (vocab, heads, mlp_dim) and ZeRO-3-style over `fsdp`
(d_model); batches are split over `data` and `fsdp` together. A mesh axis that does not divide a parameter's
dimension is dropped for that dimension (replication), so any model runs on any mesh.

Example (8 devices, e.g. simulated CPUs):
  >>> from bond_jax.models import config as model_config_lib, transformer
  >>> mesh = make_mesh((2, 2, 2))
  >>> params = transformer.init_params(model_config_lib.tiny(), jax.random.key(0))
  >>> params = jax.device_put(params, param_shardings(params, mesh))
  >>> params["layer_0"]["attn"]["q"]["kernel"].sharding.spec
  P('fsdp', 'tensor', None)
  >>> tokens = jax.device_put(jnp.zeros((4, 16), jnp.int32), batch_sharding(mesh, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS_NAMES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (path regex, spec); the first `re.search` match wins. Paths are "/"-joined, e.g. "layer_0/attn/q/kernel".
DEFAULT_PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embedder/embedding$", P("tensor", "fsdp")),  # [vocab, d_model]
    (r"attn/[qkv]/kernel$", P("fsdp", "tensor", None)),  # [d_model, heads, head_dim]
    (r"attn/[qkv]/bias$", P("tensor", None)),  # [heads, head_dim]
    (r"attn/o/kernel$", P("tensor", None, "fsdp")),  # [heads, head_dim, d_model]
    (r"mlp/(gate|up)/kernel$", P("fsdp", "tensor")),  # [d_model, mlp_dim]
    (r"mlp/down/kernel$", P("tensor", "fsdp")),  # [mlp_dim, d_model]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [d_model, vocab]
    (r"score/kernel$", P("fsdp", None)),  # [d_model, num_labels]
    # LoRA adapters (`lora`): too small to be worth splitting over `tensor`; their long side over `fsdp` (ZeRO).
    (r"lora_a$", P("fsdp", None)),  # [in, rank]
    (r"lora_b$", P(None, "fsdp")),  # [rank, out]
    (r".*", P()),  # norms and anything else: replicated
)


def make_mesh(mesh_shape: Sequence[int], axis_names: Sequence[str] = AXIS_NAMES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all); one entry of `mesh_shape` may be -1 to take the remaining devices.

  Example:
    >>> dict(make_mesh((-1, 1, 2)).shape)   # 8 devices -> data=4, fsdp=1, tensor=2
    {'data': 4, 'fsdp': 1, 'tensor': 2}
  """
  devices = list(jax.devices() if devices is None else devices)
  if len(mesh_shape) != len(axis_names):
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} and axis_names={tuple(axis_names)} differ in length.")
  try:
    shape = resolve_mesh_shape(mesh_shape, len(devices))
  except ValueError as e:
    raise ValueError(f"mesh_shape={tuple(mesh_shape)}: expected {e}.") from e
  return Mesh(mesh_utils.create_device_mesh(shape, devices), tuple(axis_names))


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int | None) -> tuple[int, ...]:
  """`mesh_shape` with its -1 (at most one) replaced by the devices the other axes leave.

  Args:
    mesh_shape: axis sizes, each >= 1 or -1.
    num_devices: the devices the mesh must use exactly; None checks the sizes only and keeps the -1.

  Raises:
    ValueError: with what is expected instead ("positive sizes with at most one -1", or a shape that uses
      exactly the devices).

  Example:
    >>> resolve_mesh_shape((-1, 2, 1), 8)
    (4, 2, 1)
  """
  if list(mesh_shape).count(-1) > 1 or any(s < 1 and s != -1 for s in mesh_shape):
    raise ValueError("positive sizes with at most one -1")
  if num_devices is None:
    return tuple(mesh_shape)
  known = math.prod(s for s in mesh_shape if s != -1)
  shape = tuple(num_devices // known if s == -1 else s for s in mesh_shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"a shape that uses exactly the {num_devices} available devices")
  return shape


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _fit_spec(spec: P, shape: tuple[int, ...], axis_sizes: dict[str, int] | None, path: str) -> P:
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {spec} has more entries than parameter {path!r} of shape {shape}.")
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if axis_sizes is not None:
    for i, axes in enumerate(entries):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      if shape[i] % math.prod(axis_sizes[name] for name in names):
        entries[i] = None
  return P(*entries)


def param_partition_specs(params: Any, rules: Sequence[tuple[str, P]] = DEFAULT_PARAM_RULES,
                          mesh: Mesh | None = None) -> Any:
  """The PartitionSpec of every parameter: the first rule whose regex matches its "/"-joined path.

  Leaves may be arrays or `jax.ShapeDtypeStruct`s. With `mesh`, axes that do not divide a dimension are
  dropped (that dimension is replicated).

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> abstract = jax.eval_shape(lambda: transformer.init_params(model_config_lib.tiny(), jax.random.key(0)))
    >>> param_partition_specs(abstract)["layer_0"]["attn"]["q"]["kernel"]
    P('fsdp', 'tensor', None)
  """
  axis_sizes = None if mesh is None else dict(mesh.shape)

  def spec(path, leaf):
    name = _path_str(path)
    for pattern, rule in rules:
      if re.search(pattern, name):
        return _fit_spec(rule, tuple(leaf.shape), axis_sizes, name)
    raise ValueError(f"no partition rule matches parameter {name!r}; add one (e.g. (r'.*', P())).")

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_PARAM_RULES) -> Any:
  """NamedShardings of every parameter on `mesh` (see `param_partition_specs`).

  Example (initialising straight onto the mesh, each device creating only its shards):
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> cfg, key = model_config_lib.tiny(), jax.random.key(0)
    >>> abstract = jax.eval_shape(lambda: transformer.init_params(cfg, key))
    >>> mesh = make_mesh((1, 8, 1))
    >>> params = jax.jit(transformer.init_params, static_argnums=0,
    ...                  out_shardings=param_shardings(abstract, mesh))(cfg, key)
    >>> params["embedder"]["embedding"].sharding.spec
    P('tensor', 'fsdp')
  """
  specs = param_partition_specs(params, rules, mesh)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over `data` and `fsdp`, other axes replicated.

  Example:
    >>> batch_sharding(make_mesh((2, 2, 2)), 2).spec   # [batch, time]
    P(('data', 'fsdp'), None)
  """
  if ndim < 1:
    raise ValueError(f"batch_sharding needs ndim >= 1, got {ndim}.")
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))
