"""SOAP-BC: Adam in Shampoo's eigenbasis, with cross-fitting and correction.

SOAP keeps Shampoo's Kronecker factors ``L``, ``R`` of each matrix and runs
Adam in their slowly refreshed eigenbasis ``rot(X) = Q_L^T X Q_R``. Rotation
is linear and fixed within a step, so the step is AdamW-BC on the rotated
microbatch gradients: this module supplies the rotation and the factors
(Shampoo's tiling, factor and eigendecomposition code) and hands everything
in the rotated coordinates to the AdamW-BC code (:func:`bcopt.cross_fit`
with Adam's numerator and denominator). Nothing else is re-derived here.

Layout, as in :mod:`bcopt._src.shampoo`: a parameter of rank ``>= 2`` is the
matrix ``(prod(shape[:-1]), shape[-1])``. A side is rotated when its
dimension is in ``[2, max_precond_dim]`` and is split into tiles of at most
``block_size``; a side that is not rotated keeps the identity (one-sided
SOAP, as the SOAP authors do for large dimensions) and is not split.
Parameters with no rotated side (scalars, vectors, matrices with both
dimensions too large or of size 1) are plain AdamW-BC.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from bcopt._src import adam
from bcopt._src import crossfit
from bcopt._src import diagnostics as diagnostics_lib
from bcopt._src import inverse
from bcopt._src import microbatch
from bcopt._src import numerics
from bcopt._src import shampoo

PyTree = Any

# The SOAP authors' default (nikhilvyas/SOAP): larger dimensions keep the
# identity on their side.
MAX_PRECOND_DIM = 10000

_HIGHEST = jax.lax.Precision.HIGHEST
_MASKED = optax.MaskedNode()


@dataclasses.dataclass(frozen=True)
class _Basis:
  """Where one parameter's eigenbases act (a leaf of the basis tree)."""

  tiling: shampoo._Tiling  # the tiles (one tile along an unrotated side).
  left: bool  # are the rows rotated by Q_L (else the identity)?
  right: bool  # are the columns rotated by Q_R?


def _basis(shape, block_size: int, max_dim: int) -> Optional[_Basis]:
  """The rotated sides and tiles of a parameter shape; None for AdamW-BC."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    return None
  rows, cols = math.prod(shape[:-1]), shape[-1]
  left, right = 2 <= rows <= max_dim, 2 <= cols <= max_dim
  if not (left or right):
    return None
  n1 = -(-rows // block_size) if left else 1
  n2 = -(-cols // block_size) if right else 1
  return _Basis(shampoo._Tiling(shape, rows, cols, n1, n2, -(-rows // n1),
                                -(-cols // n2)), left, right)


def _bases(tree: PyTree, block_size: int, max_dim: int, *,
           microbatched: bool) -> PyTree:
  """The basis tree: a ``_Basis`` per rotated leaf, MaskedNode elsewhere."""
  def leaf(x):
    shape = jnp.shape(x)[1:] if microbatched else jnp.shape(x)
    return _basis(shape, block_size, max_dim) or _MASKED
  return jax.tree.map(leaf, tree)


def _rotated(b) -> bool:
  return isinstance(b, _Basis)


def _rotate(b: _Basis, x: jax.Array, q_l, q_r) -> jax.Array:
  """``Q_L^T X Q_R`` on the tiles of a param-shaped ``x`` (rotated sides)."""
  x = shampoo._to_tiles(x, b.tiling).astype(
      (q_l if b.left else q_r).dtype)
  if b.left:
    x = jnp.einsum("nki,nkj->nij", q_l, x, precision=_HIGHEST)
  if b.right:
    x = jnp.einsum("nik,nkj->nij", x, q_r, precision=_HIGHEST)
  return x


def _rotate_back(b: _Basis, z: jax.Array, q_l, q_r) -> jax.Array:
  """``Q_L Z Q_R^T`` from tiles back to the parameter's shape."""
  if b.left:
    z = jnp.einsum("nik,nkj->nij", q_l, z, precision=_HIGHEST)
  if b.right:
    z = jnp.einsum("nik,njk->nij", z, q_r, precision=_HIGHEST)
  return shampoo._from_tiles(z, b.tiling)


class ScaleBySoapBCState(NamedTuple):
  """State of :func:`scale_by_soap_bc`.

  Trees shaped like the parameters; ``n`` is a rotated parameter's tile
  count and ``t1 x t2`` its tile shape (see the module docstring). Entries
  a parameter does not use are ``optax.MaskedNode()``.
  """

  count: chex.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # param shapes, mu_dtype (float32 default): first
  #                    moment, in the original coordinates.
  nu: optax.Updates  # float32: second moment; (n, t1, t2) in the rotated
  #                    coordinates of each tile, param shape for AdamW-BC
  #                    parameters.
  left: optax.Updates  # (n, t1, t1) float32: factor L per tile (rotated
  #                      rows only).
  right: optax.Updates  # (n, t2, t2) float32: factor R per tile.
  left_basis: optax.Updates  # (n, t1, t1) float32: Q_L (identity at init).
  right_basis: optax.Updates  # (n, t2, t2) float32: Q_R.


def _side(b, side: str) -> Optional[int]:
  """A rotated side's tile size, None when the side keeps the identity."""
  if not _rotated(b) or not getattr(b, side):
    return None
  return b.tiling.row_size if side == "left" else b.tiling.col_size


def _initial(b, param, side: str, basis: bool):
  """Zero factor or identity basis of one side of one parameter."""
  size = _side(b, side)
  if size is None:
    return _MASKED
  dtype = numerics.accumulation_dtype(jnp.result_type(param))
  shape = (b.tiling.count, size, size)
  if basis:
    return jnp.broadcast_to(jnp.eye(size, dtype=dtype), shape)
  return jnp.zeros(shape, dtype)


def _refreshed(b, factor, old_basis, damping, side: str):
  """One side's new eigenbasis, keeping the old one for non-finite tiles."""
  if _side(b, side) is None:
    return _MASKED
  vectors = shampoo._damped_eigh(b.tiling, factor, damping, side).eigenvectors
  return shampoo._where_tiles(shampoo._finite(vectors), vectors, old_basis)


def scale_by_soap_bc(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    shampoo_b2: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-6,
    precondition_every: int = 10,
    block_size: int = 1024,
    max_precond_dim: int = MAX_PRECOND_DIM,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    variance_groups: Optional[int] = 4,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale microbatched gradients by bias-corrected SOAP.

  SOAP is Adam run in the eigenbasis of Shampoo's factors. For a rotated
  parameter (tiled as in :func:`bcopt.scale_by_shampoo_bc`) with
  eigenbases :math:`Q_L, Q_R` and :math:`\mathrm{rot}(X) = Q_L^\top X
  Q_R`, the update is AdamW-BC (:func:`bcopt.scale_by_adam_bc`) on the
  rotated microbatch gradients :math:`\mathrm{rot}(g_j)`, rotated back:

  .. math::

    u = Q_L\, \mathrm{scheme}\big[\mathrm{rot}(\hat m(a)) \cdot
      \tilde f(p(\mathrm{rot}(s)))\big]\, Q_R^\top, \quad
    \hat m(a) = \frac{\beta_1 \mu + (1-\beta_1) a}{1-\beta_1^t}, \quad
    p(s') = \sqrt{\frac{\beta_2 \nu + (1-\beta_2) s'^2}{1-\beta_2^t}}
      + \epsilon

  with the scheme's numerator mean gradient :math:`a`, preconditioner mean
  gradient :math:`s`, and the corrected inverse :math:`\tilde f`
  (:func:`bcopt.cross_fit`). The state is updated from the full-batch mean
  :math:`\bar G` with the bases of this step:
  :math:`\mu \leftarrow \beta_1\mu + (1-\beta_1)\bar G`,
  :math:`\nu \leftarrow \beta_2\nu + (1-\beta_2)\mathrm{rot}(\bar G)^2`,
  :math:`L \leftarrow \beta_s L + (1-\beta_s)\bar G\bar G^\top`,
  :math:`R \leftarrow \beta_s R + (1-\beta_s)\bar G^\top\bar G`
  (:math:`\beta_s` = ``shampoo_b2``). After the update of step 1 and of
  every step :math:`t` with :math:`t \bmod k = 0` (:math:`k` =
  ``precondition_every``) the bases are refreshed: the eigenvectors of
  :math:`L + \delta I` and :math:`R + \delta I`. A step's bases come from
  earlier batches only, so they carry no coupling; step 1 runs with
  :math:`Q = I`. :math:`\nu` stays indexed by eigenvalue rank across
  refreshes (ascending, as ``eigh`` returns them), as SOAP keeps it.

  Every piece in the rotated coordinates is AdamW-BC's code; with
  :math:`Q = I` this transform equals :func:`bcopt.scale_by_adam_bc`, and
  with ``cross_fit=None, inverse_correction=None`` it is plain SOAP.

  Cost per step, in rotations (two tile products each): the state needs
  two (:math:`\mu`'s numerator term is rotated with the mean, and
  :math:`\mathrm{rot}(\bar G)`). ``"loo"`` rotates every microbatch once
  (:math:`M`) and works on the rotated stack, which it holds (float32, the
  size of the gradients) during the step. The other schemes rotate
  group means only: one per numerator and per preconditioner group, plus
  the jackknife's :math:`K' = \min(K, n)` leave-a-subgroup-out means per
  preconditioner group (``variance_groups`` :math:`K`; ``None`` leaves out
  each of the :math:`n` microbatches, and ``"paper"`` rotates each of
  them). ``"twofold"`` with ``K = 4`` thus costs 7 rotations a step, and
  the eigendecompositions every ``precondition_every`` steps come on top.

  Differences from the SOAP authors' code (nikhilvyas/SOAP), whose recipe
  the defaults follow (betas 0.95, ``shampoo_b2`` 0.95, eps 1e-8, a refresh
  every 10 steps, ``max_precond_dim`` 10000): the bases come from ``eigh``
  on every refresh (the authors refine by one power iteration and QR
  between eighs; SPEC allows either), of the factors damped by
  :math:`\delta` (the authors add 1e-30); step 1 is taken with :math:`Q =
  I` (the authors skip it); :math:`\epsilon` is added to
  :math:`\sqrt{\hat\nu}` as in ``optax.adam``; dimensions above
  ``block_size`` are tiled (the authors precondition them whole); leading
  axes are merged as in Shampoo-BC. Tiles whose new factors or bases are
  not finite keep their previous ones.

  Args:
    b1: :math:`\beta_1`, decay of the first moment.
    b2: :math:`\beta_2`, decay of the rotated second moment.
    eps: :math:`\epsilon`, added to the square root.
    shampoo_b2: :math:`\beta_s`, decay of the factors ``L`` and ``R``.
    damping: :math:`\delta > 0`, added to the factors before ``eigh``.
    precondition_every: :math:`k \ge 1`, steps between basis refreshes.
    block_size: largest tile dimension (``>= 2``).
    max_precond_dim: largest rotated dimension; a larger side keeps the
      identity.
    cross_fit: ``None``, ``"twofold"``, ``"symmetric"`` or ``"loo"`` (the
      default).
    inverse_correction: ``None``, ``"jackknife"`` (default) or ``"paper"``.
    variance_groups: :math:`K` of the jackknife of the two-fold and
      standard schemes (an integer ``>= 2``, default 4), or ``None`` for
      the exact jackknife. Unused by ``"loo"`` (its folds are the
      leave-one-out values) and by ``"paper"``.
    mu_dtype: dtype of :math:`\mu` (default float32, or wider params').
    axis_name: named microbatch axis when ``update`` runs inside ``pmap``,
      ``shard_map`` or ``vmap(axis_name=...)``.
    diagnostics: also measure the microbatch diagnostics (as
      :func:`bcopt.scale_by_adam_bc`; the shares in the rotated
      coordinates, whose norms are the original ones').

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for bad options at construction and, at trace time, for too
      few microbatches or gradients without the microbatch axis.

  Examples:
    >>> import jax, jax.numpy as jnp, bcopt
    >>> params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    >>> tx = bcopt.scale_by_soap_bc(precondition_every=2)
    >>> state = tx.init(params)
    >>> state.left_basis["w"].shape, state.nu["w"].shape   # one tile
    ((1, 6, 6), (1, 6, 4))
    >>> grads = jax.tree.map(   # M = 4 microbatch gradients
    ...     lambda p: jax.random.normal(jax.random.key(0), (4,) + p.shape),
    ...     params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> updates["w"].shape, updates["b"].shape
    ((6, 4), (4,))

  References:
    Vyas et al., 2024, arXiv:2409.11321 (SOAP); Nayak et al., 2026,
    arXiv:2605.20756.
  """
  crossfit.check_scheme(cross_fit)
  inverse.check_estimator(inverse_correction)
  numerics.check_positive("damping", damping, "it regularises the eigh")
  numerics.check_integer("precondition_every", precondition_every, 1)
  numerics.check_integer("block_size", block_size, 2)
  numerics.check_integer("max_precond_dim", max_precond_dim, 2)
  shampoo.check_variance_groups(variance_groups)
  block_size, max_dim = int(block_size), int(max_precond_dim)
  precondition_every = int(precondition_every)

  def init_fn(params):
    bases = _bases(params, block_size, max_dim, microbatched=False)

    def nu(p, b, adam_nu):
      if not _rotated(b):
        return adam_nu
      t = b.tiling
      return jnp.zeros((t.count, t.row_size, t.col_size), adam_nu.dtype)

    side = lambda name, basis: jax.tree.map(
        lambda p, b: _initial(b, p, name, basis), params, bases)
    return ScaleBySoapBCState(
        count=jnp.zeros([], jnp.int32),
        mu=numerics.zeros_moment(params, mu_dtype),
        nu=jax.tree.map(nu, params, bases, numerics.zeros_moment(params)),
        left=side("left", False), right=side("right", False),
        left_basis=side("left", True), right_basis=side("right", True))

  def update_fn(updates, state, params=None, *, diagnostics, **extra_args):
    del extra_args  # optax chains forward every keyword argument
    mb = microbatch.layout(updates, axis_name, params)
    crossfit.check_microbatch_count(mb, cross_fit, inverse_correction)
    count = optax.safe_increment(state.count)
    bases = _bases(updates, block_size, max_dim, microbatched=True)

    def rotate(tree):
      """``rot`` of every rotated leaf of a param-shaped tree."""
      return jax.tree.map(
          lambda x, b, q_l, q_r: _rotate(b, x, q_l, q_r) if _rotated(b)
          else x, tree, bases, state.left_basis, state.right_basis)

    if cross_fit == "loo":
      # Every fold needs its microbatch rotated: rotate the stack once (a
      # rolled loop, one microbatch's products at a time) and run AdamW-BC
      # on it.
      grads = _rotated_microbatches(updates, bases, rotate, mb)
      numerator_fn, denominator_fn = adam.adam_terms(
          rotate(state.mu), state.nu, count, b1, b2, eps)
    else:
      # Group means only: rotate inside Adam's terms (rot is linear).
      grads = updates
      adam_numerator, adam_denominator = adam.adam_terms(
          state.mu, state.nu, count, b1, b2, eps)
      numerator_fn = lambda a: rotate(adam_numerator(a))
      denominator_fn = lambda s: adam_denominator(rotate(s))
    rotated_u = crossfit.cross_fitted(
        grads, numerator_fn, denominator_fn, mb, scheme=cross_fit,
        inverse_correction=inverse_correction,
        variance_groups=variance_groups, diagnostics=diagnostics)
    if diagnostics:
      rotated_u, uncorrected, standard = rotated_u
      mean_sq_sum = microbatch.mean_and_squares(updates, mb)
      measured = diagnostics_lib.measure(mb, mean_sq_sum, rotated_u,
                                         uncorrected, standard)
    directions = jax.tree.map(
        lambda z, b, q_l, q_r: _rotate_back(b, z, q_l, q_r) if _rotated(b)
        else z, rotated_u, bases, state.left_basis, state.right_basis)

    g_bar = mean_sq_sum[0] if diagnostics else microbatch.mean(updates, mb)
    left = _factors(bases, state.left, g_bar, shampoo_b2, "left")
    right = _factors(bases, state.right, g_bar, shampoo_b2, "right")

    def refresh():
      return tuple(
          jax.tree.map(lambda x, b, f, q, s=s: _refreshed(b, f, q, damping, s),
                       updates, bases, factor, basis)
          for s, factor, basis in (("left", left, state.left_basis),
                                   ("right", right, state.right_basis)))

    left_basis, right_basis = jax.lax.cond(
        (count == 1) | (count % precondition_every == 0), refresh,
        lambda: (state.left_basis, state.right_basis))
    new_state = ScaleBySoapBCState(
        count=count,
        mu=numerics.update_moment(state.mu, g_bar, b1),
        nu=numerics.update_moment(
            state.nu, jax.tree.map(jnp.square, rotate(g_bar)), b2),
        left=left, right=right, left_basis=left_basis,
        right_basis=right_basis)
    return (optax.tree.cast_like(directions, updates), new_state,
            measured if diagnostics else None)

  init, update = diagnostics_lib.transform(init_fn, update_fn, diagnostics)
  return optax.GradientTransformationExtraArgs(
      init, microbatch.on_explicit_mesh(update))


def _rotated_microbatches(updates, bases, rotate, mb) -> PyTree:
  """The microbatched gradients with every rotated leaf rotated (tiles)."""
  rotated = jax.tree.map(lambda x, b: x if _rotated(b) else _MASKED, updates,
                         bases)
  if jax.tree.leaves(rotated):
    rotated = microbatch.map_over_microbatches(
        rotate, rotated, microbatch.group(mb, "all"))
  return jax.tree.map(lambda x, b, r: r if _rotated(b) else x, updates,
                      bases, rotated)


def _factors(bases, factors, g_bar, decay, side: str) -> PyTree:
  """One side's factors after the EMA with the full-batch mean gradient;
  a tile whose new factor is not finite keeps its old one."""
  def leaf(g, b, old):
    if _side(b, side) is None:
      return _MASKED
    new = shampoo._factor_ema(old, shampoo._to_tiles(g.astype(old.dtype),
                                                     b.tiling), decay, side)
    return shampoo._where_tiles(shampoo._finite(new), new, old)
  return jax.tree.map(leaf, g_bar, bases, factors)


def soap_bc(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    *,
    shampoo_b2: jax.typing.ArrayLike = 0.95,
    damping: jax.typing.ArrayLike = 1e-6,
    precondition_every: int = 10,
    block_size: int = 1024,
    max_precond_dim: int = MAX_PRECOND_DIM,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    variance_groups: Optional[int] = 4,
    mask: Optional[Any] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP (Adam in Shampoo's eigenbasis) with bias corrections.

  ``optax.chain(scale_by_soap_bc(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``:

  .. math::

    \Delta\theta = -\eta_t\big(u + \lambda\theta\big)

  with :math:`u` from :func:`scale_by_soap_bc`. ``update`` takes
  microbatched gradients and needs ``params``. With ``cross_fit=None,
  inverse_correction=None`` it is SOAP with decoupled weight decay (the
  authors' default ``weight_decay`` is 0.01).

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1, b2, eps: see :func:`scale_by_soap_bc`.
    weight_decay: :math:`\lambda`, decoupled weight decay.
    shampoo_b2, damping, precondition_every, block_size, max_precond_dim,
      cross_fit, inverse_correction, variance_groups, mu_dtype, axis_name,
      diagnostics: see :func:`scale_by_soap_bc`.
    mask: which parameters decay (as in ``optax.adamw``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, bcopt
    >>> params = {"w": jnp.ones((4, 3))}
    >>> loss = lambda p, x: jnp.sum((x @ p["w"]) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 4))   # M = 8
    >>> tx = bcopt.soap_bc(3e-3)
    >>> state = tx.init(params)
    >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, x)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Vyas et al., 2024, arXiv:2409.11321; Nayak et al., 2026,
    arXiv:2605.20756.
  """
  return optax.chain(
      scale_by_soap_bc(
          b1, b2, eps, shampoo_b2=shampoo_b2, damping=damping,
          precondition_every=precondition_every, block_size=block_size,
          max_precond_dim=max_precond_dim, cross_fit=cross_fit,
          inverse_correction=inverse_correction,
          variance_groups=variance_groups, mu_dtype=mu_dtype,
          axis_name=axis_name, diagnostics=diagnostics),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
