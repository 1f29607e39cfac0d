"""Variance-corrected inversion: the one place for its math.

For a smooth inverse map ``f`` and an estimate ``p`` with variance ``V``,
``E f(p) ~= f(E p) + 0.5 f''(p) V``; the corrected inverse subtracts that
delta-method term and is clamped at zero.
"""

from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

from bcopt._src import numerics

PyTree = Any
Estimator = Optional[Literal["jackknife", "paper"]]
ESTIMATORS = (None, "jackknife", "paper")


def check_estimator(inverse_correction: Any) -> None:
  """Raises a ValueError for an unknown ``inverse_correction`` value."""
  if inverse_correction not in ESTIMATORS:
    raise ValueError(
        f"inverse_correction={inverse_correction!r} is not one of"
        f" {ESTIMATORS}."
    )


def _corrected_leaf(p, variance, exponent):
  if numerics.is_concrete(exponent) and exponent == 1:
    # 1/p - V/p^3 = (1/p) (1 - V (1/p)^2): one division per value (this
    # runs once per fold and microbatch in the cross-fit loops).
    inv = jnp.reciprocal(p)
    if variance is None:
      return inv
    return inv * jnp.maximum(1.0 - variance * (inv * inv), 0.0)
  inv = p ** (-1.0 / exponent)
  if variance is None:
    return inv
  a = 1.0 / exponent
  coefficient = 0.5 * a * (a + 1.0)  # -0.5 f''(p) p^(1/e + 2): 1 for 1/p.
  # f(p) - 0.5 f''(p) V = p^(-1/e) (1 - c V / p^2), clamped at zero.
  return inv * jnp.maximum(1.0 - coefficient * variance / (p * p), 0.0)


def variance_correct_inverse(
    p: PyTree,
    variance: Optional[PyTree] = None,
    *,
    exponent: float = 1.0,
) -> PyTree:
  r"""Delta-method corrected inverse root of a noisy positive estimate.

  .. math::

    \tilde f(p) = \max\Big(0,\; f(p) - \tfrac12 f''(p)\, V\Big),
    \qquad f(p) = p^{-1/e},

  which is :math:`\max(0, 1/p - V/p^3)` for ``exponent`` :math:`e = 1` (Adam's
  and Sophia's denominators) and
  :math:`\max(0, x^{-1/4} - \tfrac{5}{32} x^{-9/4} V)` for Shampoo's
  eigenvalues with :math:`e = 4`. Every corrected inverse lies in
  :math:`[0, f(p)]`. Because :math:`E f(p) \approx f(Ep) + \tfrac12 f''V`,
  the correction removes the leading Jensen bias of inverting an unbiased
  estimate.

  Args:
    p: a tree (or array) of positive estimates (e.g. ``sqrt(vhat) + eps``).
    variance: a tree of the same structure with the variance :math:`V` of each
      estimate (e.g. from :func:`bcopt.cross_fit`'s estimators); None gives
      the plain inverse :math:`f(p)`.
    exponent: :math:`e` in :math:`f(p) = p^{-1/e}` (must be positive).

  Returns:
    The corrected inverses, same structure as ``p``.

  Examples:
    >>> import jax.numpy as jnp, bcopt
    >>> bcopt.variance_correct_inverse(jnp.array([2.0]), jnp.array([0.4]))
    Array([0.45], dtype=float32)

  References:
    Nayak et al., 2026, arXiv:2605.20756 (section on Jensen bias).
  """
  numerics.check_positive("exponent", exponent)
  if variance is None:
    return jax.tree.map(lambda x: _corrected_leaf(x, None, exponent), p)
  return jax.tree.map(
      lambda x, v: _corrected_leaf(x, v, exponent), p, variance
  )


def variance_from_spread(
    spread: PyTree, n: int, estimator: Estimator, *, loo: bool
) -> PyTree:
  r"""Turns a spread :math:`S = \sum_j (x_j - \bar x)^2` into a variance.

  ``x_j`` are either leave-one-out denominators :math:`p_{(-j)}` (the
  jackknife, and the ``"paper"`` estimator of the LOO scheme) or hypothetical
  per-microbatch denominators :math:`p_j` (the ``"paper"`` estimator of the
  other schemes), over a group of ``n`` microbatches:

  * ``"jackknife"``: :math:`V = \frac{n-1}{n} S`;
  * ``"paper"`` with LOO values (``loo=True``): :math:`V = S / (n - 1)`,
    the reference code's :math:`\mathrm{svar}_r(p_{(-r)})`;
  * ``"paper"`` with per-microbatch values: :math:`V = S / ((n-1) n)`,
    :math:`\mathrm{svar}(p_j) / n`.

  Args:
    spread: tree of spreads :math:`S`.
    n: number of values in the group.
    estimator: ``"jackknife"`` or ``"paper"``.
    loo: whether the values are leave-one-out denominators.

  Returns:
    The variance tree.
  """
  if estimator == "jackknife":
    if not loo:
      raise ValueError("The jackknife estimator uses leave-one-out values.")
    scale = (n - 1) / n
  elif estimator == "paper":
    scale = 1.0 / (n - 1) if loo else 1.0 / ((n - 1) * n)
  else:
    raise ValueError(f"No variance for inverse_correction={estimator!r}.")
  return jax.tree.map(lambda s: s * scale, spread)


def grouped_jackknife_variance(values: PyTree) -> PyTree:
  r"""Delete-a-group jackknife variance from stacked leave-out values.

  .. math::

    V = \frac{K-1}{K} \sum_k (x_{(-k)} - \bar x)^2

  over the leading axis (size :math:`K`) of every leaf, where
  :math:`x_{(-k)}` is the statistic recomputed without subgroup :math:`k`.
  With :math:`K = n` subgroups of one this is the jackknife of
  :func:`variance_from_spread`; for a statistic linear in the microbatches
  and equal subgroups it is :math:`\mathrm{svar}(\text{subgroup
  means})/K`.

  Args:
    values: a tree of arrays with a leading axis of size :math:`K \ge 2`.

  Returns:
    The variance tree (the leading axis reduced).
  """
  def leaf(x):
    # Unrolled over the K entries (XLA:CPU reduces a major axis slowly).
    k = x.shape[0]
    mean = sum(x[i] for i in range(k)) / k
    return (k - 1) / k * sum(jnp.square(x[i] - mean) for i in range(k))
  return jax.tree.map(leaf, values)
