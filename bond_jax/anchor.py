"""The moving anchor of iterative BOND: an EMA of the policy parameters (docs/method.md, 'Iterative BOND and the
moving anchor'; Sessa et al., arXiv 2407.14622)."""

import chex
import jax

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
