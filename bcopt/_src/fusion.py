"""Workarounds for how XLA backends fuse bcopt's passes, kept in one place.

Nothing here changes a value; each function only steers how XLA compiles a
computation, and says which backend behaviour it works around. If a backend
stops needing one, it is changed here and nowhere else.
"""

from typing import Any

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
