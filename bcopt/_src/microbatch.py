"""Microbatch statistics on a stacked axis and, optionally, a named axis.

Every bcopt transform receives *microbatched gradients*: a pytree shaped like
the parameters whose every leaf carries one extra leading axis of size
``M_local`` (what ``jax.vmap(jax.grad(loss), in_axes=(None, 0))`` returns).
When a transform is built with ``axis_name``, its ``update`` runs inside
``pmap``, ``shard_map`` or ``vmap(axis_name=...)``; each member holds
``M_local`` microbatches, the global count is ``M = M_local * axis_size`` and
the global index of local microbatch ``j`` is ``axis_index * M_local + j``.

This module is the one place that reduces over microbatches: every sum is a
local reduction over the leading axis followed by a ``psum`` over the named
axis, so the stacked and the named-axis computations agree up to rounding.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any

MICROBATCH_HINT = (
    "bcopt transforms take microbatched gradients: every leaf shaped "
    "(M_local,) + param.shape along a leading microbatch axis, as returned by "
    "jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, microbatches)"
)


# Sums over the microbatch axis are unrolled loops: XLA then fuses all M
# terms of a pass into one sweep over the gradients (no accumulator round
# trips, no reduction over a major axis, which XLA:CPU handles slowly).
# Beyond this many local microbatches the loop is unrolled in chunks of 8.
FULL_UNROLL_LIMIT = 64


class Microbatches(NamedTuple):
  """Static layout of the microbatch axis of one update."""

  local: int  # M_local: microbatches held by this member (leading axis size).
  total: int  # M: microbatches over the whole named axis (M_local * size).
  axis_name: Optional[str]  # named axis reduced with collectives, or None.

  def describe(self) -> str:
    if self.axis_name is None:
      return f"M={self.total} along the leading (microbatch) axis"
    return (
        f"M={self.total} (M_local={self.local} along the leading microbatch"
        f" axis x {self.total // self.local} members of axis"
        f" {self.axis_name!r})"
    )


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for low-precision floats, the input's dtype otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


def layout(
    updates: PyTree, axis_name: Optional[str] = None, params: PyTree = None
) -> Microbatches:
  """Reads the microbatch layout of ``updates`` and checks it.

  Args:
    updates: microbatched gradients.
    axis_name: the named microbatch axis, or None.
    params: when given, each leaf of ``updates`` must be shaped
      ``(M_local,) + param.shape``.

  Returns:
    The static :class:`Microbatches` layout.

  Raises:
    ValueError: when the leaves do not share one leading microbatch axis, or
      do not match ``params`` with that axis prepended.
  """
  leaves_with_path = jax.tree_util.tree_leaves_with_path(updates)
  if not leaves_with_path:
    raise ValueError("bcopt got an empty gradient tree. " + MICROBATCH_HINT)
  for path, leaf in leaves_with_path:
    if jnp.ndim(leaf) == 0:
      raise ValueError(
          f"Gradient leaf {jax.tree_util.keystr(path)} is a scalar, so it has"
          f" no microbatch axis. {MICROBATCH_HINT}."
      )
  m_local = jnp.shape(leaves_with_path[0][1])[0]
  for path, leaf in leaves_with_path:
    if jnp.shape(leaf)[0] != m_local:
      raise ValueError(
          f"Gradient leaf {jax.tree_util.keystr(path)} has leading axis"
          f" {jnp.shape(leaf)[0]} but the first leaf has {m_local}; all leaves"
          f" must share one microbatch axis. {MICROBATCH_HINT}."
      )
  if params is not None:
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(
          "The gradient tree and the params tree differ in structure:"
          f" {jax.tree.structure(updates)} vs {jax.tree.structure(params)}."
      )
    for (path, g), p in zip(leaves_with_path, jax.tree.leaves(params)):
      expected = (m_local,) + tuple(jnp.shape(p))
      if tuple(jnp.shape(g)) != expected:
        raise ValueError(
            f"Gradient leaf {jax.tree_util.keystr(path)} has shape"
            f" {tuple(jnp.shape(g))} but its parameter has shape"
            f" {tuple(jnp.shape(p))}; expected {expected}. {MICROBATCH_HINT}."
            " If you hold one mean gradient, give it a leading axis of"
            " size M (or use the corresponding optax transform)."
        )
  size = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  return Microbatches(local=m_local, total=m_local * size, axis_name=axis_name)


def psum(tree: PyTree, axis_name: Optional[str]) -> PyTree:
  """Sums a tree over the named axis (identity without one)."""
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def global_index(mb: Microbatches) -> jax.Array:
  """Global indices (shape ``(M_local,)``) of the local microbatches."""
  local = jnp.arange(mb.local, dtype=jnp.int32)
  if mb.axis_name is None:
    return local
  return jax.lax.axis_index(mb.axis_name) * mb.local + local


def group_weights(mb: Microbatches, group: str) -> Optional[jax.Array]:
  """0/1 weights (shape ``(M_local,)``) selecting a microbatch group.

  Args:
    mb: the layout.
    group: ``"all"`` (returns None, meaning no weighting), ``"first"`` (the
      first ``floor(M / 2)`` global microbatches, group A of SPEC section 1)
      or ``"second"`` (the rest, group B).

  Returns:
    The weights, or None for ``"all"``.
  """
  if group == "all":
    return None
  first = global_index(mb) < mb.total // 2
  if group == "first":
    return first.astype(jnp.float32)
  if group == "second":
    return jnp.logical_not(first).astype(jnp.float32)
  raise ValueError(f"Unknown microbatch group {group!r}.")


def group_size(mb: Microbatches, group: str) -> int:
  """Number of microbatches in a group (static)."""
  return {"all": mb.total, "first": mb.total // 2,
          "second": mb.total - mb.total // 2}[group]


def group_members(
    tree: PyTree, mb: Microbatches, group: str
) -> tuple[PyTree, Microbatches, str]:
  """The microbatches of a group as ``(tree, layout, group)``.

  On a stacked axis (no ``axis_name``) a group is a static slice of the
  leading axis, returned with its own layout and group ``"all"``, so work on
  it touches only its members; on a named axis membership depends on the
  member, and the group stays a 0/1 weighting (:func:`group_weights`).

  Args:
    tree: microbatched tree with the layout ``mb``.
    mb: the layout.
    group: ``"all"``, ``"first"`` or ``"second"``.

  Returns:
    ``(tree, layout, group)`` to pass on to :func:`mean` and friends.
  """
  if mb.axis_name is not None or group == "all":
    return tree, mb, group
  half = mb.total // 2
  part = slice(0, half) if group == "first" else slice(half, mb.total)
  n = group_size(mb, group)
  return (jax.tree.map(lambda x: x[part], tree),
          Microbatches(local=n, total=n, axis_name=None), "all")


def stored(tree: PyTree) -> PyTree:
  """``tree``, computed once by its own kernels and stored (XLA:CPU).

  XLA:CPU has no multi-output fusion: it copies a cheap elementwise producer
  (such as the sum of M gradient slices that :func:`microbatch_mean` is)
  into every consumer kernel. For elementwise consumers that is what we
  want (storing the mean of a bare Adam-BC update and reading it back cost
  up to 4x at 16M parameters on a shared 2-core machine: every stored
  temporary is fresh memory), but a reduction over it (the global norm in
  :func:`bcopt.clip_by_global_norm`) becomes one single-threaded YNNPACK
  kernel that sums the M slices itself: 46 ms against 4 ms over a stored
  mean, 2M parameters, M = 8. A conditional is a fusion boundary XLA keeps:
  on CPU the tree passes through one whose taken branch is the identity, so
  its producers run once and write it. Only the tree is stored, not its
  inputs. Other backends get ``tree`` unchanged (there a conditional would
  cost a device-host synchronisation).

  Args:
    tree: a tree of arrays.

  Returns:
    ``tree`` (the same values).
  """

  def on_cpu(t):
    # (bits | 1) != 0 always holds, but XLA cannot fold it; the other branch
    # (never taken) differs from the identity so the conditional is kept.
    first = jnp.ravel(jax.tree.leaves(t)[0])[0]
    bits = jax.lax.bitcast_convert_type(
        first.astype(jnp.float32), jnp.int32)
    return jax.lax.cond((bits | 1) != 0, lambda x: x,
                        lambda x: jax.tree.map(jnp.zeros_like, x), t)

  return jax.lax.platform_dependent(tree, cpu=on_cpu, default=lambda t: t)


def sum_over_microbatches(
    fn: Callable[..., PyTree],
    *stacked: PyTree,
    weights: Optional[jax.Array] = None,
    axis_name: Optional[str] = None,
) -> PyTree:
  r"""Computes :math:`\sum_j w_j\, fn(x^{(1)}_j, x^{(2)}_j, \dots)` over all M.

  ``fn`` maps the per-microbatch slices of ``stacked`` (trees whose leaves
  carry the leading microbatch axis) to a tree. The local sum is an unrolled
  ``lax.fori_loop`` (see ``FULL_UNROLL_LIMIT``), so XLA fuses the elementwise
  work of all terms into one pass without materialising per-microbatch
  results; the local sums are then combined with ``psum`` over
  ``axis_name``. The loop starts from the first term, which keeps the carry's
  varying-ness right under ``shard_map``.

  Args:
    fn: per-microbatch function of one slice of each stacked tree.
    *stacked: trees with a leading local microbatch axis.
    weights: optional ``(M_local,)`` weights (e.g. a group mask).
    axis_name: named axis to sum over as well, or None.

  Returns:
    The sum, shaped like one output of ``fn``.
  """
  m_local = jax.tree.leaves(stacked)[0].shape[0]

  def term(j):
    out = fn(*jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), stacked))
    if weights is None:
      return out
    return jax.tree.map(lambda o: o * weights[j].astype(o.dtype), out)

  total = jax.lax.fori_loop(
      1, m_local, lambda j, acc: jax.tree.map(jnp.add, acc, term(j)), term(0),
      unroll=True if m_local <= FULL_UNROLL_LIMIT else 8)
  return psum(total, axis_name)

def mean(
    updates: PyTree,
    axis_name: Optional[str] = None,
    group: str = "all",
) -> PyTree:
  """Mean over the microbatches of a group, across the named axis.

  Accumulates in float32 (or higher) whatever the gradient dtype.

  Args:
    updates: microbatched tree.
    axis_name: named microbatch axis, or None.
    group: ``"all"``, ``"first"`` or ``"second"`` (see :func:`group_weights`).

  Returns:
    A param-shaped tree of group means.
  """
  mb = layout(updates, axis_name)
  n = group_size(mb, group)
  total = sum_over_microbatches(
      lambda x: jax.tree.map(lambda t: t.astype(accumulation_dtype(t.dtype)),
                             x),
      updates,
      weights=group_weights(mb, group),
      axis_name=axis_name,
  )
  return jax.tree.map(lambda t: t / n, total)


def microbatch_mean(updates: PyTree, axis_name: Optional[str] = None) -> PyTree:
  """The full-batch mean gradient ``gbar`` of microbatched gradients.

  Use it to update persistent state from the full batch (SPEC section 1)
  inside your own bias-corrected transform. Accumulates in float32 (or
  higher) and reduces over ``axis_name`` when given.

  Args:
    updates: microbatched gradients, every leaf shaped ``(M_local,) + shape``.
    axis_name: the named microbatch axis when running under ``pmap``,
      ``shard_map`` or ``vmap(axis_name=...)``; None for a stacked axis only.

  Returns:
    A param-shaped tree: the mean over all ``M`` microbatches.

  Examples:
    >>> import jax.numpy as jnp, bcopt
    >>> g = {"w": jnp.arange(6.0).reshape(3, 2)}   # M = 3 microbatches
    >>> bcopt.microbatch_mean(g)["w"]
    Array([2., 3.], dtype=float32)
  """
  return mean(updates, axis_name)
