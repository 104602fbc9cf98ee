"""The moving anchor of iterative BOND: an EMA of the policy parameters, or periodic copies of them (docs/method.md,
'Iterative BOND and the moving anchor'; Sessa et al., arXiv 2407.14622)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp

from bond_jax import arguments


def ema_update(anchor_params: chex.ArrayTree, params: chex.ArrayTree, eta) -> chex.ArrayTree:
  """`θ_anchor <- (1 - η) θ_anchor + η θ`, leaf by leaf.

  `eta = 1` copies the policy (the hard anchor reset of iterative BOND); small `eta` (the paper
  uses 0.02) lets the anchor trail the policy smoothly.

  Args:
    anchor_params: pytree of arrays, the anchor parameters.
    params: pytree of the same structure and leaf shapes, the current policy parameters.
    eta: step size in `(0, 1]` (a Python number is validated; a traced scalar is not).

  Returns:
    The updated anchor pytree, leaves in the anchor's dtypes.

  Raises:
    ValueError: `eta` outside `(0, 1]`.
    AssertionError: pytrees of different structures or leaf shapes.

  Example:
    >>> anchor = {"w": jnp.zeros(2)}
    >>> ema_update(anchor, {"w": jnp.array([1., 2.])}, eta=0.25)["w"]
    Array([0.25, 0.5 ], dtype=float32)
  """
  arguments.check_real(eta, "eta", 0.0, 1.0)
  if arguments.is_python_number(eta) and eta == 0:
    raise ValueError(f"`eta` must be in (0, 1], got {eta!r}.")
  chex.assert_trees_all_equal_shapes(anchor_params, params)
  return jax.tree.map(
      lambda anchor, new: (anchor + eta * (new - anchor)).astype(anchor.dtype),
      anchor_params,
      params,
  )


ANCHOR_MODES = ("ema", "fixed", "periodic")


@dataclasses.dataclass(frozen=True)
class AnchorSchedule:
  """How the anchor moves after each optimizer step (docs/method.md, "Iterative BOND and the moving anchor").

  Attributes:
    mode: "ema" (`ema_update` with rate `eta` every step), "fixed" (stays where it started: the reference, so
      the method distils Best-of-N of the reference) or "periodic" (a copy of the policy every `period` steps:
      iterative BOND with hard resets).
    eta: the EMA rate, in (0, 1].
    period: steps between copies, for "periodic".

  Example:
    >>> schedule = AnchorSchedule(mode="periodic", period=2)
    >>> [float(schedule.update(jnp.zeros(()), jnp.ones(()), step=jnp.asarray(s))) for s in range(4)]
    [0.0, 1.0, 0.0, 1.0]
  """

  mode: str = "ema"
  eta: float = 0.02
  period: int = 100

  def __post_init__(self):
    if self.mode not in ANCHOR_MODES:
      raise ValueError(f"AnchorSchedule.mode must be one of {ANCHOR_MODES}, got {self.mode!r}.")

  @property
  def moves(self) -> bool:
    """Whether the anchor ever differs from where it started."""
    return self.mode != "fixed"

  def update(self, anchor_params: chex.ArrayTree, params: chex.ArrayTree, step) -> chex.ArrayTree:
    """The anchor after the optimizer step `step` (0-based, a traced int) produced `params`."""
    if self.mode == "ema":
      return ema_update(anchor_params, params, self.eta)
    if self.mode == "periodic":
      copy = (step + 1) % self.period == 0
      return jax.tree.map(lambda a, p: jnp.where(copy, p, a), anchor_params, params)
    return anchor_params
