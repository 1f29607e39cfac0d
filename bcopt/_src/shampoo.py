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

import math
from typing import Any, Literal, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from bcopt._src import adam
from bcopt._src import crossfit
from bcopt._src import inverse
from bcopt._src import microbatch

PyTree = Any
Graft = Optional[Literal["adam"]]
GRAFTS = (None, "adam")
SHAMPOO_SCHEMES = (None, "twofold", "symmetric")

# Matrices with a (merged) dimension above this go to the AdamW-BC fallback:
# vocabulary-sized embeddings and output heads would need ceil(d / block)
# eigendecompositions per root step for little benefit.
MAX_PRECONDITIONED_DIM = 16384

_HIGHEST = jax.lax.Precision.HIGHEST


class _Tiling(NamedTuple):
  """How one eligible parameter maps to a stack of equally shaped tiles."""

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


def _group_members(mb: microbatch.Microbatches, group: str):
  """The microbatches a group's variance visits: ``(indices, layout, group)``.

  On a stacked axis the group is a static range of the leading axis, so the
  projections of the other group's microbatches are never computed (and the
  gradients are indexed in place, not sliced into a copy); on a named axis
  group membership depends on the member, so every local microbatch is
  visited and the group is a 0/1 weighting.
  """
  if mb.axis_name is not None or group == "all":
    return jnp.arange(mb.local), mb, group
  half = mb.total // 2
  start, stop = (0, half) if group == "first" else (half, mb.total)
  n = stop - start
  return (jnp.arange(start, stop),
          microbatch.Microbatches(local=n, total=n, axis_name=None), "all")


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
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformation:
  r"""Rescale microbatched gradients by bias-corrected Shampoo.

  ``update`` takes microbatched gradients (every leaf
  ``(M_local,) + param.shape``). For each tile :math:`W` of an eligible
  parameter (see the module docstring for the rank, eligibility and
  blocking rules), with :math:`t` the step count:

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

  (``"jackknife"``: :math:`V_k = \frac{n-1}{n}\sum_j (\ell_{(-j)k} -
  \bar\ell_k)^2`; ``"paper"``: the same with each microbatch alone,
  :math:`V_k = \mathrm{svar}_j(\ell_{jk})/n`), computed in a rolled loop
  over the group's microbatches that keeps one microbatch's tile buffers at
  a time: no matrix per microbatch is kept, and a root step's scratch
  memory does not grow with ``M``. The cost is one ``t1 x t1 x t2`` and one
  ``t1 x t2 x t2`` product per microbatch, tile and group (the persistent
  roots' group is all ``M``; ``"twofold"`` adds ``M/2``, ``"symmetric"``
  ``M``): about ``6 M t^3`` flops per square tile for ``"twofold"``,
  against four eigendecompositions and about ``20 t^3`` flops for the
  uncorrected root step (on 2 CPU cores at ``t = 1024`` the correction
  adds 41% (wall) / 53% (CPU time) to a twofold root step at ``M = 4`` and
  118% / 151% at ``M = 16``, as much as the ``1.5 M`` projections cost on
  their own; ``benchmarks/shampoo_cost.py``). Persistent state comes from
  the full batch:
  :math:`M \leftarrow M_c(\bar G)` every step; on root steps
  :math:`L \leftarrow L_c(\bar G)`, :math:`R \leftarrow R_c(\bar G)`, and
  the cached roots are recomputed from them with the same correction over
  all ``M`` microbatches. Statistics, eigendecompositions and variances are
  computed on root steps only, inside ``jax.lax.cond``; other steps cost two
  matrix products per tile. The momentum is not bias-corrected (as in
  SPEC section 5).

  Eigendecompositions run in float32 (float64 for float64 parameters) on the
  damped factors, and eigenvalues are floored at :math:`\delta`. If a
  tile's new factors or roots are not finite (an overflowing gradient),
  that tile keeps its previous factors and cached roots, and the step uses
  the cached roots, instead of poisoning the parameters.

  On CPU, ``jnp.linalg.eigh`` calls LAPACK from SciPy's OpenBLAS, whose
  worker threads busy-wait: on a machine with more runnable threads than
  cores a root step can take 100 times longer than it should (a ``256 x
  256`` eigendecomposition 1-2 s instead of 4 ms). Set
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
    fallback_b2: Adam's :math:`\beta_2` for fallback parameters and grafting.
    fallback_eps: Adam's :math:`\epsilon` for the same.
    mu_dtype: dtype of the momentum (default float32, or wider params').
    axis_name: named microbatch axis when ``update`` runs inside ``pmap``,
      ``shard_map`` or ``vmap(axis_name=...)``.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for bad options at construction and, at trace time, for too
      few microbatches or gradients without the microbatch axis.

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
  if not damping > 0:
    raise ValueError(
        f"damping must be positive (it floors the eigenvalues), got"
        f" {damping!r}.")
  if not exponent > 0:
    raise ValueError(f"exponent must be positive, got {exponent!r}.")
  if int(precondition_every) != precondition_every or precondition_every < 1:
    raise ValueError(
        f"precondition_every must be a positive integer, got"
        f" {precondition_every!r}.")
  if int(block_size) != block_size or block_size < 2:
    raise ValueError(
        f"block_size must be an integer >= 2, got {block_size!r}.")
  block_size = int(block_size)
  precondition_every = int(precondition_every)

  def uses_adam(tiling):
    return tiling is None or graft == "adam"

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    nu, left, right, left_root, right_root = [], [], [], [], []
    for p in leaves:
      t = _tiling(jnp.shape(p), block_size)
      dtype = microbatch.accumulation_dtype(jnp.result_type(p))
      nu.append(jnp.zeros(jnp.shape(p), dtype) if uses_adam(t)
                else optax.MaskedNode())
      if t is None:
        for field in (left, right, left_root, right_root):
          field.append(optax.MaskedNode())
        continue
      for field, size in ((left, t.row_size), (right, t.col_size)):
        field.append(jnp.zeros((t.count, size, size), dtype))
      for field, size in ((left_root, t.row_size), (right_root, t.col_size)):
        field.append(jnp.broadcast_to(jnp.eye(size, dtype=dtype),
                                      (t.count, size, size)))
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    return ScaleByShampooBCState(
        count=jnp.zeros([], jnp.int32),
        mu=adam.zeros_moment(params, mu_dtype),
        nu=unflatten(nu),
        left=unflatten(left),
        right=unflatten(right),
        left_root=unflatten(left_root),
        right_root=unflatten(right_root),
    )

  def inverse_roots(tilings, factors, group_mean, grads, mb, group):
    """Candidate factors and corrected roots from one group's statistic.

    ``factors`` are the per-leaf ``(L, R)`` before this step, ``group_mean``
    the group's per-leaf mean gradients and ``grads`` the microbatched
    gradients; returns per-leaf ``(Lc, Rc, PLc, PRc)`` tiles.
    """
    candidates, eigen, tiles = [], [], []
    for (l_old, r_old), s, t in zip(factors, group_mean, tilings):
      x = _to_tiles(s, t)
      l_c = b2 * l_old + (1 - b2) * jnp.einsum(
          "nij,nkj->nik", x, x, precision=_HIGHEST)
      r_c = b2 * r_old + (1 - b2) * jnp.einsum(
          "nji,njk->nik", x, x, precision=_HIGHEST)
      pad_l, pad_r = _padding(t) if t.padded else (0.0, 0.0)
      ones_l = jnp.ones(l_c.shape[:-1], l_c.dtype)
      ones_r = jnp.ones(r_c.shape[:-1], r_c.dtype)
      # Padded coordinates get a unit eigenvalue: they stay decoupled.
      eig_l = _eigh(l_c, (damping + pad_l) * ones_l)
      eig_r = _eigh(r_c, (damping + pad_r) * ones_r)
      candidates.append((l_c, r_c))
      eigen.append((eig_l, eig_r))
      tiles.append(x)

    # Each leaf's spectra as one (n, t1 + t2) vector: L's eigenvalues, then
    # R's.
    raw = [jnp.concatenate([eig_l.eigenvalues, eig_r.eigenvalues], axis=-1)
           for eig_l, eig_r in eigen]
    spectra = [jnp.maximum(l, damping) for l in raw]
    if inverse_correction is None:
      roots = inverse.variance_correct_inverse(spectra, exponent=exponent)
    else:
      loo = inverse_correction == "jackknife"
      members, group_mb, group_name = _group_members(mb, group)
      n = microbatch.group_size(group_mb, group_name)
      # l_(-j)k = base_k + (1 - b2) ||row_k(Q^T X_(-j))||^2 with
      # base_k = b2 (Q^T L Q)_kk + damping = l_k - (1 - b2) ||row_k(Q^T X)||^2.
      # Projections are linear, so the leave-one-out projection is
      # (n Zbar - Z_j) / (n - 1) with Z = Q_L^T X Q_R.
      z_means = [_project(eig_l.eigenvectors, x, eig_r.eigenvectors)
                 for (eig_l, eig_r), x in zip(eigen, tiles)]
      bases = [l - (1 - b2) * _projected_norms(z)
               for l, z in zip(raw, z_means)]

      def estimates(j):
        """Microbatch j's eigenvalue estimates in the fixed eigenbases."""
        out = []
        for g, t, (eig_l, eig_r), z_mean, base in zip(
            grads, tilings, eigen, z_means, bases):
          g_j = jax.lax.dynamic_index_in_dim(g, j, keepdims=False).astype(
              z_mean.dtype)
          z = _project(eig_l.eigenvectors, _to_tiles(g_j, t),
                       eig_r.eigenvectors)
          if loo:  # Q_L^T Gbar_(-j) Q_R
            z = (n * z_mean - z) * (1.0 / (n - 1))
          out.append(jnp.maximum(base + (1 - b2) * _projected_norms(z),
                                 damping))
        return out

      # A rolled loop: one microbatch's tile buffers at a time, so the
      # scratch memory does not grow with M (an unrolled loop lets XLA run
      # the independent per-microbatch products side by side, one set of
      # buffers each). Only the (M, n, t1 + t2) estimates are stacked.
      samples = jax.lax.map(estimates, members)
      # The samples are the leave-one-out (or per-microbatch) eigenvalues
      # themselves: their spread, group-weighted and summed over the named
      # axis, by the shared code.
      spread = crossfit.denominator_spread(
          lambda values: values, samples, spectra, group_mb, group_name,
          loo=False)
      variance = inverse.variance_from_spread(
          spread, n, inverse_correction, loo=loo)
      roots = inverse.variance_correct_inverse(spectra, variance,
                                               exponent=exponent)

    return [
        (l_c, r_c, _root(eig_l.eigenvectors, d[..., :t.row_size]),
         _root(eig_r.eigenvectors, d[..., t.row_size:]))
        for (l_c, r_c), (eig_l, eig_r), d, t in zip(
            candidates, eigen, roots, tilings)]

  def update_fn(updates, state, params=None):
    mb = microbatch.layout(updates, axis_name, params)
    crossfit.check_microbatch_count(mb, cross_fit, inverse_correction)
    grads, treedef = jax.tree.flatten(updates)
    tilings = [_tiling(jnp.shape(g)[1:], block_size) for g in grads]
    mu = treedef.flatten_up_to(state.mu)
    nu = treedef.flatten_up_to(state.nu)
    count = numerics.safe_increment(state.count)
    g_bar = microbatch.microbatch_mean(grads, axis_name)
    directions = [None] * len(grads)

    # AdamW-BC: fallback parameters, and every tile's graft norm.
    adam_idx = [i for i, t in enumerate(tilings) if uses_adam(t)]
    adam_dirs = {}
    if adam_idx:
      numerator_fn, denominator_fn = adam.adam_terms(
          [mu[i] for i in adam_idx], [nu[i] for i in adam_idx], count, b1,
          fallback_b2, fallback_eps)
      adam_dirs = dict(zip(adam_idx, crossfit.cross_fit(
          [grads[i] for i in adam_idx], numerator_fn, denominator_fn,
          scheme=cross_fit, inverse_correction=inverse_correction,
          axis_name=axis_name)))

    # Shampoo for eligible parameters.
    idx = [i for i, t in enumerate(tilings) if t is not None]
    tilings_e = [tilings[i] for i in idx]
    pick = lambda field: [treedef.flatten_up_to(field)[i] for i in idx]
    old = list(zip(pick(state.left), pick(state.right),
                   pick(state.left_root), pick(state.right_root)))
    grads_e = [grads[i] for i in idx]
    g_bar_e = [g_bar[i] for i in idx]

    def momentum(a):
      return [_to_tiles(b1 * mu[i].astype(x.dtype) + (1 - b1) * x,
                        tilings[i]) for i, x in zip(idx, a)]

    def precondition(roots, mom):
      return [jnp.einsum("nij,njk,nkl->nil", pl, m, pr, precision=_HIGHEST)
              for (pl, pr), m in zip(roots, mom)]

    def cached():
      roots = [(pl, pr) for _, _, pl, pr in old]
      return precondition(roots, momentum(g_bar_e)), old

    def refresh():
      def candidate(group):
        mean = g_bar_e if group == "all" else microbatch.mean(
            grads_e, axis_name, group)
        return inverse_roots(tilings_e, [(l, r) for l, r, _, _ in old], mean,
                             grads_e, mb, group)

      persistent = []
      for new, prev in zip(candidate("all"), old):
        ok = _finite(*new)
        persistent.append(tuple(_where_tiles(ok, n_, p_)
                                for n_, p_ in zip(new, prev)))
      if cross_fit is None:
        roots = [(pl, pr) for _, _, pl, pr in persistent]
        return precondition(roots, momentum(g_bar_e)), persistent

      def fold(numerator_group, preconditioner_group):
        roots = []
        for (_, _, pl, pr), (_, _, pl_old, pr_old) in zip(
            candidate(preconditioner_group), old):
          ok = _finite(pl, pr)
          roots.append((_where_tiles(ok, pl, pl_old),
                        _where_tiles(ok, pr, pr_old)))
        return precondition(roots, momentum(
            microbatch.mean(grads_e, axis_name, numerator_group)))

      u = fold("first", "second")
      if cross_fit == "symmetric":
        u = [0.5 * (x + y) for x, y in zip(u, fold("second", "first"))]
      return u, persistent

    if idx:
      is_root = (count - 1) % precondition_every == 0
      u_tiles, factors = jax.lax.cond(is_root, refresh, cached)
      for i, u in zip(idx, u_tiles):
        if graft == "adam":
          u = _graft(u, _to_tiles(adam_dirs[i], tilings[i]), tilings[i])
        directions[i] = _from_tiles(u, tilings[i])
    else:
      factors = []
    for i in adam_idx:
      if tilings[i] is None:
        directions[i] = adam_dirs[i]

    fields = [[optax.MaskedNode()] * len(grads) for _ in range(4)]
    for i, new in zip(idx, factors):
      for field, value in zip(fields, new):
        field[i] = value
    new_nu = [adam.ema(nu[i], jnp.square(g_bar[i]), fallback_b2)
              if uses_adam(t) else optax.MaskedNode()
              for i, t in enumerate(tilings)]
    unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
    new_state = ScaleByShampooBCState(
        count=count,
        mu=unflatten(adam.ema(mu, g_bar, b1)),
        nu=unflatten(new_nu),
        left=unflatten(fields[0]),
        right=unflatten(fields[1]),
        left_root=unflatten(fields[2]),
        right_root=unflatten(fields[3]),
    )
    directions = [u.astype(g.dtype) for u, g in zip(directions, grads)]
    return unflatten(directions), new_state

  return optax.GradientTransformation(init_fn, update_fn)


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
    fallback_b2: jax.typing.ArrayLike = 0.999,
    fallback_eps: jax.typing.ArrayLike = 1e-8,
    mask: Optional[Any] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformation:
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
      inverse_correction, fallback_b2, fallback_eps, mu_dtype, axis_name:
      see :func:`scale_by_shampoo_bc`.
    mask: which parameters decay (as in ``optax.adamw``).

  Returns:
    An ``optax.GradientTransformation``.

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
          inverse_correction=inverse_correction, fallback_b2=fallback_b2,
          fallback_eps=fallback_eps, mu_dtype=mu_dtype, axis_name=axis_name),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
