"""Numerical helpers shared by every bcopt transform.

Dtype rules, moment buffers and their updates, bias corrections, and the
checks of numeric hyperparameters. The statistics over microbatches live in
:mod:`bcopt._src.microbatch`, the corrected inverses in
:mod:`bcopt._src.inverse`.
"""

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for low-precision floats, the input's dtype otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


def scalar_dtype() -> jnp.dtype:
  """float32, or float64 when enabled: the dtype of step-dependent weights.

  Bias corrections and averaging weights are powers of the step count,
  computed in this dtype (as optax computes its bias corrections).
  """
  return jnp.promote_types(jnp.float32, jnp.result_type(float))


def upcast(tree: PyTree) -> PyTree:
  """``tree`` with every leaf in its :func:`accumulation_dtype`."""
  return jax.tree.map(lambda x: x.astype(accumulation_dtype(x.dtype)), tree)


def moment_dtype(param_dtype, dtype=None) -> jnp.dtype:
  """The dtype of a moment: ``dtype`` if given, else float32 or wider."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return accumulation_dtype(param_dtype)


def zeros_moment(params: PyTree, dtype=None) -> PyTree:
  """Zeros shaped (and sharded) like ``params`` in :func:`moment_dtype`.

  Works on arrays and on ``jax.ShapeDtypeStruct`` leaves.
  """
  return jax.tree.map(
      lambda p: jnp.zeros_like(p, moment_dtype(jnp.result_type(p), dtype)),
      params)


def update_moment(moment: PyTree, value: PyTree,
                  decay: chex.Numeric) -> PyTree:
  """``decay * moment + (1 - decay) * value``, kept in the moment's dtype."""
  return optax.tree.cast_like(
      optax.tree.update_moment(value, moment, decay, 1), moment)


def bias_correction(decay: chex.Numeric, count: chex.Array) -> chex.Array:
  """``1 - decay**count`` in :func:`scalar_dtype`."""
  dtype = scalar_dtype()
  return 1 - jnp.asarray(decay, dtype) ** count.astype(dtype)


def is_concrete(value: Any) -> bool:
  """False for a traced value, such as a hyperparameter that
  ``optax.inject_hyperparams`` passes as an array inside ``jit``."""
  return not isinstance(value, jax.core.Tracer)


def check_positive(name: str, value: Any, reason: Optional[str] = None
                   ) -> None:
  """Raises a ValueError unless ``value > 0``; traced values pass unchecked."""
  if is_concrete(value) and not value > 0:
    why = f" ({reason})" if reason else ""
    raise ValueError(f"{name} must be positive{why}, got {value!r}.")


def check_integer(name: str, value: Any, minimum: int) -> None:
  """Raises a ValueError unless ``value`` is an integer ``>= minimum``.

  The value must be concrete: an integer option sets shapes or a static
  schedule, so it cannot be traced (under ``optax.inject_hyperparams`` it
  goes in ``static_args``).
  """
  if not is_concrete(value):
    raise ValueError(
        f"{name} must be a concrete integer, got a traced value; with"
        f" optax.inject_hyperparams, pass static_args=({name!r},).")
  if not (value == int(value) and value >= minimum):
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    raise ValueError(f"{name} must be {kind}, got {value!r}.")
