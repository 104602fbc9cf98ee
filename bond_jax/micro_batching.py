"""Micro-batches: a pass over a batch of prompts run as a loop over equal parts of it, so that only one part's
activations, KV cache and logits exist at a time.

Micro-batch `i` of `n` holds rows `i, i + n, i + 2n, ...` of the batch: as a batch sharded over the mesh's batch
axes holds each device's rows contiguously, every device then holds `1/n` of its own rows in every micro-batch
(the split moves no data between devices), provided `n` divides the rows per device.

Example:
  >>> rows = jnp.arange(6)
  >>> split(rows, 3).tolist()
  [[0, 3], [1, 4], [2, 5]]
  >>> merge(split(rows, 3)).tolist()
  [0, 1, 2, 3, 4, 5]
  >>> map_rows(lambda x: x * 10, 3, rows).tolist()
  [0, 10, 20, 30, 40, 50]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from bond_jax import sharding


def _check(n: int, rows: int) -> None:
  if not isinstance(n, int) or n < 1 or rows % n:
    raise ValueError(f"micro_batches={n!r} must be a positive int dividing the batch's {rows} rows.")


def _rows(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def split(tree: Any, n: int) -> Any:
  """`[rows, ...]` leaves -> `[n, rows / n, ...]`: micro-batch `i` holds rows `i, i + n, ...`.

  Raises:
    ValueError: `n` does not divide the rows.
  """
  _check(n, _rows(tree))

  def part(x):
    parts = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(parts, None, "batch", *([None] * (x.ndim - 1)))

  return jax.tree.map(part, tree)


def merge(tree: Any) -> Any:
  """The inverse of `split`: `[n, rows / n, ...]` -> `[rows, ...]` in the original order."""

  def whole(x):
    rows = x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return sharding.constrain(rows, "batch", *([None] * (x.ndim - 2)))

  return jax.tree.map(whole, tree)


def map_rows(fn: Callable[..., Any], n: int, *args: Any) -> Any:
  """`fn(*args)` for row-wise `fn` (each output row depends on the same input rows only), run over `n` micro-batches
  one after the other (`lax.map`); `n == 1` calls `fn` once, unchanged.

  Args:
    fn: takes and returns pytrees of `[rows, ...]` arrays.
    n: the number of micro-batches; it must divide the rows.
    *args: `fn`'s arguments, every leaf with the same leading `rows` axis.

  Example:
    >>> map_rows(lambda x, y: x + y, 2, jnp.arange(4), jnp.ones(4, int)).tolist()
    [1, 2, 3, 4]
  """
  if n == 1:
    return fn(*args)
  return merge(lax.map(lambda parts: fn(*parts), split(args, n)))
