"""Workarounds for how XLA backends fuse bcopt's passes, kept in one place.

Nothing here changes a value; each function only steers how XLA compiles a
computation, and says which backend behaviour it works around. If a backend
stops needing one, it is changed here and nowhere else.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

# Sums over the microbatch axis are written as loops over its slices
# (bcopt._src.microbatch.sum_over_microbatches). Unrolled, XLA fuses all M
# terms of a pass into one sweep over the gradients: no accumulator round
# trips, and no reduction over a major axis, which XLA:CPU lowers to a slow
# single-threaded kernel. Loops longer than this are unrolled in chunks of 8
# to bound the program size.
FULL_UNROLL_LIMIT = 64
CHUNK_UNROLL = 8


def microbatch_loop_unroll(m_local: int):
  """The ``unroll`` argument of a ``fori_loop`` over ``m_local`` slices."""
  return True if m_local <= FULL_UNROLL_LIMIT else CHUNK_UNROLL


def stored(tree: PyTree) -> PyTree:
  """``tree``, computed once by its own kernels and stored (XLA:CPU only).

  Works around XLA:CPU's lack of multi-output fusion: it copies a cheap
  elementwise producer (such as the sum of M gradient slices that
  :func:`bcopt.microbatch_mean` is) into every consumer kernel. For
  elementwise consumers that is what we want (every stored temporary is
  fresh memory), but a reduction over it (the global norm in
  :func:`bcopt.clip_by_global_norm`) then becomes one single-threaded kernel
  that sums the M slices itself, several times slower than reducing a
  stored mean. A conditional is a fusion boundary XLA keeps, so on CPU the
  tree passes through one whose taken branch is the identity: its producers
  run once and write it. Only the tree is stored, not its inputs. Other
  backends get ``tree`` unchanged (there a conditional would cost a
  device-host synchronisation).

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


def per_microbatch(fn: Callable[[jax.Array], jax.Array],
                   x: jax.Array) -> jax.Array:
  """``fn(x)`` for an elementwise ``fn``, built slice by slice (XLA:CPU only).

  Works around XLA:CPU's limit on duplicating a producer's code in the
  kernels it is fused into. The update kernels read every microbatch slice of
  their input several times (LOO with the jackknife: for the mean, the
  spread and the folds). When that input is an elementwise function of the
  gradients (the clipped gradients ``g * scale`` of
  :func:`bcopt.clip_by_global_norm`), the reads exceed the limit (seen at
  ``M`` = 8 and 32), so XLA writes ``fn(x)`` out in full, ``M`` times the
  parameters of fresh memory that page-faults on every call, and the update
  reads it back (the chain cost 2.4-3x the update alone on 2 cores; see
  docs/performance.md). Stacked from ``fn`` of each slice,
  the loops' static slices of the stack simplify to the slices' own
  producers, each read a few times, which fuse into the update kernels; the
  stack is never written. The values are ``fn(x)``'s.

  Only for an unsharded microbatch axis short enough for the loops over it
  to be unrolled in full (``FULL_UNROLL_LIMIT``): longer loops index it
  dynamically, and slicing a sharded axis would gather it. Elsewhere, and
  on other backends, this is ``fn(x)``.

  Args:
    fn: an elementwise function (``fn(x)[j] == fn(x[j])``).
    x: an array with a leading microbatch axis held on one device.

  Returns:
    ``fn(x)``.
  """
  m = x.shape[0]
  if m > FULL_UNROLL_LIMIT:
    return fn(x)
  return jax.lax.platform_dependent(
      x, cpu=lambda x: jnp.stack([fn(x[j]) for j in range(m)]), default=fn)



def apart(fn: Callable[..., PyTree], *args: PyTree) -> PyTree:
  """``fn(*args)``, with ``args`` written once before ``fn`` reads them
  (XLA:CPU only).

  Like :func:`stored`, it works around XLA:CPU's lack of multi-output
  fusion with a conditional, a fusion boundary XLA keeps: each array of
  ``args`` is computed once by its own kernels and written, and ``fn``'s
  kernels (reductions, slices, parts of a complex tree) read it instead of
  recomputing it. Unlike :func:`stored`, nothing is copied: the taken
  branch is ``fn`` itself, whose kernels write the conditional's outputs
  (an identity branch copies its input into them, as costly as writing it
  again). The arguments pass an optimization barrier first, so XLA cannot
  move their last operations into the branch, where ``fn`` would cancel
  them (the real part of a complex built there is its real input, and the
  two kernels come back). The predicate reads no argument: computing it
  would be one more consumer of their producers. Other backends get
  ``fn(*args)``.

  Args:
    fn: a function of trees of arrays.
    *args: its arguments.

  Returns:
    ``fn(*args)``.
  """
  def on_cpu(*a):
    # XLA cannot fold the barrier's 1, so the conditional stays; the other
    # branch (never taken) returns zeros.
    one = jax.lax.optimization_barrier(jnp.int32(1))
    zeros = lambda *x: jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, *x))
    return jax.lax.cond(one != 0, fn, zeros,
                        *jax.lax.optimization_barrier(a))

  return jax.lax.platform_dependent(*args, cpu=on_cpu, default=fn)


def packed(first: PyTree, second: PyTree) -> PyTree:
  """Leaves ``first + i second``: two real trees as one complex tree.

  Works around XLA:CPU's lack of multi-output fusion where one pass must
  produce two trees from the same expensive values: the diagnostics'
  corrected and plain updates, whose folds share the square roots and
  divisions of every microbatch, or the sums of ``g_j`` and ``g_j^2``.
  As two outputs they are two kernels; XLA does not duplicate expensive
  producers into both, so it writes them out, ``M`` times the parameters
  of fresh memory per pass for the LOO folds (the diagnostics then cost
  6-14x the update). One complex output is one kernel that computes each
  shared value once. Complex addition is the addition of the parts, so
  sums of packed trees are exactly the sums of the parts; take the parts
  with :func:`unpacked` inside :func:`apart`. The parts must be real
  floats of one dtype (float32 or float64).

  Args:
    first, second: trees of the same structure, shapes and dtype.

  Returns:
    A complex tree.
  """
  return jax.tree.map(jax.lax.complex, first, second)


def unpacked(tree: PyTree) -> tuple[PyTree, PyTree]:
  """The two trees of :func:`packed`: real and imaginary parts."""
  return jax.tree.map(jnp.real, tree), jax.tree.map(jnp.imag, tree)
