"""Device mesh, parameter partitioning by path regex and activation sharding, over the axes `data`, `fsdp` and
`tensor`: the one place that says where every array of the model lives.

Parameters are sharded Megatron-style over `tensor` (vocab, heads, mlp_dim) and ZeRO-3-style over `fsdp`
(d_model): each layer's weights are all-gathered over `fsdp` where the layer runs (`gather_over_fsdp`), so their
gradients come back reduce-scattered. Activations follow `ACTIVATION_RULES`: the batch over `data` and `fsdp`
together (as batches are split), heads, MLP and vocabulary over `tensor` (as their weights are). A mesh axis
that does not divide a dimension is dropped for that dimension (replication), so any model runs on any mesh.

The activation constraints (`constrain`, `gather_over_fsdp`) read the mesh set with `jax.set_mesh` (around the
`jit`, `lower` or call); without one they change nothing, so the model runs unchanged on one device or under a
caller's own shardings.

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
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
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

# Logical axes of activations -> mesh axes (`constrain`). Unnamed axes (None) are replicated.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,  # rows: prompts, or samples of prompts
    "heads": ("tensor",),  # query or key/value heads
    "mlp": ("tensor",),  # the MLP's hidden features
    "vocab": ("tensor",),  # the logits' vocabulary
}


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


def _axis_names(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _fit_spec(spec: P, shape: tuple[int, ...], axis_sizes: dict[str, int] | None, path: str) -> P:
  """`spec` padded to `shape`'s rank, each dimension replicated where its axes (those of the mesh) do not divide
  it."""
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {spec} has more entries than parameter {path!r} of shape {shape}.")
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if axis_sizes is not None:
    for i, axes in enumerate(entries):
      names = tuple(name for name in _axis_names(axes) if name in axis_sizes)
      entries[i] = None if not names or shape[i] % math.prod(axis_sizes[name] for name in names) else (
          names[0] if len(names) == 1 else names)
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
  return _stored_specs(params, rules, None if mesh is None else dict(mesh.shape))


def _rule_spec(name: str, shape: tuple[int, ...], rules: Sequence[tuple[str, P]],
               axis_sizes: dict[str, int] | None) -> P:
  """The spec of the first rule whose regex matches parameter path `name`, fitted to `shape`."""
  for pattern, rule in rules:
    if re.search(pattern, name):
      return _fit_spec(rule, shape, axis_sizes, name)
  raise ValueError(f"no partition rule matches parameter {name!r}; add one (e.g. (r'.*', P())).")


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


def without_axis(spec: P, axis: str) -> P:
  """`spec` with mesh axis `axis` removed from every dimension (the array gathered over it).

  Example:
    >>> without_axis(P(("data", "fsdp"), "tensor"), "fsdp")
    P('data', 'tensor')
  """
  def keep(entry):
    names = tuple(name for name in _axis_names(entry) if name != axis)
    return names[0] if len(names) == 1 else (names or None)
  return P(*(keep(entry) for entry in spec))


def _context_mesh_sizes() -> dict[str, int] | None:
  """Sizes of the axes of the mesh set with `jax.set_mesh` that XLA partitions (Auto: not those a `shard_map`
  around the caller has made manual, nor Explicit ones, whose layouts are the arrays' own types), or None when there
  is no such mesh (or those axes hold one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  sizes = {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
           if kind == jax.sharding.AxisType.Auto}
  return sizes if math.prod(sizes.values()) > 1 else None


def over_batch_shards(fn, replicated: Any, rows: Any) -> Any:
  """`fn(replicated, rows)` run by each device on its own rows (a `shard_map` over the mesh's batch axes), for `fn`
  row-wise in `rows`: a loop inside `fn` then runs on each device alone, with no collective over the batch axes
  (its stopping test included), and stops when that device's rows are done. Other axes (`tensor`) stay XLA's.

  Without a mesh (`jax.set_mesh`), or with rows that the batch axes do not divide, it is `fn(replicated, rows)`.

  Args:
    fn: `(replicated, rows) -> outputs`, every output leaf `[rows, ...]`.
    replicated: a pytree the same on every device along the batch axes (e.g. weights gathered over `fsdp`).
    rows: a pytree of `[rows, ...]` leaves.

  Example:
    >>> with jax.set_mesh(make_mesh((2, 2, 2))):
    ...   out = jax.jit(lambda w, x: over_batch_shards(lambda w, x: x * w, w, x))(jnp.float32(2), jnp.arange(8.0))
    >>> out.tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
  """
  sizes = _context_mesh_sizes() or {}
  axes = tuple(axis for axis in BATCH_AXES if sizes.get(axis, 1) > 1)
  if not axes or jax.tree.leaves(rows)[0].shape[0] % math.prod(sizes[axis] for axis in axes):
    return fn(replicated, rows)
  spec = P(axes)
  # check_vma=False: a loop carry that starts equal on every device (zeros) may vary after a step.
  return jax.shard_map(fn, in_specs=(P(), spec), out_specs=spec, axis_names=set(axes), check_vma=False)(
      replicated, rows)


def context_axis_size(axes: Sequence[str]) -> int:
  """The devices along `axes` of the mesh set with `jax.set_mesh` (1 without a mesh, and for axes it lacks).

  Example:
    >>> with jax.set_mesh(make_mesh((2, 2, 2))):
    ...   context_axis_size(BATCH_AXES)
    4
  """
  sizes = _context_mesh_sizes() or {}
  return math.prod(sizes.get(axis, 1) for axis in axes)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
  """`x` constrained to the sharding its logical axes name (`ACTIVATION_RULES`) on the mesh of `jax.set_mesh`.

  Axes the mesh lacks or that do not divide a dimension are dropped; without a mesh `x` is returned as is.

  Args:
    x: an array of rank `len(logical_axes)`.
    *logical_axes: per dimension a key of `ACTIVATION_RULES`, or None (replicated).

  Example:
    >>> mesh = make_mesh((2, 2, 2))
    >>> with jax.set_mesh(mesh):
    ...   y = jax.jit(lambda x: constrain(x * 2, "batch", None, "heads"))(jnp.ones((4, 3, 2)))
    >>> y.sharding.spec
    P(('data', 'fsdp'), None, 'tensor')
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {logical_axes} for an array of shape {x.shape}.")
  sizes = _context_mesh_sizes()
  if sizes is None:
    return x
  spec = _fit_spec(P(*(ACTIVATION_RULES[axis] if axis else None for axis in logical_axes)), x.shape, sizes, "")
  return jax.lax.with_sharding_constraint(x, spec)


def params_after(params: Any, value: Any, rules: Sequence[tuple[str, P]] = DEFAULT_PARAM_RULES) -> Any:
  """`params` (the same values), computable only once `value` is: whatever a later pass gathers of them (e.g.
  `transformer.decoding_params`) is gathered after `value`, never alongside the weights that computed it.

  XLA drops `lax.optimization_barrier` before it schedules (the CPU compiler does) and hoists independent
  all-gathers to the program's start, which would hold two models' gathered weights at once. On a mesh (`jax.
  set_mesh`), each device therefore rewrites its own shards with a dependency XLA can neither fold nor move past a
  gather: each floating leaf's first local row plus a zero computed from `value` (`t >= 0 and t < 0` of one of its
  elements), joined to the other rows again. It costs one pass over the sharded leaves. Without a mesh there is
  nothing to gather and `params` only pass an optimization barrier.

  Example:
    >>> params, x = {"w": jnp.ones(2)}, jnp.zeros(3)
    >>> params_after(params, x)["w"].tolist()
    [1.0, 1.0]
  """
  params, value = jax.lax.optimization_barrier((params, value))
  sizes = _context_mesh_sizes()
  if sizes is None:
    return params
  first = jax.tree.leaves(value)[0].ravel()[0]
  zero = ((first >= 0) & (first < 0)).astype(jnp.float32)

  def dependent(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0 or x.shape[0] == 0:
      return x
    return jax.lax.concatenate([x[:1] + zero.astype(x.dtype), x[1:]], 0)

  specs = _stored_specs(params, rules, sizes)
  return jax.shard_map(lambda p, z: jax.tree.map(dependent, p), in_specs=(specs, P()), out_specs=specs,
                       check_vma=False)(params, zero)


def _stored_specs(params: Any, rules: Sequence[tuple[str, P]], sizes: dict[str, int] | None) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _rule_spec(_path_str(path), tuple(leaf.shape), rules, sizes), params)


def constrain_params(params: Any, rules: Sequence[tuple[str, P]] = DEFAULT_PARAM_RULES) -> Any:
  """`params` constrained to their partition specs on the mesh of `jax.set_mesh`, as the train state stores them.

  For parameters a step computes (`lora.merge`'s merged kernels): left to itself XLA may lay them out whole on
  every device (a LoRA product `A @ B` has both its axes sharded over `fsdp`, so no layout of the result follows
  from its inputs'), where ZeRO-3 keeps them split and gathers one layer at a time. Unchanged without a mesh, or
  on a mesh that has none of the axes `rules` name (another program's: its layouts are its own).

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> params = transformer.init_params(model_config_lib.tiny(), jax.random.key(0))
    >>> with jax.set_mesh(make_mesh((1, 4, 2))):
    ...   doubled = jax.jit(lambda p: constrain_params(jax.tree.map(lambda x: 2 * x, p)))(params)
    >>> doubled["layer_0"]["attn"]["q"]["kernel"].sharding.spec
    P('fsdp', 'tensor')
  """
  sizes = _context_mesh_sizes()
  named = {name for _, spec in rules for entry in spec for name in _axis_names(entry)}
  if sizes is None or not named & sizes.keys():
    return params
  return jax.lax.with_sharding_constraint(params, _stored_specs(params, rules, sizes))


def gather_over_fsdp(params: Any, rules: Sequence[tuple[str, P]] = DEFAULT_PARAM_RULES, layer_axis: bool = False,
                     ) -> Any:
  """`params` constrained to their partition specs less `fsdp`: all-gathered over it where they are used (ZeRO-3),
  still split over `tensor`; their cotangents are then reduce-scattered back. Unchanged without a mesh.

  Args:
    params: a parameter tree, or a subtree (e.g. one layer's, whose paths the rules match by suffix).
    rules: the partition rules.
    layer_axis: whether every leaf has a leading (stacked) layer axis, left unsharded.

  Example:
    >>> from bond_jax.models import config as model_config_lib, transformer
    >>> params = transformer.init_params(model_config_lib.tiny(), jax.random.key(0))
    >>> with jax.set_mesh(make_mesh((1, 4, 2))):
    ...   q = jax.jit(lambda p: gather_over_fsdp(p)["layer_0"]["attn"]["q"]["kernel"])(params)
    >>> q.sharding.spec
    P(None, 'tensor')
  """
  sizes = _context_mesh_sizes()
  if sizes is None:
    return params

  def gathered(path, leaf):
    stored = _rule_spec(_path_str(path), tuple(leaf.shape[1:] if layer_axis else leaf.shape), rules, sizes)
    stored = P(None, *stored) if layer_axis else stored
    return _gather(leaf, without_axis(stored, "fsdp"), stored)

  return jax.tree_util.tree_map_with_path(gathered, params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(x: jax.Array, gathered: P, stored: P) -> jax.Array:
  """`x` gathered to `gathered`; its cotangent comes back as `stored` at once (reduce-scattered where the weight is
  used, e.g. inside the scan over layers, rather than accumulated whole and reduced after it)."""
  return jax.lax.with_sharding_constraint(x, gathered)


def _gather_forward(x, gathered, stored):
  return _gather(x, gathered, stored), None


def _gather_backward(gathered, stored, residuals, cotangent):
  del gathered, residuals
  return (jax.lax.with_sharding_constraint(cotangent, stored),)


_gather.defvjp(_gather_forward, _gather_backward)
