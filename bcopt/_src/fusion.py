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
