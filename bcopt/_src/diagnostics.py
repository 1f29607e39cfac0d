"""Microbatch diagnostics: how large the corrected biases are in a run.

A transform built with ``diagnostics=True`` measures, on every update and
from the statistics the update computes anyway, per parameter leaf:

* ``tr S``, the trace of the covariance of the microbatch gradients, and
  ``||gbar||^2``, for the gradient noise scale ``B_simple``;
* ``||u_scheme - u_standard||^2`` and ``||u_standard||^2`` (the coupling
  share: how much cross-fitting changes the step, correction off);
* ``||u_corrected - u_uncorrected||^2`` and ``||u_uncorrected||^2`` (the
  Jensen share: how much the inverse correction changes it, within the
  scheme).

The state then is ``DiagnosticsState(inner, diagnostics)``; read the
figures with :func:`microbatch_diagnostics`. Keeping squared norms (not
ratios) lets totals over the tree be sums.
"""

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from bcopt._src import fusion
from bcopt._src import microbatch

PyTree = Any


class Diagnostics(NamedTuple):
  """The last update's microbatch statistics, per parameter leaf.

  Every field but ``microbatches`` is a tree shaped like the parameters
  with a float32 scalar per leaf (all zeros before the first update).
  """

  microbatches: chex.Array  # shape=(), int32: M of the last update.
  trace: optax.Updates  # tr S = sum_j ||g_j - gbar||^2 / (M - 1).
  mean_sq: optax.Updates  # ||gbar||^2.
  coupling: optax.Updates  # ||u_scheme - u_standard||^2, correction off.
  standard: optax.Updates  # ||u_standard||^2.
  jensen: optax.Updates  # ||u_corrected - u_uncorrected||^2.
  uncorrected: optax.Updates  # ||u_uncorrected||^2.


class DiagnosticsState(NamedTuple):
  """State of a transform built with ``diagnostics=True``."""

  inner: optax.OptState  # the transform's usual state.
  diagnostics: Diagnostics  # of the last update.


def _scalars(params: PyTree) -> PyTree:
  return jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)


def init(params: PyTree) -> Diagnostics:
  """Zero diagnostics for ``params``."""
  zeros = _scalars(params)
  return Diagnostics(jnp.zeros([], jnp.int32), *([zeros] * 6))


def squared_norms(tree: PyTree) -> PyTree:
  """``||x||^2`` per leaf, in float32 (or higher)."""
  return jax.tree.map(
      lambda x: jnp.sum(jnp.square(x.astype(jnp.promote_types(
          x.dtype, jnp.float32)))), tree)


def _distances(a: PyTree, b: PyTree) -> PyTree:
  return squared_norms(jax.tree.map(jnp.subtract, a, b))


def measure(
    mb: microbatch.Microbatches,
    mean_sq_sum: tuple[PyTree, PyTree],
    u: PyTree,
    u_uncorrected: Optional[PyTree] = None,
    u_standard: Optional[PyTree] = None,
) -> Diagnostics:
  """The diagnostics of one update.

  Args:
    mb: the microbatch layout.
    mean_sq_sum: ``(gbar, sum_j ||g_j||^2 per leaf)`` from
      :func:`bcopt._src.microbatch.mean_and_squares`.
    u, u_uncorrected, u_standard: the update, the same scheme without the
      correction, and the standard update without it: trees with the
      parameters' structure (for a tile layout any orthogonal image of the
      update, e.g. SOAP's rotated coordinates). Without the other two, the
      update has neither coupling nor correction (a step on a cached
      inverse): both shares are 0, and no difference is computed.

  Returns:
    :class:`Diagnostics`; ``tr S`` uses ``sum_j ||g_j||^2 - M ||gbar||^2``
    (float32 sums: for microbatches far more alike than their mean is
    large, its relative error is about ``1e-7 M ||gbar||^2 / tr S``).
  """
  g_bar, square_sum = mean_sq_sum
  m = mb.total
  # The norms are reductions: of trees written once (fusion.apart), which
  # XLA:CPU would otherwise recompute inside single-threaded reduction
  # kernels.
  if u_uncorrected is None:
    mean_sq, norms = fusion.apart(
        lambda *t: tuple(map(squared_norms, t)), g_bar, u)
    zeros = jax.tree.map(jnp.zeros_like, norms)
    coupling, standard, jensen, uncorrected = zeros, norms, zeros, norms
  else:
    mean_sq, coupling, standard, jensen, uncorrected = fusion.apart(
        lambda g, u, u_unc, u_std: (
            squared_norms(g), _distances(u_unc, u_std), squared_norms(u_std),
            _distances(u, u_unc), squared_norms(u_unc)),
        g_bar, u, u_uncorrected, u_standard)
  trace = jax.tree.map(lambda s, q: jnp.maximum(s - m * q, 0.0) / max(m - 1, 1),
                       square_sum, mean_sq)
  return Diagnostics(
      microbatches=jnp.asarray(m, jnp.int32), trace=trace, mean_sq=mean_sq,
      coupling=coupling, standard=standard, jensen=jensen,
      uncorrected=uncorrected)


def _is_state(x) -> bool:
  return isinstance(x, DiagnosticsState)


def microbatch_diagnostics(opt_state: PyTree, microbatch_size: float = 1.0
                           ) -> dict[str, dict[str, Any]]:
  r"""The bias monitor's figures of the last update, per leaf and in total.

  From the state of a bcopt transform built with ``diagnostics=True`` (or
  any optax state tree holding exactly one):

  * ``"noise_scale"``: the gradient noise scale :math:`B_{simple} = b\,
    \mathrm{tr} S / |G|^2` (McCandlish et al. 2018) with :math:`b` =
    ``microbatch_size`` (examples per microbatch; 1 gives it in
    microbatches), :math:`\mathrm{tr} S = \sum_j \|g_j - \bar g\|^2 /
    (M-1)` and :math:`|G|^2 = \|\bar g\|^2 - \mathrm{tr} S / M` (unbiased;
    ``inf`` when it is not positive): the batch size in examples beyond
    which larger batches stop paying;
  * ``"coupling"``: :math:`\|u_{scheme} - u_{standard}\| / \|u_{standard}\|`
    with the correction off: how much cross-fitting changed the step;
  * ``"jensen"``: :math:`\|u_{corrected} - u_{uncorrected}\| /
    \|u_{uncorrected}\|` within the scheme: how much the inverse correction
    changed it.

  Each maps ``"total"`` (over the tree: ratios of summed squares) and
  ``"leaves"`` (a tree like the parameters) to float32 arrays. Pure and
  jittable; ratios with a zero denominator are 0.

  Args:
    opt_state: an optimizer state.
    microbatch_size: examples per microbatch, :math:`b`.

  Returns:
    ``{"noise_scale" | "coupling" | "jensen": {"total", "leaves"}}``.

  Raises:
    ValueError: if ``opt_state`` holds no diagnostics or more than one.

  Examples:
    >>> import jax, jax.numpy as jnp, bcopt
    >>> tx = bcopt.adamw_bc(1e-3, diagnostics=True)
    >>> params = {"w": jnp.zeros(4)}
    >>> g = {"w": 1.0 + jax.random.normal(jax.random.key(0), (8, 4))}
    >>> _, state = tx.update(g, tx.init(params), params)
    >>> d = bcopt.microbatch_diagnostics(state, microbatch_size=16)
    >>> sorted(d), d["noise_scale"]["leaves"]["w"].shape
    (['coupling', 'jensen', 'noise_scale'], ())
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state)
           if _is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"microbatch_diagnostics: found {len(found)} diagnostics states in"
        " opt_state; build one bcopt transform with diagnostics=True (or"
        " pass its own state).")
  d = found[0].diagnostics
  m = jnp.maximum(d.microbatches, 1).astype(jnp.float32)

  def noise(trace, mean_sq):
    signal = mean_sq - trace / m
    return jnp.where(signal > 0, microbatch_size * trace / jnp.where(
        signal > 0, signal, 1.0), jnp.inf)

  def share(num, den):
    return jnp.where(den > 0, jnp.sqrt(num / jnp.where(den > 0, den, 1.0)),
                     0.0)

  total = lambda tree: sum(jax.tree.leaves(tree))
  return {
      "noise_scale": {"total": noise(total(d.trace), total(d.mean_sq)),
                      "leaves": jax.tree.map(noise, d.trace, d.mean_sq)},
      "coupling": {"total": share(total(d.coupling), total(d.standard)),
                   "leaves": jax.tree.map(share, d.coupling, d.standard)},
      "jensen": {"total": share(total(d.jensen), total(d.uncorrected)),
                 "leaves": jax.tree.map(share, d.jensen, d.uncorrected)},
  }


def transform(init_fn, update_fn, enabled: bool):
  """``(init, update)`` of a family transform, with diagnostics if
  ``enabled``.

  ``update_fn(updates, state, params, *, diagnostics, **extra)`` returns
  ``(updates, new_state, measured)`` with ``measured`` a
  :class:`Diagnostics` when ``diagnostics`` is True (else None).
  """
  if not enabled:
    def update(updates, state, params=None, **extra):
      u, new_state, _ = update_fn(updates, state, params, diagnostics=False,
                                  **extra)
      return u, new_state
    return init_fn, update

  def init_with(params):
    return DiagnosticsState(init_fn(params), init(params))

  def update_with(updates, state, params=None, **extra):
    u, new_state, measured = update_fn(updates, state.inner, params,
                                       diagnostics=True, **extra)
    return u, DiagnosticsState(new_state, measured)

  return init_with, update_with
