"""LoRA as a transformation of the parameter tree: a policy that is a frozen base plus low-rank adapters.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685 (2021). Each targeted kernel
`W` of shape `[*lead, *in, *out]` gets an adapter, `lora_a` `[*lead, prod(in), rank]` and `lora_b`
`[*lead, rank, prod(out)]` (`B` starts at zero), and the model runs with

    W + (alpha / rank) · (A @ B)   reshaped to W's shape,

computed where the step needs the policy's (or the anchor's) parameters (`Lora.policy`). The modules never see
an adapter: any model whose kernels have the layouts of `KERNEL_LAYOUTS` is adapted, whatever its family, and
leading axes (a stack of layers) give each slice an adapter of its own. docs/method.md ("LoRA") says what the
anchor and the reference are then, and what merging costs against adapters applied inside the matmuls.

An adapter is a nested dict mirroring the modules it adapts: `{"layer_0": {"attn": {"q": {"lora_a": A, "lora_b":
B}}}}`. `to_peft` and `from_peft` convert it to and from the layout `peft` saves (`adapter_model.safetensors`
tensors and `adapter_config.json`).

Example:
  >>> from bond_jax.models import config as config_lib, transformer
  >>> model_config = config_lib.tiny()
  >>> base = transformer.init_params(model_config, jax.random.key(0))
  >>> lora = Lora(rank=4, alpha=8.0)
  >>> adapter = init_adapter(base, lora, jax.random.key(1))
  >>> adapter["layer_0"]["attn"]["o"]["lora_a"].shape, adapter["layer_0"]["attn"]["o"]["lora_b"].shape
  ((32, 4), (4, 32))
  >>> policy = lora.policy(adapter, Frozen(base))   # B = 0: the policy is the base, exactly
  >>> bool(jnp.array_equal(policy["layer_0"]["mlp"]["up"]["kernel"], base["layer_0"]["mlp"]["up"]["kernel"]))
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

import flax
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from bond_jax import sharding
from bond_jax.models import hf
from bond_jax.models.config import ModelConfig

Params = Any
Adapter = dict

LORA_A, LORA_B = "lora_a", "lora_b"
# The reference of a LoRA run (`config.policy.lora.reference`): the base alone, or the base with the starting adapter.
REFERENCES = ("base", "start")
DEFAULT_TARGETS = (r"attn/[qkvo]/", r"mlp/(gate|up|down)/")
# The kernels an adapter can target: (path regex, input axes, output axes), the kernel's last axes in that order.
# Axes before them (a stack of layers) are leading axes: each slice along them has its own adapter.
KERNEL_LAYOUTS: tuple[tuple[str, int, int], ...] = (
    (r"attn/[qkv]/kernel$", 1, 2),  # [d_model | heads, head_dim]
    (r"attn/o/kernel$", 2, 1),  # [heads, head_dim | d_model]
    (r"mlp/(gate|up|down)/kernel$", 1, 1),  # [d_model | mlp_dim], [mlp_dim | d_model]
)
PEFT_CONFIG_FILE = "adapter_config.json"  # The files of a peft adapter directory.
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_FINGERPRINT_VALUES = 64  # Values sampled from each leaf of the base for its fingerprint.


class Frozen(flax.struct.PyTreeNode):
  """What a LoRA step takes beside its train state, never updated: the shared base and the reference's adapter.

  Attributes:
    base: the base model's parameters (the tree `transformer.init_params` makes), shared by the policy, the
      anchor and the reference.
    reference_adapter: the adapter that makes the reference `base + adapter` (a starting adapter, with
      `config.policy.lora.reference = "start"`); None: the reference is the base alone.
  """

  base: Params
  reference_adapter: Adapter | None = None


@dataclasses.dataclass(frozen=True)
class Lora:
  """Low-rank adapters on a frozen base: the trainable parameters are the adapters (`init_adapter`).

  Attributes:
    rank: the adapters' rank r.
    alpha: the scale's numerator: the update is `(alpha / rank) · A @ B`.
    targets: regexes searched in the "/"-joined path of every kernel ("layer_3/attn/q/kernel"); each must match
      at least one kernel of `KERNEL_LAYOUTS`.
    dtype: the dtype of the merged kernels (the compute dtype: the model casts its kernels to it anyway).
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dtype: str = "float32"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def policy(self, adapter: Adapter, frozen: Frozen) -> Params:
    """The parameters of the model `frozen.base + adapter` (the policy's, or the anchor's with its adapter)."""
    return merge(frozen.base, adapter, self.scale, self.dtype)

  def reference(self, frozen: Frozen) -> Params:
    """The reference's parameters: the base, with `frozen.reference_adapter` merged when there is one."""
    return frozen.base if frozen.reference_adapter is None else self.policy(frozen.reference_adapter, frozen)


def _layout(path: str) -> tuple[int, int] | None:
  return next(((n_in, n_out) for pattern, n_in, n_out in KERNEL_LAYOUTS if re.search(pattern, path)), None)


def targeted_kernels(params: Params, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
  """The "/"-joined path of every kernel `targets` selects -> its (input axes, output axes).

  Raises:
    ValueError: a pattern matches no kernel, or a kernel no adapter can target (not in `KERNEL_LAYOUTS`).

  Example:
    >>> from bond_jax.models import config as config_lib, transformer
    >>> params = transformer.init_params(config_lib.tiny(num_layers=1), jax.random.key(0))
    >>> targeted_kernels(params, (r"attn/[qo]/",))
    {'layer_0/attn/o/kernel': (2, 1), 'layer_0/attn/q/kernel': (1, 2)}
  """
  kernels = [path for path in traverse_util.flatten_dict(params, sep="/") if path.endswith("/kernel")]
  selected = {}
  for pattern in targets:
    matched = [path for path in kernels if re.search(pattern, path)]
    if not matched:
      raise ValueError(f"the pattern {pattern!r} matches no kernel; kernels look like {kernels[:3]}")
    for path in matched:
      layout = _layout(path)
      if layout is None:
        raise ValueError(f"the pattern {pattern!r} matches {path!r}, which no adapter can target (only attention "
                         "q/k/v/o and MLP gate/up/down kernels)")
      selected[path] = layout
  return dict(sorted(selected.items()))


def _module(kernel_path: str) -> str:
  return kernel_path.rsplit("/", 1)[0]


def adapter_shapes(shape: tuple[int, ...], layout: tuple[int, int], rank: int) -> tuple[tuple[int, ...], ...]:
  """`(lora_a shape, lora_b shape)` of a kernel of `shape` whose last axes are `layout` = (input, output) axes.

  Example:
    >>> adapter_shapes((32, 4, 8), (1, 2), rank=2)   # a q kernel [d_model, heads, head_dim]
    ((32, 2), (2, 32))
  """
  n_in, n_out = layout
  lead = len(shape) - n_in - n_out
  if lead < 0:
    raise ValueError(f"a kernel of shape {shape} has fewer than the {n_in} + {n_out} axes of its layout")
  return ((*shape[:lead], math.prod(shape[lead:lead + n_in]), rank),
          (*shape[:lead], rank, math.prod(shape[lead + n_in:])))


def init_adapter(params: Params, lora: Lora, rng: jax.Array) -> Adapter:
  """A fresh float32 adapter for every kernel `lora.targets` selects: `A` uniform in `±1/sqrt(fan_in)` (as `peft`
  initialises it), `B` zero, so the policy starts as the base exactly.

  Raises:
    ValueError: from `targeted_kernels`.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  kernels = targeted_kernels(params, lora.targets)
  adapter = {}
  for path, key in zip(kernels, jax.random.split(rng, len(kernels))):
    a_shape, b_shape = adapter_shapes(tuple(flat[path].shape), kernels[path], lora.rank)
    bound = 1.0 / math.sqrt(a_shape[-2])
    adapter[f"{_module(path)}/{LORA_A}"] = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    adapter[f"{_module(path)}/{LORA_B}"] = jnp.zeros(b_shape, jnp.float32)
  return traverse_util.unflatten_dict(adapter, sep="/")


def merge(params: Params, adapter: Adapter, scale: float, dtype=None) -> Params:
  """`params` with `scale · A @ B` added to every kernel `adapter` adapts, in float32 and then cast to `dtype`.

  Untouched leaves are `params`' own arrays (no copy). The product is computed at the highest matmul precision
  (an accelerator's default for float32 may round it to bfloat16). On a mesh the merged kernels are laid out as
  the base's are stored (`sharding.constrain_params`), not whole on every device.

  Args:
    params: the base's parameter tree.
    adapter: `{module path...: {"lora_a": [*lead, in, r], "lora_b": [*lead, r, out]}}`.
    scale: `alpha / rank`.
    dtype: the merged kernels' dtype; None: each kernel's own.

  Returns:
    A tree of `params`' structure.

  Example:
    >>> base = {"mlp": {"up": {"kernel": jnp.ones((2, 3))}}}
    >>> adapter = {"mlp": {"up": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.full((1, 3), 0.5)}}}
    >>> merge(base, adapter, scale=2.0)["mlp"]["up"]["kernel"]
    Array([[2., 2., 2.],
           [2., 2., 2.]], dtype=float32)
  """
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  merged = {}
  for module, pair in traverse_util.flatten_dict(adapter, sep="/", is_leaf=is_pair).items():
    kernel = flat[f"{module}/kernel"]
    delta = jnp.einsum("...ir,...ro->...io", pair[LORA_A], pair[LORA_B], precision=jax.lax.Precision.HIGHEST)
    summed = kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)
    merged[f"{module}/kernel"] = summed.astype(kernel.dtype if dtype is None else dtype)
  return traverse_util.unflatten_dict(flat | sharding.constrain_params(merged), sep="/")


def is_pair(_, node) -> bool:
  """Whether `node` (a dict of an adapter tree, at any path) is one module's `{"lora_a", "lora_b"}`: the
  `is_leaf` of `traverse_util.flatten_dict` that flattens an adapter to module path -> pair."""
  return isinstance(node, dict) and LORA_A in node


def fingerprint(params: Params) -> str:
  """A short hex digest identifying a base model: its leaf paths and shapes and `_FINGERPRINT_VALUES` values spread
  over each leaf, as float32 (exact values, no arithmetic: the same on any mesh). Every process must call it.

  Example:
    >>> a, b = {"w": jnp.arange(6.0)}, {"w": jnp.arange(6.0).at[5].set(0.0)}
    >>> fingerprint(a) == fingerprint({"w": jnp.arange(6.0)}), fingerprint(a) == fingerprint(b)
    (True, False)
  """
  def sample(x):
    flat = x.reshape(-1)
    return flat[::max(1, flat.size // _FINGERPRINT_VALUES)][:_FINGERPRINT_VALUES].astype(jnp.float32)

  samples = multihost_utils.process_allgather(jax.jit(lambda t: jax.tree.map(sample, t))(params), tiled=True)
  digest = hashlib.sha256()
  for (path, leaf), values in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(samples)):
    digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
    digest.update(np.asarray(values, np.float32).tobytes())
  return digest.hexdigest()[:16]


def _peft_modules(model_config: ModelConfig, adapted: set[str]):
  """Every Hugging Face module an adapter of `adapted` (our module paths) touches: `(module name, [(our module
  path, rows of the weight)] in the weight's row order)`; a fused module (Phi-3's qkv_proj) lists several parts,
  adapted or not."""
  # hf's tensor table is the one home of the mapping between our paths and the Hugging Face names.
  for name, spec in hf._tensor_specs(model_config).items():  # pylint: disable=protected-access
    if spec.parts[0][0][-1] != "kernel":
      continue
    parts = [("/".join(path[:-1]), math.prod(shape) // spec.hf_shape[1]) for path, shape in spec.parts]
    if adapted & {module for module, _ in parts}:
      yield name.removesuffix(".weight"), parts


def to_peft(adapter: Adapter, lora: Lora, model_config: ModelConfig,
            base_model: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The tensors of `adapter_model.safetensors` and the `adapter_config.json` dict with which `peft` loads
  `adapter` onto the Hugging Face model of `model_config` (`hf.save_checkpoint` writes it).

  A torch Linear holds `W^T`; peft adds `(lora_alpha / r) · lora_B @ lora_A` to it, so `lora_A = A^T`
  `[r, in]`, `lora_B = B^T` `[out, r]`. A fused module (Phi-3's `qkv_proj`, `gate_up_proj`) gets the adapters of
  its k adapted parts as one of rank k·r: `lora_A` stacks their `A^T`, `lora_B` is block-diagonal, and
  `rank_pattern` / `alpha_pattern` give it rank k·r and alpha k·alpha (the same scale).

  Args:
    adapter: host or device arrays, `[in, r]` and `[r, out]` (no leading axes).
    lora: its rank and alpha.
    model_config: the base's config (its family names the modules).
    base_model: `base_model_name_or_path` to record.

  Raises:
    ValueError: an adapter with leading axes.

  Example:
    >>> from bond_jax.models import config as config_lib, transformer
    >>> cfg = config_lib.tiny(family="phi3", num_layers=1)
    >>> lora = Lora(rank=2, alpha=4.0, targets=(r"attn/[qk]/",))
    >>> adapter = init_adapter(transformer.init_params(cfg, jax.random.key(0)), lora, jax.random.key(1))
    >>> tensors, peft_config = to_peft(adapter, lora, cfg)
    >>> {k: v.shape for k, v in tensors.items()}   # q and k in the fused qkv_proj: rank 4, (4 + 2 + 2) * 8 rows
    {'base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight': (4, 32), \
'base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight': (64, 4)}
    >>> peft_config["rank_pattern"], peft_config["alpha_pattern"]
    ({'model.layers.0.self_attn.qkv_proj': 4}, {'model.layers.0.self_attn.qkv_proj': 8.0})
  """
  pairs = traverse_util.flatten_dict(adapter, sep="/", is_leaf=is_pair)
  tensors, modules, rank_pattern, alpha_pattern = {}, [], {}, {}
  for module, parts in _peft_modules(model_config, set(pairs)):
    adapted = [path for path, _ in parts if path in pairs]
    lora_a = [np.asarray(pairs[path][LORA_A], np.float32) for path in adapted]
    if any(a.ndim != 2 for a in lora_a):
      raise ValueError(f"{module}: the adapter has leading (stacked) axes; the peft layout holds one per module.")
    lora_b = np.zeros((sum(rows for _, rows in parts), lora.rank * len(adapted)), np.float32)
    row, column = 0, 0
    for path, rows in parts:
      if path in pairs:
        lora_b[row:row + rows, column:column + lora.rank] = np.asarray(pairs[path][LORA_B], np.float32).T
        column += lora.rank
      row += rows
    tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.concatenate([a.T for a in lora_a]))
    tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = lora_b
    modules.append(module)
    if len(adapted) > 1:
      rank_pattern[module], alpha_pattern[module] = lora.rank * len(adapted), lora.alpha * len(adapted)
  config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                target_modules=modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none",
                fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True,
                base_model_name_or_path=base_model or None)
  return tensors, config


def _pattern_value(patterns: dict[str, Any], module: str, default):
  """peft's per-module override: the value of the first key `k` with `re.match(rf"(.*\.)?({k})$", module)`."""
  return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def from_peft(tensors: dict[str, np.ndarray], peft_config: dict[str, Any], template: Adapter, lora: Lora,
              model_config: ModelConfig) -> Adapter:
  """The adapter of a peft LoRA checkpoint (`to_peft`'s inverse), for the modules of `template`, at `lora`'s scale.

  Args:
    tensors: `adapter_model.safetensors`' tensors.
    peft_config: `adapter_config.json`.
    template: an adapter of the wanted modules and shapes (`init_adapter` for the run's targets).
    lora: the run's rank and alpha: `lora_B` is rescaled from the file's scale (`lora_alpha / r`, or
      `/ sqrt(r)` with rsLoRA, per module with `rank_pattern` and `alpha_pattern`) to `lora.scale`.
    model_config: the base's config.

  Raises:
    ValueError: not a plain LoRA adapter (DoRA, fan_in_fan_out, weights other than lora_A/lora_B), another rank,
      modules other than the template's, or a fused module whose lora_B is not block-diagonal by part.
  """
  if peft_config.get("peft_type") != "LORA" or peft_config.get("use_dora") or peft_config.get("fan_in_fan_out"):
    raise ValueError("expected a plain LoRA adapter (peft_type LORA, no DoRA, fan_in_fan_out false), got "
                     f"peft_type={peft_config.get('peft_type')!r}, use_dora={peft_config.get('use_dora')!r}, "
                     f"fan_in_fan_out={peft_config.get('fan_in_fan_out')!r}")
  wanted = traverse_util.flatten_dict(template, sep="/", is_leaf=is_pair)
  unused, flat = set(tensors), {}
  for module, parts in _peft_modules(model_config, set(wanted)):
    names = [f"{_PEFT_PREFIX}{module}.lora_{x}.weight" for x in "AB"]
    if not all(name in tensors for name in names):
      raise ValueError(f"the adapter has no lora_A/lora_B for {module!r}, which config.policy.lora.targets selects")
    unused -= set(names)
    lora_a, lora_b = (np.asarray(tensors[name], np.float32) for name in names)
    adapted = [path for path, _ in parts if path in wanted]
    if lora_a.shape[0] != lora.rank * len(adapted):
      raise ValueError(f"{module!r} has rank {lora_a.shape[0]}; config.policy.lora.rank = {lora.rank} needs "
                       f"{lora.rank * len(adapted)}")
    rank = _pattern_value(peft_config.get("rank_pattern") or {}, module, peft_config["r"])
    alpha = _pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config["lora_alpha"])
    factor = alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank) / lora.scale
    row, column = 0, 0
    for path, rows in parts:
      block = lora_b[row:row + rows]
      own = np.zeros(lora_b.shape[1], bool)
      if path in wanted:
        own[column:column + lora.rank] = True
        flat[f"{path}/{LORA_A}"] = lora_a[column:column + lora.rank].T
        flat[f"{path}/{LORA_B}"] = block[:, own].T * factor
        column += lora.rank
      if np.any(block[:, ~own]):
        raise ValueError(f"{module!r}: lora_B mixes the ranks of its fused parts; only adapters of separate parts "
                         "(block-diagonal, as to_peft writes them) can be split into ours")
      row += rows
  if unused:
    raise ValueError(f"the adapter holds weights config.policy.lora.targets does not select: {sorted(unused)[:4]}")
  adapter = traverse_util.unflatten_dict(flat, sep="/")
  if jax.tree.map(np.shape, adapter) != jax.tree.map(np.shape, template):
    raise ValueError("the adapter's shapes differ from the run's "
                     f"({jax.tree.map(np.shape, adapter)} vs {jax.tree.map(np.shape, template)})")
  return jax.tree.map(jnp.asarray, adapter)
