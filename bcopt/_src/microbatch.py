"""Microbatch statistics on a stacked axis and, optionally, a named axis.

Every bcopt transform receives *microbatched gradients*: a pytree shaped like
the parameters whose every leaf carries one extra leading axis of size
``M_local`` (what ``jax.vmap(jax.grad(loss), in_axes=(None, 0))`` returns).
When a transform is built with ``axis_name``, its ``update`` runs inside
``pmap``, ``shard_map`` or ``vmap(axis_name=...)``; each member holds
``M_local`` microbatches, the global count is ``M = M_local * axis_size`` and
the global index of local microbatch ``j`` is ``axis_index * M_local + j``.

The stacked axis itself may be sharded over devices under ``jit`` (a
``NamedSharding`` on an Explicit mesh axis, or any Auto mesh set with
``jax.set_mesh``): see :func:`partitions`. Loops then visit the ``D`` blocks
of the axis side by side, so each device reads its own microbatches and the
partitioner adds one collective per sum; no slice of a sharded axis is ever
taken on its own (that would gather the axis onto every device).

This module is the one place that reduces over microbatches: every sum is a
local reduction over the leading axis followed by a ``psum`` over the named
axis, so the stacked and the named-axis computations agree up to rounding.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcopt._src import fusion
from bcopt._src import numerics

PyTree = Any

MICROBATCH_HINT = (
    "bcopt transforms take microbatched gradients: every leaf shaped "
    "(M_local,) + param.shape along a leading microbatch axis, as returned by "
    "jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, microbatches)"
)


class Microbatches(NamedTuple):
  """Static layout of the microbatch axis of one update."""

  local: int  # M_local: microbatches held by this member (leading axis size).
  total: int  # M: microbatches over the whole named axis (M_local * size).
  axis_name: Optional[str]  # named axis reduced with collectives, or None.
  blocks: int = 1  # D: blocks of the leading axis visited side by side.

  def describe(self) -> str:
    if self.axis_name is None:
      return f"M={self.total} along the leading (microbatch) axis"
    return (
        f"M={self.total} (M_local={self.local} along the leading microbatch"
        f" axis x {self.total // self.local} members of axis"
        f" {self.axis_name!r})"
    )


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
  blocks = partitions(leaves_with_path[0][1])
  for path, leaf in leaves_with_path:
    if partitions(leaf) != blocks:
      raise ValueError(
          f"Gradient leaf {jax.tree_util.keystr(path)} has its microbatch axis"
          f" sharded as {jax.typeof(leaf)} but the first leaf as"
          f" {jax.typeof(leaves_with_path[0][1])}; shard the leading axis of"
          " every leaf the same way."
      )
  size = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  return Microbatches(local=m_local, total=m_local * size,
                      axis_name=axis_name, blocks=blocks)


def partitions(x: jax.Array) -> int:
  """Blocks ``D`` of ``x``'s leading (microbatch) axis that devices may hold.

  * A leading axis sharded over Explicit mesh axes (visible in
    ``jax.typeof(x)``): ``D`` is the number of shards.
  * Otherwise, under an Auto mesh (``jax.set_mesh``) with more than one
    device, the partitioner may shard the axis any way it likes:
    ``D = gcd(M_local, devices on the mesh's Auto axes)``.
  * Otherwise (one device, no mesh, or only Manual axes as inside
    ``shard_map``) ``D = 1``.

  Loops over microbatches run ``M_local / D`` steps over the ``D`` blocks at
  once (see :func:`sum_over_microbatches`), so nothing indexes a sharded
  axis one slice at a time.
  """
  m_local = x.shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec and spec[0] is not None:
    axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
    return math.prod(mesh.shape[a] for a in axes)
  auto = math.prod(mesh.shape[a] for a in mesh.auto_axes)
  return math.gcd(m_local, auto)


def on_explicit_mesh(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """An ``update_fn(updates, state, params=None, **extra)`` that also runs on
  Explicit meshes.

  With Explicit axes every intermediate's sharding is part of its type, and
  some a transform needs are illegal there: a parameter dimension sharded
  over the mesh axis that also shards the microbatch axis (FSDP over the
  data axis) meets a microbatch slice sharded over it, and Shampoo's factor
  products of a sharded dimension would be sharded twice. So under a mesh
  with Explicit axes the body runs under ``jax.sharding.auto_axes`` (the
  partitioner chooses the intermediates' shardings, as on an Auto mesh) and
  its outputs get the types an Explicit user expects: updates sharded like
  ``params`` (like the gradients without their microbatch axis when
  ``params`` is None), the state like the state it came from. Elsewhere it
  is ``update_fn`` itself.
  """

  @functools.wraps(update_fn)
  def wrapped(updates, state, params=None, **extra_args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
      return update_fn(updates, state, params, **extra_args)

    def sharding(x, drop_leading=False):
      named = jax.typeof(x).sharding
      if named.mesh.empty:  # not placed on the mesh: replicated over it
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      spec = tuple(named.spec) + (None,) * (jnp.ndim(x) - len(named.spec))
      return named.update(spec=jax.sharding.PartitionSpec(
          *spec[int(drop_leading):]))

    out_updates = (jax.tree.map(sharding, params) if params is not None else
                   jax.tree.map(lambda g: sharding(g, True), updates))
    out_sharding = (out_updates, jax.tree.map(sharding, state))
    # Array arguments (Sophia's curvature) enter the Auto region; Python
    # values (Shampoo's root_step) stay static.
    is_array = lambda v: all(isinstance(leaf, jax.Array)
                             for leaf in jax.tree.leaves(v))
    arrays = {k: v for k, v in extra_args.items() if is_array(v)}
    static = {k: v for k, v in extra_args.items() if not is_array(v)}
    body = lambda u, s, p, a: update_fn(u, s, p, **a, **static)
    return jax.sharding.auto_axes(body, out_sharding=out_sharding)(
        updates, state, params, arrays)

  return wrapped


def _blocks(tree: PyTree, d: int) -> PyTree:
  """``(M_local, ...)`` leaves as ``(D, M_local / D, ...)`` blocks."""
  return jax.tree.map(
      lambda x: x.reshape((d, x.shape[0] // d) + x.shape[1:]), tree)


def _visit(stacked: PyTree, d: int, j) -> PyTree:
  """Local microbatch ``j`` of a stacked tree (``d = 1``), or the ``j``-th of
  every block, stacked along a leading block axis (``d > 1``)."""
  axis = 0 if d == 1 else 1
  return jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=axis, keepdims=False),
      stacked)


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
      first ``floor(M / 2)`` global microbatches, group A of the two-fold schemes)
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


def subgroup_sizes(n: int, count: Optional[int]) -> tuple[int, ...]:
  """Sizes of the ``min(count, n)`` near-equal contiguous subgroups of ``n``
  microbatches (they differ by at most one, larger ones first); ``count``
  None means ``n`` subgroups of one."""
  k = n if count is None else min(count, n)
  q, r = divmod(n, k)
  return (q + 1,) * r + (q,) * (k - r)


def subgroup_weights(mb: Microbatches, group: str,
                     count: Optional[int]) -> jax.Array:
  """0/1 weights ``(M_local, K')`` of a group's contiguous subgroups.

  Column ``k`` selects subgroup ``k`` of :func:`subgroup_sizes` (group
  members in global index order); microbatches outside the group have zero
  rows. Written over the global microbatch index, so it serves a stacked
  and a named axis alike.
  """
  sizes = subgroup_sizes(group_size(mb, group), count)
  start = mb.total // 2 if group == "second" else 0
  bounds = np.cumsum((0,) + sizes)
  position = (global_index(mb) - start)[:, None]
  inside = (position >= bounds[:-1]) & (position < bounds[1:])
  return inside.astype(jnp.float32)


def subgroup_means(updates: PyTree, mb: Microbatches, group: str,
                   count: Optional[int]) -> PyTree:
  """Means of a group's contiguous subgroups (:func:`subgroup_weights`),
  across the named axis: leaves ``(K',) + shape``, accumulated in float32
  (or higher).

  On a local, unsharded axis (no ``axis_name``, one block: where
  :func:`group` slices) each subgroup is a static slice summed in order,
  so every microbatch is read once; otherwise one weighted pass visits
  every microbatch for all ``K'`` sums. Both add a subgroup's members in
  the same order (a zero weight adds an exact zero), so they agree bitwise
  on finite gradients; a non-finite gradient poisons only its own
  subgroup's slice sum, but every weighted sum (``0 * inf``)."""
  sizes = subgroup_sizes(group_size(mb, group), count)
  if mb.axis_name is None and mb.blocks == 1:
    bounds = np.cumsum((mb.total // 2 if group == "second" else 0,) + sizes)

    def slice_sums(x):
      def subgroup(start, stop):
        total = numerics.upcast(x[start])
        for j in range(start + 1, stop):
          total = total + numerics.upcast(x[j])
        return total
      return jnp.stack([subgroup(int(a), int(b))
                        for a, b in zip(bounds[:-1], bounds[1:])])

    total = jax.tree.map(slice_sums, updates)
  else:
    def term(g_j, w_j):
      return jax.tree.map(lambda x: w_j.astype(x.dtype).reshape(
          (-1,) + (1,) * x.ndim) * x[None], numerics.upcast(g_j))

    total = sum_over_microbatches(term, updates,
                                  subgroup_weights(mb, group, count),
                                  axis_name=mb.axis_name)
  scale = 1.0 / np.asarray(sizes, np.float64)
  return jax.tree.map(lambda t: t * scale.astype(t.dtype).reshape(
      (-1,) + (1,) * (t.ndim - 1)), total)


def leave_subgroup_out(subgroup_means: Sequence[PyTree], sizes
                       ) -> tuple[PyTree, list[PyTree]]:
  r"""The group mean and the means without each subgroup.

  From the subgroup means :math:`\bar x_k` (a list of ``K'`` trees, e.g.
  the entries of :func:`subgroup_means`, or any linear image of them) of
  sizes :math:`n_k` summing to :math:`n`: :math:`\bar x = \sum_k n_k
  \bar x_k / n` and the list of :math:`\bar x_{(-k)} = (n \bar x - n_k
  \bar x_k)/(n - n_k)`. Local arithmetic on already reduced values, kept
  as separate terms: no stacked (or major-axis) intermediate for XLA to
  materialise.
  """
  n = sum(sizes)
  total = jax.tree.map(lambda *x: sum(w * x_k for w, x_k in zip(sizes, x)),
                       *subgroup_means)
  left_out = [jax.tree.map(lambda t, x_k, w=w: (t - w * x_k) / (n - w), total,
                           x) for w, x in zip(sizes, subgroup_means)]
  return jax.tree.map(lambda t: t / n, total), left_out


class Group(NamedTuple):
  """The microbatches of one group, as the code that visits them sees them.

  On an unsharded stacked axis (no ``axis_name``, one block) a group is a
  static range of the leading axis with a layout of its own and the
  weighting ``"all"``, so work on it touches only its members. On a named
  axis membership depends on the member, and a sharded axis must not be
  sliced: every local microbatch is visited and the group stays a 0/1
  weighting (:func:`group_weights`) of the full layout.
  """

  members: Optional[slice]  # static range of the leading axis; None: all.
  layout: Microbatches  # the layout the visited microbatches have.
  name: str  # their weighting within it: "all", "first" or "second".

  @property
  def size(self) -> int:
    """Number of microbatches in the group (over the whole named axis)."""
    return group_size(self.layout, self.name)

  def take(self, tree: PyTree) -> PyTree:
    """The visited microbatches of a tree with the parent layout."""
    if self.members is None:
      return tree
    return jax.tree.map(lambda x: x[self.members], tree)

  def indices(self) -> jax.Array:
    """Positions of the visited microbatches along the parent's leading axis
    (for loops that index the parent tree in place instead of slicing it)."""
    if self.members is None:
      return jnp.arange(self.layout.local)
    return jnp.arange(self.members.start, self.members.stop)


def group(mb: Microbatches, name: str) -> Group:
  """The :class:`Group` ``"all"``, ``"first"`` or ``"second"`` of ``mb``.

  ``"first"`` is the first ``floor(M / 2)`` global microbatches (group A of
  the two-fold schemes), ``"second"`` the rest (group B).
  """
  if mb.axis_name is not None or mb.blocks > 1 or name == "all":
    return Group(None, mb, name)
  half = mb.total // 2
  members = slice(0, half) if name == "first" else slice(half, mb.total)
  n = group_size(mb, name)
  return Group(members, Microbatches(local=n, total=n, axis_name=None), "all")


def sum_over_microbatches(
    fn: Callable[..., PyTree],
    *stacked: PyTree,
    weights: Optional[jax.Array] = None,
    axis_name: Optional[str] = None,
) -> PyTree:
  r"""Computes :math:`\sum_j w_j\, fn(x^{(1)}_j, x^{(2)}_j, \dots)` over all M.

  ``fn`` maps the per-microbatch slices of ``stacked`` (trees whose leaves
  carry the leading microbatch axis) to a tree. The local sum is an unrolled
  ``lax.fori_loop`` (see :mod:`bcopt._src.fusion`), so XLA fuses the
  elementwise work of all terms into one pass without materialising
  per-microbatch results; the local sums are then combined with ``psum``
  over ``axis_name``. The loop starts from the first term, which keeps the
  carry's varying-ness right under ``shard_map``.

  When the leading axis may be sharded (:func:`partitions` gives ``D > 1``)
  the loop runs over the ``M_local / D`` positions within the blocks, with
  ``fn`` vectorised over the ``D`` blocks, and ends with a sum over blocks:
  each device reads only its own microbatches, and the partitioner turns
  that sum into a local sum plus an all-reduce.

  Args:
    fn: per-microbatch function of one slice of each stacked tree.
    *stacked: trees with a leading local microbatch axis.
    weights: optional ``(M_local,)`` weights (e.g. a group mask).
    axis_name: named axis to sum over as well, or None.

  Returns:
    The sum, shaped like one output of ``fn``.
  """
  first = jax.tree.leaves(stacked)[0]
  d = partitions(first)
  steps = first.shape[0] // d
  if d > 1:
    stacked = _blocks(stacked, d)
    fn = jax.vmap(fn)
    if weights is not None:
      weights = weights.reshape((d, steps) + weights.shape[1:])

  def term(j):
    out = fn(*_visit(stacked, d, j))
    if weights is None:
      return out
    w = _visit(weights, d, j)
    return jax.tree.map(
        lambda o: o * jnp.reshape(w, w.shape + (1,) * (o.ndim - w.ndim)
                                  ).astype(o.dtype), out)

  total = jax.lax.fori_loop(
      1, steps, lambda j, acc: jax.tree.map(jnp.add, acc, term(j)), term(0),
      unroll=fusion.microbatch_loop_unroll(steps))
  if d > 1:
    total = jax.tree.map(lambda t: jnp.sum(t, axis=0), total)
  return psum(total, axis_name)


def map_over_microbatches(fn: Callable[[PyTree], PyTree], stacked: PyTree,
                          group: "Group") -> PyTree:
  """``fn`` of each visited microbatch of ``group``, stacked in order.

  A rolled loop (``lax.map``): a device holds one microbatch's temporaries
  at a time, so scratch memory does not grow with M. ``stacked`` has the
  parent layout (``group.layout`` describes the visited microbatches); on a
  possibly sharded axis every block advances together, as in
  :func:`sum_over_microbatches`.

  Args:
    fn: a function of one microbatch's slice of ``stacked``.
    stacked: a tree with the leading microbatch axis of the parent layout.
    group: the :class:`Group` whose microbatches are visited.

  Returns:
    A tree of ``fn``'s outputs with a leading axis over the visited
    microbatches.
  """
  first = jax.tree.leaves(stacked)[0]
  d = partitions(first)
  if d == 1:
    return jax.lax.map(lambda j: fn(_visit(stacked, 1, j)), group.indices())
  blocks = _blocks(stacked, d)
  out = jax.lax.map(lambda j: jax.vmap(fn)(_visit(blocks, d, j)),
                    jnp.arange(first.shape[0] // d))  # (M_local / D, D, ...)
  return jax.tree.map(
      lambda o: jnp.swapaxes(o, 0, 1).reshape((-1,) + o.shape[2:]), out)


def mean(updates: PyTree, mb: Microbatches, group: str = "all") -> PyTree:
  """Mean over the microbatches of a group, across the named axis.

  Accumulates in float32 (or higher) whatever the gradient dtype.

  Args:
    updates: microbatched tree with the layout ``mb`` (not checked here:
      :func:`layout` checks it once per update).
    mb: the layout.
    group: ``"all"``, ``"first"`` or ``"second"`` (see :func:`group_weights`).

  Returns:
    A param-shaped tree of group means.
  """
  total = sum_over_microbatches(
      numerics.upcast, updates, weights=group_weights(mb, group),
      axis_name=mb.axis_name)
  n = group_size(mb, group)
  return jax.tree.map(lambda t: t / n, total)


def mean_and_squares(updates: PyTree, mb: Microbatches
                     ) -> tuple[PyTree, PyTree]:
  """:func:`mean` over all microbatches, stored (read it rather than
  recomputing it from the microbatches), and the sum over microbatches of
  each leaf's squared norm ``sum_j ||g_j||^2`` (a float32 scalar per leaf,
  or higher)."""
  total = sum_over_microbatches(numerics.upcast, updates,
                                axis_name=mb.axis_name)

  # A batched dot product per leaf, not a sum of the stacked squares: XLA:CPU
  # would run that reduction over all M slices in one single-threaded kernel.
  def squares(g):
    g = numerics.upcast(g)
    axes = tuple(range(1, g.ndim))
    return jnp.sum(jax.lax.dot_general(
        g, g, ((axes, axes), ((0,), (0,))),
        precision=jax.lax.Precision.HIGHEST))

  return (fusion.apart(lambda t: jax.tree.map(lambda x: x / mb.total, t),
                       total),
          psum(jax.tree.map(squares, updates), mb.axis_name))


def microbatch_mean(updates: PyTree, axis_name: Optional[str] = None) -> PyTree:
  """The full-batch mean gradient ``gbar`` of microbatched gradients.

  Use it to update persistent state from the full batch
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
  return mean(updates, layout(updates, axis_name))
