"""Shampoo-BC: Kronecker-factored preconditioning with bias corrections.

Layout of the parameters (static, read from their shapes):

* **Rank.** A parameter of rank ``r >= 2`` is treated as the matrix
  ``(prod(shape[:-1]), shape[-1])``: its leading axes are merged (a Flax
  ``DenseGeneral`` kernel ``(heads, head_dim, embed)`` becomes
  ``(heads * head_dim, embed)``, a conv kernel ``(h, w, in, out)`` becomes
  ``(h * w * in, out)``). Reshape such parameters yourself if you want
  another grouping.
* **Eligibility.** The matrix is preconditioned when both of its dimensions
  are at least 2 and at most :data:`MAX_PRECONDITIONED_DIM`; everything else
  (scalars, vectors, ``(1, n)`` matrices, vocabulary-sized embeddings) goes
  to the AdamW-BC fallback (:func:`bcopt.scale_by_adam_bc`'s code, with the
  same scheme and estimator).
* **Blocking.** A dimension ``d > block_size`` is split into
  ``n = ceil(d / block_size)`` tiles of ``t = ceil(d / n) <= block_size``
  rows; the last tile is zero-padded by ``n t - d < n`` rows. Each tile has
  its own factors. Padded coordinates carry no gradient and no update; they
  get a unit diagonal in the eigendecomposition so they never mix with real
  directions.
* **State size.** An eligible parameter with ``n1 x n2`` tiles of
  ``t1 x t2`` holds ``2 n1 n2 (t1^2 + t2^2)`` floats (``L``, ``R`` and their
  cached roots) besides its momentum (and Adam's ``nu`` with grafting); for
  square tiles that is about four times the parameter, and
  ``2 (d1^2 + d2^2)`` for a matrix that fits in one tile.
"""

import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcopt._src import adam
from bcopt._src import crossfit
from bcopt._src import diagnostics as diagnostics_lib
from bcopt._src import inverse
from bcopt._src import microbatch
from bcopt._src import numerics

PyTree = Any
Graft = Optional[Literal["adam"]]
GRAFTS = (None, "adam")
SHAMPOO_SCHEMES = (None, "twofold", "symmetric")

# Matrices with a (merged) dimension above this go to the AdamW-BC fallback:
# vocabulary-sized embeddings and output heads would need ceil(d / block)
# eigendecompositions per root step for little benefit.
MAX_PRECONDITIONED_DIM = 16384

_HIGHEST = jax.lax.Precision.HIGHEST
_MASKED = optax.MaskedNode()

# Per-parameter work is written as ``jax.tree.map`` over a *tiling tree*:
# the parameters' tree with a ``_Tiling`` at each eligible leaf and
# ``optax.MaskedNode()`` (an empty subtree) at each fallback leaf, so maps
# led by it visit the eligible parameters only, and the state's fields
# (MaskedNode where unused) line up with it.


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """How one eligible parameter maps to a stack of equally shaped tiles.

  Not a pytree: a leaf of the tiling tree.
  """

  shape: tuple[int, ...]  # the parameter's shape.
  rows: int  # d1 = prod(shape[:-1]).
  cols: int  # d2 = shape[-1].
  row_tiles: int  # n1 = ceil(d1 / block_size).
  col_tiles: int  # n2.
  row_size: int  # t1 = ceil(d1 / n1).
  col_size: int  # t2.

  @property
  def count(self) -> int:
    return self.row_tiles * self.col_tiles

  @property
  def padded(self) -> bool:
    return (self.row_tiles * self.row_size != self.rows
            or self.col_tiles * self.col_size != self.cols)


def _tiling(shape, block_size: int) -> Optional[_Tiling]:
  """The tiling of an eligible parameter shape, None for the fallback."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    return None
  rows, cols = math.prod(shape[:-1]), shape[-1]
  if min(rows, cols) < 2 or max(rows, cols) > MAX_PRECONDITIONED_DIM:
    return None
  n1, n2 = -(-rows // block_size), -(-cols // block_size)
  return _Tiling(shape, rows, cols, n1, n2, -(-rows // n1), -(-cols // n2))


def _tilings(tree: PyTree, block_size: int, *, microbatched: bool) -> PyTree:
  """The tiling tree of parameters (or of microbatched gradients)."""
  def tiling(x):
    shape = jnp.shape(x)[1:] if microbatched else jnp.shape(x)
    return _tiling(shape, block_size) or _MASKED
  return jax.tree.map(tiling, tree)


def _is_fallback(tiling) -> bool:
  return isinstance(tiling, optax.MaskedNode)


def _keep(tree: PyTree, mask: PyTree) -> PyTree:
  """``tree`` with ``optax.MaskedNode()`` where the boolean ``mask`` is off."""
  return jax.tree.map(lambda x, keep: x if keep else _MASKED, tree, mask)


def _eligible(tree: PyTree, tilings: PyTree) -> PyTree:
  """A parameter-shaped ``tree`` restricted to the tiling tree's leaves."""
  return jax.tree.map(lambda x, t: _MASKED if _is_fallback(t) else x, tree,
                      tilings)


def _to_tiles(x: jax.Array, t: _Tiling) -> jax.Array:
  """Param-shaped ``x`` -> ``(n1 n2, t1, t2)`` tiles (zero-padded)."""
  x = x.reshape(t.rows, t.cols)
  pad_rows = t.row_tiles * t.row_size - t.rows
  pad_cols = t.col_tiles * t.col_size - t.cols
  if pad_rows or pad_cols:
    x = jnp.pad(x, ((0, pad_rows), (0, pad_cols)))
  x = x.reshape(t.row_tiles, t.row_size, t.col_tiles, t.col_size)
  return x.transpose(0, 2, 1, 3).reshape(t.count, t.row_size, t.col_size)


def _from_tiles(x: jax.Array, t: _Tiling) -> jax.Array:
  """Inverse of :func:`_to_tiles` (drops the padding)."""
  x = x.reshape(t.row_tiles, t.col_tiles, t.row_size, t.col_size)
  x = x.transpose(0, 2, 1, 3).reshape(
      t.row_tiles * t.row_size, t.col_tiles * t.col_size)
  return x[:t.rows, :t.cols].reshape(t.shape)


def _padding(t: _Tiling) -> tuple[np.ndarray, np.ndarray]:
  """0/1 indicators ``(n, t1)`` and ``(n, t2)`` of the padded coordinates."""
  rows = np.arange(t.row_tiles * t.row_size).reshape(t.row_tiles, 1,
                                                     t.row_size) >= t.rows
  cols = np.arange(t.col_tiles * t.col_size).reshape(1, t.col_tiles,
                                                     t.col_size) >= t.cols
  shape = (t.row_tiles, t.col_tiles)
  return (np.broadcast_to(rows, shape + (t.row_size,)).reshape(
              t.count, t.row_size).astype(np.float32),
          np.broadcast_to(cols, shape + (t.col_size,)).reshape(
              t.count, t.col_size).astype(np.float32))


class ScaleByShampooBCState(NamedTuple):
  """State of :func:`scale_by_shampoo_bc`.

  Trees shaped like the parameters; entries that a parameter does not use
  are ``optax.MaskedNode()`` (no arrays). ``n`` is the parameter's tile
  count and ``t1 x t2`` its tile shape (see the module docstring).
  """

  count: chex.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # param shapes, mu_dtype (float32 default): momentum of
  #                    every parameter (Shampoo's Mom, Adam's first moment).
  nu: optax.Updates  # param shapes, float32: Adam's second moment
  #                    (fallback_b2) for fallback parameters, and for all
  #                    parameters with graft="adam"; MaskedNode otherwise.
  left: optax.Updates  # (n, t1, t1) float32: factor L per tile.
  right: optax.Updates  # (n, t2, t2) float32: factor R per tile.
  left_root: optax.Updates  # (n, t1, t1) float32: cached corrected L^(-1/e)
  #                           of the full-batch factor (identity at init).
  right_root: optax.Updates  # (n, t2, t2) float32: same for R.


class _Factors(NamedTuple):
  """One eligible parameter's factors and roots (tiles, as in the state)."""

  left: jax.Array
  right: jax.Array
  left_root: jax.Array
  right_root: jax.Array


def _factors(tilings: PyTree, state: ScaleByShampooBCState) -> PyTree:
  """The state's factors and roots as one ``_Factors`` per eligible leaf."""
  return jax.tree.map(lambda t, *f: _Factors(*f), tilings, state.left,
                      state.right, state.left_root, state.right_root)


def _initial_factors(t: _Tiling, param) -> _Factors:
  """Zero factors and identity roots of one eligible parameter."""
  dtype = numerics.accumulation_dtype(jnp.result_type(param))
  zeros = lambda size: jnp.zeros((t.count, size, size), dtype)
  eye = lambda size: jnp.broadcast_to(jnp.eye(size, dtype=dtype),
                                      (t.count, size, size))
  return _Factors(zeros(t.row_size), zeros(t.col_size), eye(t.row_size),
                  eye(t.col_size))


def _field(tilings: PyTree, factors: PyTree, name: str) -> PyTree:
  """One ``_Factors`` field as a state tree (MaskedNode for the fallback)."""
  return jax.tree.map(lambda t, f: getattr(f, name), tilings, factors)


def _eigh(factor: jax.Array, diagonal: jax.Array):
  """Eigendecomposition of ``factor + diag(diagonal)`` (batched, symmetric)."""
  matrix = factor + jnp.eye(factor.shape[-1], dtype=factor.dtype) * diagonal[
      ..., None, :]
  return jnp.linalg.eigh(0.5 * (matrix + jnp.swapaxes(matrix, -1, -2)))


def _project(q_l: jax.Array, x: jax.Array, q_r: jax.Array) -> jax.Array:
  """``Z = Q_L^T X Q_R`` for every tile: one chain of two products."""
  return jnp.einsum("nik,nij,njl->nkl", q_l, x, q_r, precision=_HIGHEST)


def _projected_norms(z: jax.Array) -> jax.Array:
  """``||row_k(Q_L^T X)||^2`` then ``||col_k(X Q_R)||^2``: ``(n, t1 + t2)``.

  Both are read off ``Z = Q_L^T X Q_R`` (:func:`_project`): orthogonal
  ``Q_R`` keeps row norms, orthogonal ``Q_L`` column norms.
  """
  z = z * z
  return jnp.concatenate([jnp.sum(z, axis=-1), jnp.sum(z, axis=-2)], axis=-1)


def _root(q: jax.Array, d: jax.Array) -> jax.Array:
  """``Q diag(d) Q^T`` for every tile."""
  return jnp.einsum("nik,njk->nij", q * d[:, None, :], q, precision=_HIGHEST)


def _finite(*tiles: jax.Array) -> jax.Array:
  """Per tile: are all entries of all ``(n, ...)`` arrays finite? ``(n,)``."""
  return jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x), axis=(-2, -1)) for x in tiles]), axis=0)


def _where_tiles(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  return jnp.where(ok[:, None, None], new, old)


def _graft(u: jax.Array, reference: jax.Array, t: _Tiling) -> jax.Array:
  """Rescales each tile of ``u`` to the Frobenius norm of ``reference``'s."""
  if t.padded:  # padded entries of u are ~0; make them exactly 0
    pad_l, pad_r = _padding(t)
    u = u * ((1 - pad_l)[:, :, None] * (1 - pad_r)[:, None, :])
  u_norm = jnp.sqrt(jnp.sum(u * u, axis=(-2, -1), keepdims=True))
  r_norm = jnp.sqrt(jnp.sum(reference * reference, axis=(-2, -1),
                            keepdims=True))
  safe = jnp.where(u_norm > 0, u_norm, 1.0)
  return u * jnp.where(u_norm > 0, r_norm / safe, 0.0)


class _Eigen(NamedTuple):
  """One eligible parameter's candidate factors and their eigensystems."""

  left: jax.Array  # (n, t1, t1): L_c.
  right: jax.Array  # (n, t2, t2): R_c.
  tiles: jax.Array  # (n, t1, t2): the group's mean gradient in tiles.
  left_vectors: jax.Array  # (n, t1, t1): Q_L.
  right_vectors: jax.Array  # (n, t2, t2): Q_R.
  values: jax.Array  # (n, t1 + t2): eigenvalues of L_c + damping, then R_c's.


def _factor_ema(factor: jax.Array, x: jax.Array, b2, side: str) -> jax.Array:
  """``b2 L + (1 - b2) X X^T`` (``side="left"``) or ``b2 R + (1 - b2) X^T X``
  (``"right"``) for every tile of ``x``."""
  gram = jnp.einsum("nij,nkj->nik" if side == "left" else "nji,njk->nik",
                    x, x, precision=_HIGHEST)
  return b2 * factor + (1 - b2) * gram


def _damped_eigh(t: _Tiling, factor: jax.Array, damping, side: str):
  """Eigendecomposition of a side's ``factor + damping I`` for every tile;
  padded coordinates get a unit eigenvalue, so they stay decoupled."""
  pad = _padding(t)[side == "right"] if t.padded else 0.0
  return _eigh(factor, (damping + pad) * jnp.ones(factor.shape[:-1],
                                                  factor.dtype))


def _eigen(t: _Tiling, factors: _Factors, group_mean: jax.Array, b2,
           damping) -> _Eigen:
  """Candidate factors from a group's mean gradient, eigendecomposed."""
  x = _to_tiles(group_mean, t)
  l_c = _factor_ema(factors.left, x, b2, "left")
  r_c = _factor_ema(factors.right, x, b2, "right")
  eig_l = _damped_eigh(t, l_c, damping, "left")
  eig_r = _damped_eigh(t, r_c, damping, "right")
  return _Eigen(l_c, r_c, x, eig_l.eigenvectors, eig_r.eigenvectors,
                jnp.concatenate([eig_l.eigenvalues, eig_r.eigenvalues], -1))


def _grouped_variance(tilings, eigen, grads, mb, group_name, groups, *, b2,
                      damping):
  r"""The delete-a-group jackknife variance of every eigenvalue.

  The group's ``n`` microbatches form ``K'`` contiguous subgroups of sizes
  :math:`n_k` (their means from one pass over the microbatches,
  :func:`bcopt._src.microbatch.subgroup_means`). Their projections
  :math:`Z_k = Q_L^\top \bar G_k Q_R` (``K'`` per tile) give
  :math:`n \bar Z = \sum_k n_k Z_k` and, by linearity,
  :math:`Z_{(-k)} = (n \bar Z - n_k Z_k)/(n - n_k)`; eigenvalue
  :math:`\ell_{(-k)}` is read off :math:`Z_{(-k)}` as in
  :func:`_eigenvalue_variance`, and
  :math:`V = \frac{K'-1}{K'} \sum_k (\ell_{(-k)} - \bar\ell)^2`.
  Scratch memory grows with ``K'``, not with ``M``.
  """
  sizes = microbatch.subgroup_sizes(microbatch.group_size(mb, group_name),
                                    groups)
  means = microbatch.subgroup_means(grads, mb, group_name, groups)

  def leaf(t, e, x):
    # K' separate projections, no loop or stack: XLA:CPU then keeps no
    # stacked copy of the projections or of the leave-out ones (a lax.map
    # over K' held 28 MiB more at d = 1024, M = 16, and its correction cost
    # about 1.5x as much in a profile of the whole root step).
    z_mean, z_out = microbatch.leave_subgroup_out(
        [_project(e.left_vectors, _to_tiles(x[k].astype(e.tiles.dtype), t),
                  e.right_vectors) for k in range(len(sizes))], sizes)
    base = e.values - (1 - b2) * _projected_norms(z_mean)
    return jnp.stack([jnp.maximum(  # l_(-k): (K', n, t1 + t2)
        base + (1 - b2) * _projected_norms(z), damping) for z in z_out])

  return inverse.grouped_jackknife_variance(
      jax.tree.map(leaf, tilings, eigen, means))


def _eigenvalue_variance(tilings, eigen, spectra, grads, mb, group_name, *,
                         b2, damping, estimator, groups=None):
  r"""The variance of every eigenvalue from its microbatch re-estimates.

  In the fixed eigenbases, eigenvalue :math:`k` re-estimated from the group
  without microbatch :math:`j` (jackknife) or from microbatch :math:`j`
  alone (``"paper"``) is :math:`base_k + (1-\beta_2)\|row_k(Q^\top X)\|^2`
  with :math:`base_k = \beta_2 (Q^\top L Q)_{kk} + \delta`, read off the
  eigenvalue itself: :math:`base_k = \ell_k - (1-\beta_2)\|row_k(Q^\top
  \bar X)\|^2`. Projections are linear, so the leave-one-out projection is
  :math:`(n \bar Z - Z_j)/(n - 1)` with :math:`Z = Q_L^\top X Q_R`.
  With ``groups`` (``K``) below the group's size the jackknife leaves out
  subgroups instead (:func:`_grouped_variance`).
  """
  group = microbatch.group(mb, group_name)
  n = group.size
  loo = estimator == "jackknife"
  if loo and len(microbatch.subgroup_sizes(n, groups)) < n:
    return _grouped_variance(tilings, eigen, grads, mb, group_name, groups,
                             b2=b2, damping=damping)
  z_means = jax.tree.map(
      lambda t, e: _project(e.left_vectors, e.tiles, e.right_vectors),
      tilings, eigen)
  bases = jax.tree.map(
      lambda t, e, z: e.values - (1 - b2) * _projected_norms(z),
      tilings, eigen, z_means)

  def estimates(g_j):
    """Microbatch j's eigenvalue estimates in the fixed eigenbases."""
    def leaf(t, g, e, z_mean, base):
      z = _project(e.left_vectors, _to_tiles(g.astype(z_mean.dtype), t),
                   e.right_vectors)
      if loo:  # Q_L^T Gbar_(-j) Q_R
        z = (n * z_mean - z) * (1.0 / (n - 1))
      return jnp.maximum(base + (1 - b2) * _projected_norms(z), damping)
    return jax.tree.map(leaf, tilings, g_j, eigen, z_means, bases)

  # A rolled loop: one microbatch's tile buffers at a time, so the scratch
  # memory does not grow with M (an unrolled loop lets XLA run the
  # independent per-microbatch products side by side, one set of buffers
  # each). Only the (M, n, t1 + t2) estimates are stacked; their spread,
  # group-weighted and summed over the named axis, comes from the shared
  # code (the samples are the denominators themselves).
  samples = microbatch.map_over_microbatches(estimates, grads, group)
  spread = crossfit.denominator_spread(
      lambda values: values, samples, spectra, group.layout, group.name,
      loo=False)
  return inverse.variance_from_spread(spread, n, estimator, loo=loo)


def _candidate_roots(tilings, factors, group_mean, grads, mb, group_name, *,
                     b2, damping, exponent, estimator, groups,
                     plain=False) -> PyTree:
  """Candidate factors and corrected roots from one group's statistic.

  Args:
    tilings: the tiling tree.
    factors: the ``_Factors`` before this step.
    group_mean: the group's mean gradient (param-shaped leaves).
    grads: the microbatched gradients (the group's variance visits them).
    mb: their layout.
    group_name: ``"all"``, ``"first"`` or ``"second"``.
    b2, damping, exponent, estimator: as in :func:`scale_by_shampoo_bc`.
    groups: its ``variance_groups``.

    plain: also return the uncorrected roots (for the diagnostics).

  Returns:
    A ``_Factors`` per eligible leaf: ``(L_c, R_c, P_L, P_R)``; with
    ``plain``, a pair of such trees: corrected and uncorrected roots.
  """
  eigen = jax.tree.map(
      lambda t, f, s: _eigen(t, f, s, b2, damping), tilings, factors,
      group_mean)
  spectra = jax.tree.map(lambda t, e: jnp.maximum(e.values, damping),
                         tilings, eigen)
  variance = None
  if estimator is not None:
    variance = _eigenvalue_variance(
        tilings, eigen, spectra, grads, mb, group_name, b2=b2,
        damping=damping, estimator=estimator, groups=groups)
  def factors_with(roots):
    return jax.tree.map(
        lambda t, e, d: _Factors(
            e.left, e.right, _root(e.left_vectors, d[..., :t.row_size]),
            _root(e.right_vectors, d[..., t.row_size:])),
        tilings, eigen, roots)

  corrected = factors_with(inverse.variance_correct_inverse(
      spectra, variance, exponent=exponent))
  if not plain:
    return corrected
  return corrected, factors_with(inverse.variance_correct_inverse(
      spectra, exponent=exponent))


def _momentum(tilings, mu, a, b1) -> PyTree:
  """Candidate momentum ``b1 Mom + (1 - b1) A`` in tiles."""
  return jax.tree.map(
      lambda t, m, x: _to_tiles(b1 * m.astype(x.dtype) + (1 - b1) * x, t),
      tilings, mu, a)


def _precondition(tilings, factors, momentum) -> PyTree:
  """``P_L Mom P_R`` per tile with the roots of ``factors``."""
  return jax.tree.map(
      lambda t, f, m: jnp.einsum("nij,njk,nkl->nil", f.left_root, m,
                                 f.right_root, precision=_HIGHEST),
      tilings, factors, momentum)


def _finite_roots(tilings, new, old) -> PyTree:
  """``new``'s roots, keeping ``old``'s for tiles whose new roots are not
  finite (the factors are the old ones: only the roots are used)."""
  def leaf(t, n, o):
    ok = _finite(n.left_root, n.right_root)
    return o._replace(left_root=_where_tiles(ok, n.left_root, o.left_root),
                      right_root=_where_tiles(ok, n.right_root, o.right_root))
  return jax.tree.map(leaf, tilings, new, old)


def _finite_factors(tilings, new, old) -> PyTree:
  """``new``, keeping ``old`` for tiles where any new factor or root is not
  finite."""
  def leaf(t, n, o):
    ok = _finite(*n)
    return _Factors(*(_where_tiles(ok, a, b) for a, b in zip(n, o)))
  return jax.tree.map(leaf, tilings, new, old)


def check_variance_groups(variance_groups: Any) -> None:
  """Raises a ValueError unless ``variance_groups`` is None or an int >= 2."""
  if not numerics.is_concrete(variance_groups):
    raise ValueError(
        "variance_groups must be a concrete integer (it sets how many"
        " subgroups are projected), got a traced value; with"
        " optax.inject_hyperparams, pass static_args=('variance_groups',).")
  if variance_groups is None or (
      isinstance(variance_groups, (int, np.integer))
      and not isinstance(variance_groups, bool) and variance_groups >= 2):
    return
  raise ValueError(
      f"variance_groups must be None (the exact jackknife) or an integer >= 2"
      f" (leaving out the only group would leave no microbatches), got"
      f" {variance_groups!r}.")


def check_root_step(root_step: Any) -> None:
  """Raises a ValueError unless ``root_step`` is None or a Python bool."""
  if root_step is None or isinstance(root_step, (bool, np.bool_)):
    return
  raise ValueError(
      f"root_step must be None or a Python bool fixed at trace time (mark"
      f" it static under jax.jit; None chooses root steps from the count"
      f" inside the program), got {root_step!r}.")


def _cached_step(tilings, factors, mu, g_bar, *, b1, diagnostics=False):
  """A non-root step: the cached roots on the full-batch momentum (no
  coupling, no correction: with ``diagnostics`` the three directions of
  :func:`_root_step` are this one)."""
  u = _precondition(tilings, factors, _momentum(tilings, mu, g_bar, b1))
  return ((u, u, u) if diagnostics else u), factors


def _root_step(tilings, factors, mu, grads, g_bar, mb, *, b1, scheme,
               diagnostics=False, **roots_kwargs):
  """A root step: the scheme's candidate roots, and new persistent ones.

  The persistent factors and roots come from the full batch; the update
  uses the roots of the scheme's preconditioner group on the momentum of
  its numerator group (the cross-fit table of docs/algorithms.md; tiles
  whose candidate roots are not finite fall back to the cached roots).
  With ``diagnostics`` the update is the triple ``(u, u_uncorrected,
  u_standard)``: the same with uncorrected roots, and the full batch's
  uncorrected roots on the full batch's momentum.
  """
  def candidate(name):
    mean = g_bar if name == "all" else microbatch.mean(grads, mb, name)
    return _candidate_roots(tilings, factors, mean, grads, mb, name,
                            plain=diagnostics, **roots_kwargs)

  def roots_of(candidates):
    corrected, plain = candidates if diagnostics else (candidates, None)
    guard = lambda r: _finite_roots(tilings, r, factors)
    return guard(corrected), plain if plain is None else guard(plain)

  momentum = lambda a: _momentum(tilings, mu, a, b1)
  everything = candidate("all")
  persistent = _finite_factors(
      tilings, everything[0] if diagnostics else everything, factors)
  standard = None
  if diagnostics:
    standard = _precondition(tilings, roots_of(everything)[1],
                             momentum(g_bar))
  if scheme is None:
    u = _precondition(tilings, persistent, momentum(g_bar))
    return ((u, standard, standard) if diagnostics else u), persistent

  def fold(numerator_group, preconditioner_group):
    corrected, plain = roots_of(candidate(preconditioner_group))
    mom = momentum(microbatch.mean(grads, mb, numerator_group))
    u = _precondition(tilings, corrected, mom)
    return (u, _precondition(tilings, plain, mom)) if diagnostics else u

  half = lambda x, y: jax.tree.map(lambda a, b: 0.5 * (a + b), x, y)
  u = fold("first", "second")
  if scheme == "symmetric":
    u = half(u, fold("second", "first"))
  return ((*u, standard) if diagnostics else u), persistent


def scale_by_shampoo_bc(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-6,
    *,
    exponent: float = 4,
    precondition_every: int = 10,
    block_size: int = 1024,
    graft: Graft = None,
    cross_fit: Optional[Literal["twofold", "symmetric"]] = "twofold",
    inverse_correction: inverse.Estimator = "jackknife",
    variance_groups: Optional[int] = 4,
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale microbatched gradients by bias-corrected Shampoo.

  ``update(updates, state, params, *, root_step=None)`` takes microbatched
  gradients (every leaf ``(M_local,) + param.shape``). For each tile
  :math:`W` of an eligible parameter (see the module docstring for the
  rank, eligibility and blocking rules), with :math:`t` the step count:

  .. math::

    M_c(A) = \beta_1 M + (1-\beta_1) A, \qquad
    L_c(S) = \beta_2 L + (1-\beta_2) S S^\top, \quad
    R_c(S) = \beta_2 R + (1-\beta_2) S^\top S

    L_c + \delta I = Q\,\mathrm{diag}(\ell)\,Q^\top,\qquad
    P_L = Q\,\mathrm{diag}(\tilde f(\ell))\,Q^\top,\quad
    f(x) = x^{-1/e}

    u = \begin{cases}
      \mathrm{scheme}\big[P_L(\bar G_P)\, M_c(\bar G_A)\, P_R(\bar G_P)\big]
        & (t-1) \bmod k = 0 \text{ (root step)} \\
      P_L\, M_c(\bar G)\, P_R & \text{otherwise (cached roots)}
    \end{cases}

  where ``cross_fit`` picks the numerator group :math:`A` and the
  preconditioner group :math:`P` (``"twofold"``: :math:`A` = the first
  :math:`\lfloor M/2 \rfloor` microbatches, :math:`P` the rest;
  ``"symmetric"``: the average of both assignments; ``None``: both all
  ``M``), and :math:`\tilde f` is the variance-corrected inverse root
  :math:`\max(0, \ell^{-1/e} - \tfrac{1}{2e}(\tfrac1e + 1)\ell^{-1/e-2} V)`
  of :func:`bcopt.variance_correct_inverse`. The variance :math:`V_k` of
  eigenvalue :math:`k` comes from the eigenvalues re-estimated in the fixed
  eigenbasis :math:`Q`,

  .. math::

    \ell_{(-j)k} = \beta_2 (Q^\top L Q)_{kk}
      + (1-\beta_2)\,\big\|\mathrm{row}_k(Q^\top \bar G_{P(-j)})\big\|^2
      + \delta

  and the same with :math:`\bar G_{P(-k)}`, the group's mean without
  subgroup :math:`k`. ``"jackknife"`` is the delete-a-group jackknife: the
  group's :math:`n` microbatches form :math:`K' = \min(K, n)` contiguous
  subgroups of sizes :math:`n_k` differing by at most one (larger first;
  :math:`K` = ``variance_groups``, :math:`K' = n` for ``None``),

  .. math::

    \bar G_{P(-k)} = \frac{n \bar G_P - n_k \bar G_k}{n - n_k}, \qquad
    V_k = \frac{K'-1}{K'} \sum_{k'} \big(\ell_{(-k')k}
      - \tfrac{1}{K'} \textstyle\sum_{k''} \ell_{(-k'')k}\big)^2,

  the exact jackknife for :math:`K' = n` and, for a statistic linear in the
  microbatches with equal subgroups, :math:`\mathrm{svar}(\text{subgroup
  means})/K'`. ``"paper"`` keeps its per-microbatch form,
  :math:`V_k = \mathrm{svar}_j(\ell_{jk})/n` with :math:`\ell_{jk}` the
  same with microbatch :math:`j` alone in place of the group's mean. No
  matrix per microbatch is kept, so a root step's scratch memory
  does not grow with ``M`` (subgroups: ``K'`` subgroup means and their
  projections; per microbatch: a rolled loop). The cost is one projection
  :math:`Q_L^\top X Q_R` (a ``t1 x t1 x t2`` and a ``t1 x t2 x t2``
  product, ``4 t^3`` flops for a square tile) per subgroup and group when
  :math:`K' < n`, else ``n + 1`` per group (the persistent roots' group is
  all ``M``; ``"twofold"`` adds ``M/2``, ``"symmetric"`` both halves):
  ``"twofold"`` with ``K = 4`` and ``M > 8`` costs 8 projections per
  square tile, the exact jackknife ``1.5 M + 2``, against four
  eigendecompositions and about ``20 t^3`` flops for the uncorrected root
  step (``docs/shampoo_bc.md`` gives measured costs).
  Persistent state comes from the full batch:
  :math:`M \leftarrow M_c(\bar G)` every step; on root steps
  :math:`L \leftarrow L_c(\bar G)`, :math:`R \leftarrow R_c(\bar G)`, and
  the cached roots are recomputed from them with the same correction over
  all ``M`` microbatches. Statistics, eigendecompositions and variances are
  computed on root steps only; other steps cost two matrix products per
  tile. With ``root_step=None`` the step kind is chosen from the count by
  ``jax.lax.cond`` in one program, whose buffer assignment reserves the
  root step's scratch memory on every step. A Python bool ``root_step``
  (static under ``jax.jit``) compiles that step kind alone, so non-root
  steps hold only their own scratch; it decides whether this call is a
  root step (``(t - 1) % precondition_every == 0`` keeps the schedule,
  with ``t`` the 1-based step) and overrides ``precondition_every``. The
  momentum is not bias-corrected (as in the paper's Shampoo-BC).

  Eigendecompositions run in float32 (float64 for float64 parameters) on the
  damped factors, and eigenvalues are floored at :math:`\delta`. If a
  tile's new factors or roots are not finite (an overflowing gradient),
  that tile keeps its previous factors and cached roots, and the step uses
  the cached roots, instead of poisoning the parameters.

  On CPU, ``jnp.linalg.eigh`` calls LAPACK from SciPy's OpenBLAS, whose
  worker threads busy-wait: on a machine with more runnable threads than
  cores, root steps can become many times slower. Set
  ``OPENBLAS_NUM_THREADS=1`` before starting Python there.

  With ``graft="adam"`` each tile's direction is rescaled to the Frobenius
  norm of the bias-corrected AdamW-BC direction of that tile
  (:math:`\beta_1`, ``fallback_b2``, ``fallback_eps``, same scheme and
  estimator), computed by the fallback's code from the shared momentum and
  Adam's ``nu``. Parameters that are not eligible get that AdamW-BC
  direction itself.

  Parameter layout (static, from the shapes): a parameter of rank
  :math:`\ge 2` is the matrix ``(prod(shape[:-1]), shape[-1])`` (leading
  axes merged); it is eligible when both dimensions are in
  ``[2, MAX_PRECONDITIONED_DIM]`` (16384), otherwise (scalars, vectors,
  vocabulary-sized dimensions) it takes the AdamW-BC fallback. A dimension
  :math:`d` > ``block_size`` is split into :math:`n = \lceil d /
  \mathrm{block\_size} \rceil` tiles of :math:`\lceil d/n \rceil` (the last
  zero-padded by fewer than :math:`n` rows). An ``n1 x n2`` grid of
  ``t1 x t2`` tiles holds :math:`2 n_1 n_2 (t_1^2 + t_2^2)` floats of
  factors and cached roots, about four times the parameter for square
  tiles, plus the momentum.

  Args:
    b1: :math:`\beta_1`, momentum decay (shared with the fallback's Adam).
    b2: :math:`\beta_2`, decay of the factors per root step.
    damping: :math:`\delta > 0`, added to the factors before the
      eigendecomposition and the floor of the eigenvalues.
    exponent: :math:`e > 0` of :math:`f(x) = x^{-1/e}` (4: the classic
      :math:`L^{-1/4} G R^{-1/4}`).
    precondition_every: :math:`k \ge 1`; root steps are the steps
      :math:`t` with :math:`(t - 1) \bmod k = 0`, so the first step is one.
    block_size: largest tile dimension (``>= 2``).
    graft: ``None`` or ``"adam"`` (per-tile Adam norm grafting).
    cross_fit: ``None``, ``"twofold"`` (default) or ``"symmetric"``.
      ``"loo"`` is rejected: each fold would need its own preconditioner,
      that is one eigendecomposition per microbatch.
    inverse_correction: ``None``, ``"jackknife"`` (default) or ``"paper"``.
    variance_groups: :math:`K`, the subgroups of the delete-a-group
      jackknife (default 4: ``K`` projections per group instead of ``n``;
      an integer ``>= 2``), or ``None`` for the exact jackknife
      (:math:`K' = n`). Groups of at most ``K`` microbatches use the exact
      one. Unused by ``"paper"`` and the AdamW-BC fallback.
    fallback_b2: Adam's :math:`\beta_2` for fallback parameters and grafting.
    fallback_eps: Adam's :math:`\epsilon` for the same.
    mu_dtype: dtype of the momentum (default float32, or wider params').
    axis_name: named microbatch axis when ``update`` runs inside ``pmap``,
      ``shard_map`` or ``vmap(axis_name=...)``.
    diagnostics: also measure the microbatch diagnostics (as
      :func:`bcopt.scale_by_adam_bc`). On root steps the uncorrected update
      uses the same eigendecompositions with plain roots, and the standard
      one the full batch's plain roots on its momentum; other steps use the
      cached roots, so their Shampoo parts add no coupling or Jensen share.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes the
    keyword ``root_step`` (``None``, ``True`` or ``False``, see above).

  Raises:
    ValueError: for bad options at construction and, at trace time, for too
      few microbatches, gradients without the microbatch axis or a traced
      ``root_step``.

  Examples:
    >>> import jax, jax.numpy as jnp, bcopt
    >>> params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    >>> tx = bcopt.scale_by_shampoo_bc(precondition_every=2)
    >>> state = tx.init(params)
    >>> state.left["w"].shape, state.right["w"].shape   # one tile
    ((1, 6, 6), (1, 4, 4))
    >>> grads = jax.tree.map(   # M = 4 microbatch gradients
    ...     lambda p: jax.random.normal(jax.random.key(0), (4,) + p.shape),
    ...     params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> updates["w"].shape, updates["b"].shape
    ((6, 4), (4,))
    >>> step = jax.jit(tx.update, static_argnames="root_step")  # per kind
    >>> t = int(state.count) + 1   # step 2: not a root step
    >>> updates, state = step(grads, state, params, root_step=(t - 1) % 2 == 0)

  References:
    Gupta et al., 2018, arXiv:1802.09568 (Shampoo); Anil et al., 2020,
    arXiv:2002.09018 (blocking, grafting); Nayak et al., 2026,
    arXiv:2605.20756.
  """
  if cross_fit == "loo":
    raise ValueError(
        "cross_fit='loo' is not available for Shampoo-BC: every leave-one-out"
        " fold needs its own preconditioner, i.e. one eigendecomposition per"
        " microbatch and factor on every root step. Use 'twofold' or"
        " 'symmetric' (or None).")
  crossfit.check_scheme(cross_fit, SHAMPOO_SCHEMES)
  inverse.check_estimator(inverse_correction)
  if graft not in GRAFTS:
    raise ValueError(f"graft={graft!r} is not one of {GRAFTS}.")
  numerics.check_positive("damping", damping, "it floors the eigenvalues")
  numerics.check_positive("exponent", exponent)
  numerics.check_integer("precondition_every", precondition_every, 1)
  numerics.check_integer("block_size", block_size, 2)
  check_variance_groups(variance_groups)
  block_size = int(block_size)
  precondition_every = int(precondition_every)
  roots_kwargs = dict(b2=b2, damping=damping, exponent=exponent,
                      estimator=inverse_correction, groups=variance_groups)

  def uses_adam(tree, tilings):
    """Per leaf: does it need Adam (the fallback, or the graft norm)?"""
    return jax.tree.map(lambda x, t: _is_fallback(t) or graft == "adam",
                        tree, tilings)

  def init_fn(params):
    tilings = _tilings(params, block_size, microbatched=False)
    factors = jax.tree.map(_initial_factors, tilings,
                           _eligible(params, tilings))
    return ScaleByShampooBCState(
        count=jnp.zeros([], jnp.int32),
        mu=numerics.zeros_moment(params, mu_dtype),
        nu=_keep(numerics.zeros_moment(params), uses_adam(params, tilings)),
        **{name: _field(tilings, factors, name) for name in _Factors._fields},
    )

  def adam_directions(updates, state, adam_mask, count, mb, diagnostics):
    """AdamW-BC: fallback parameters, and every tile's graft norm."""
    grads, mu = _keep(updates, adam_mask), _keep(state.mu, adam_mask)
    numerator_fn, denominator_fn = adam.adam_terms(
        mu, state.nu, count, b1, fallback_b2, fallback_eps)
    return crossfit.cross_fitted(
        grads, numerator_fn, denominator_fn, mb, scheme=cross_fit,
        inverse_correction=inverse_correction, diagnostics=diagnostics)

  def direction(tiling, adam_u, shampoo_u):
    """A parameter's direction: Adam's, or Shampoo's tiles (grafted)."""
    if _is_fallback(tiling):
      return adam_u
    if graft == "adam":
      shampoo_u = _graft(shampoo_u, _to_tiles(adam_u, tiling), tiling)
    return _from_tiles(shampoo_u, tiling)

  def update_fn(updates, state, params=None, *, diagnostics, root_step=None,
                **extra_args):
    del extra_args  # optax chains forward every keyword argument
    check_root_step(root_step)
    mb = microbatch.layout(updates, axis_name, params)
    crossfit.check_microbatch_count(mb, cross_fit, inverse_correction)
    count = optax.safe_increment(state.count)
    tilings = _tilings(updates, block_size, microbatched=True)
    adam_mask = uses_adam(updates, tilings)
    if diagnostics:
      mean_sq_sum = microbatch.mean_and_squares(updates, mb)
      g_bar = mean_sq_sum[0]
    else:
      g_bar = microbatch.mean(updates, mb)
    versions = 3 if diagnostics else 1  # (u, u_uncorrected, u_standard)
    as_versions = lambda x: x if diagnostics else (x,)
    adam_u = (_keep(updates, adam_mask),) * versions
    if any(jax.tree.leaves(adam_mask)):
      adam_u = as_versions(adam_directions(updates, state, adam_mask, count,
                                           mb, diagnostics))
    factors = _factors(tilings, state)
    # MaskedNode everywhere, unless a leaf is eligible
    shampoo_u = (factors,) * versions
    if jax.tree.leaves(tilings):
      grads, mu, mean = (_eligible(x, tilings)
                         for x in (updates, state.mu, g_bar))
      root = functools.partial(_root_step, tilings, factors, mu, grads, mean,
                               mb, b1=b1, scheme=cross_fit,
                               diagnostics=diagnostics, **roots_kwargs)
      cached = functools.partial(_cached_step, tilings, factors, mu, mean,
                                 b1=b1, diagnostics=diagnostics)
      if root_step is None:  # one program: XLA reserves both kinds' scratch
        shampoo_u, factors = jax.lax.cond(
            (count - 1) % precondition_every == 0, root, cached)
      else:  # a program for this step kind only
        shampoo_u, factors = root() if root_step else cached()
      shampoo_u = as_versions(shampoo_u)
    directions, *others = [jax.tree.map(
        lambda g, t, a, s: direction(t, a, s), updates, tilings, a_u, s_u)
                           for a_u, s_u in zip(adam_u, shampoo_u)]
    measured = diagnostics_lib.measure(
        mb, mean_sq_sum, directions, *others) if diagnostics else None
    new_state = ScaleByShampooBCState(
        count=count,
        mu=numerics.update_moment(state.mu, g_bar, b1),
        nu=numerics.update_moment(
            state.nu, jax.tree.map(jnp.square, _keep(g_bar, adam_mask)),
            fallback_b2),
        **{name: _field(tilings, factors, name) for name in _Factors._fields},
    )
    return optax.tree.cast_like(directions, updates), new_state, measured

  init, update = diagnostics_lib.transform(init_fn, update_fn, diagnostics)
  return optax.GradientTransformationExtraArgs(
      init, microbatch.on_explicit_mesh(update))


def shampoo_bc(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.1,
    *,
    exponent: float = 4,
    precondition_every: int = 10,
    block_size: int = 1024,
    graft: Graft = None,
    cross_fit: Optional[Literal["twofold", "symmetric"]] = "twofold",
    inverse_correction: inverse.Estimator = "jackknife",
    variance_groups: Optional[int] = 4,
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mask: Optional[Any] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo with cross-fitting and variance-corrected inverse roots.

  ``optax.chain(scale_by_shampoo_bc(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``:

  .. math::

    \Delta\theta = -\eta_t\big(u + \lambda\theta\big)

  with :math:`u` from :func:`scale_by_shampoo_bc` (Shampoo for eligible
  matrices, AdamW-BC for the rest). ``update`` takes microbatched gradients
  and needs ``params``.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1, b2, damping: see :func:`scale_by_shampoo_bc`.
    weight_decay: :math:`\lambda`, decoupled weight decay.
    exponent, precondition_every, block_size, graft, cross_fit,
      inverse_correction, variance_groups, fallback_b2, fallback_eps,
      mu_dtype, axis_name, diagnostics: see :func:`scale_by_shampoo_bc`
      (also for ``update``'s keyword ``root_step``).
    mask: which parameters decay (as in ``optax.adamw``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, bcopt
    >>> params = {"w": jnp.ones((4, 3))}
    >>> loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 4))   # M = 8
    >>> tx = bcopt.shampoo_bc(1e-2, graft="adam")
    >>> state = tx.init(params)
    >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, x)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Gupta et al., 2018, arXiv:1802.09568; Nayak et al., 2026,
    arXiv:2605.20756.
  """
  return optax.chain(
      scale_by_shampoo_bc(
          b1, b2, damping, exponent=exponent,
          precondition_every=precondition_every, block_size=block_size,
          graft=graft, cross_fit=cross_fit,
          inverse_correction=inverse_correction,
          variance_groups=variance_groups, fallback_b2=fallback_b2,
          fallback_eps=fallback_eps, mu_dtype=mu_dtype, axis_name=axis_name,
          diagnostics=diagnostics),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
