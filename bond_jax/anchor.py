"""The moving anchor of iterative BOND (spec section 4): an EMA of the policy parameters."""

import numbers

import chex
import jax


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

  Example:
    >>> anchor = ema_update(anchor, params, eta=0.02)
  """
  if isinstance(eta, numbers.Real) and not 0 < eta <= 1:
    raise ValueError(f"`eta` must be in (0, 1], got {eta!r}.")
  chex.assert_trees_all_equal_shapes(anchor_params, params)
  return jax.tree.map(
      lambda anchor, new: (anchor + eta * (new - anchor)).astype(anchor.dtype),
      anchor_params,
      params,
  )
