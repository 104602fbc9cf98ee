"""Checks of the arguments of the public BOND functions, with one-line errors that name the argument.

Numbers are checked only when they are Python numbers: a traced value (a hyperparameter passed into a jitted
step) cannot be inspected at trace time and is taken as given. Shapes are static, so they are always checked.
"""

import math
import numbers

import jax.numpy as jnp


def check_n(value, name: str = "n") -> int:
  """Returns `value` as an `int` if it is a Python integer >= 1, else raises a `ValueError` naming `name`.

  Example:
    >>> check_n(4)
    4
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
  return int(value)


def is_python_number(value) -> bool:
  """Whether `value` is a Python (or numpy) real number rather than an array or a traced value."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(value, name: str, low: float, high: float = math.inf, *, traced: bool = True):
  """Raises a `ValueError` unless `value` is a real number in `[low, high]`.

  Args:
    value: the argument.
    name: its name, for the message.
    low: the smallest allowed value.
    high: the largest allowed value.
    traced: whether a scalar array (e.g. a traced hyperparameter inside `jax.jit`) is allowed; it is passed
      through unchecked. Python numbers are always checked.

  Raises:
    ValueError: naming the argument, its value and the allowed interval.

  Example:
    >>> check_real(0.5, "beta", 0.0, 1.0)
    >>> check_real(jnp.float32(2.0), "beta", 0.0, 1.0)  # an array: not inspected
  """
  if is_python_number(value):
    if not low <= value <= high:
      interval = f"[{low}, {high}]" if high < math.inf else f"[{low}, inf)"
      raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return
  if traced and hasattr(value, "shape") and jnp.ndim(value) == 0:
    return
  kind = "a real number or a scalar array" if traced else "a Python real number"
  raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def check_choice(value, name: str, choices: tuple[str, ...]):
  """Raises a `ValueError` unless `value` is one of `choices`.

  Example:
    >>> check_choice("samples", "baseline", ("samples", "batch"))
  """
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_shape(array, name: str, shape: tuple[int, ...], layout: str):
  """Raises a `ValueError` unless `array` has exactly `shape`.

  Args:
    array: the argument (anything with a `.shape`).
    name: its name, for the message.
    shape: the expected shape.
    layout: the expected layout in words, e.g. `"[batch, samples]"`.

  Example:
    >>> check_shape(jnp.zeros((2, 3)), "rewards", (2, 3), "[batch, samples]")
  """
  got = tuple(jnp.shape(array))
  if got != tuple(shape):
    raise ValueError(f"`{name}` must have shape {layout} = {tuple(shape)}, got {got}.")


def check_rank(array, name: str, ranks: tuple[int, ...], layout: str):
  """Raises a `ValueError` unless `array` has one of the ranks `ranks`.

  Example:
    >>> check_rank(jnp.zeros((2, 3)), "rewards", (2,), "[batch, samples]")
  """
  got = tuple(jnp.shape(array))
  if len(got) not in ranks:
    raise ValueError(f"`{name}` must have shape {layout}, got {got}.")
