"""Microbatch-aware companions of optax transforms that read the whole tree.

Transforms that look at the gradient tree as a whole (its norm, its
finiteness, its shape) would see the stacked microbatch axis. These versions
understand it, so they can sit in front of (or around) any bcopt transform.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from bcopt._src import fusion
from bcopt._src import microbatch


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformation:
  r"""Clips microbatched gradients by the global norm of their mean.

  .. math::

    g_j \leftarrow g_j \cdot \min\Big(1, \frac{c}{\|\bar g\|}\Big),
    \qquad \bar g = \tfrac1M \textstyle\sum_j g_j

  Every microbatch is scaled by the same factor, so the mean gradient is
  clipped exactly as ``optax.clip_by_global_norm`` would clip it, and the
  microbatch structure a bcopt transform needs is kept. The norm is that of
  the mean over all ``M`` microbatches, across ``axis_name`` when set.

  Args:
    max_norm: :math:`c`, the largest allowed norm of the mean gradient.
    axis_name: the named microbatch axis, or None.

  Returns:
    An ``optax.GradientTransformation`` with empty state; its output is
    microbatched like its input.

  Examples:
    >>> import jax.numpy as jnp, optax, bcopt
    >>> tx = optax.chain(bcopt.clip_by_global_norm(1.0), bcopt.adamw_bc(1e-3))
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[3.0, 4.0], [3.0, 4.0]])}  # M = 2, |mean| = 5
    >>> clip = bcopt.clip_by_global_norm(1.0)
    >>> clipped, _ = clip.update(grads, clip.init(params))
    >>> clipped["w"]
    Array([[0.6, 0.8],
           [0.6, 0.8]], dtype=float32)
  """

  def update_fn(updates, state, params=None):
    del params
    mb = microbatch.layout(updates, axis_name)
    g_bar = microbatch.mean(updates, mb)
    if axis_name is None:  # else a single-threaded reduce (psum stores it)
      g_bar = fusion.stored(g_bar)
    g_norm = optax.tree.norm(g_bar)
    trigger = g_norm < max_norm

    def clip_fn(t):
      scale = jnp.where(trigger, 1.0, max_norm / g_norm).astype(t.dtype)
      scaled = lambda x: (x * scale).astype(t.dtype)
      # Unsharded: slice by slice, so the scaling fuses into the next
      # transform's kernels instead of being written out (fusion.py).
      return fusion.per_microbatch(scaled, t) if mb.blocks == 1 else scaled(t)

    return jax.tree.map(clip_fn, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def apply_if_finite(
    inner: optax.GradientTransformation,
    max_consecutive_errors: int,
    *,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose microbatched gradients hold a NaN or an Inf.

  ``optax.apply_if_finite`` with its semantics and its state
  (``optax.ApplyIfFiniteState``) for a microbatched ``inner``: when any
  microbatch gradient (on any member of ``axis_name``) is non-finite, the
  step returns zero updates shaped like the *parameters* and leaves the inner
  state untouched; after more than ``max_consecutive_errors`` consecutive bad
  steps it gives up and applies the inner update anyway. (optax's version
  cannot wrap a microbatched transform: its reject branch returns zeros
  shaped like its ``(M, ...)`` input, which ``lax.cond`` refuses.)

  Args:
    inner: a transform taking microbatched gradients and returning
      param-shaped updates (a bcopt optimizer, or a chain starting with
      :func:`clip_by_global_norm`).
    max_consecutive_errors: how many consecutive non-finite steps to skip.
    axis_name: the named microbatch axis, or None. When set, the decision is
      taken on all members together.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, bcopt
    >>> tx = bcopt.apply_if_finite(bcopt.adamw_bc(1e-3), 3)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([[1.0, jnp.nan], [1.0, 2.0]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"], int(state.notfinite_count)
    (Array([0., 0.], dtype=float32), 1)
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    bad = sum(jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
              for x in jax.tree.leaves(updates))
    isfinite = microbatch.psum(bad, axis_name) == 0
    notfinite_count = jnp.where(
        isfinite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))

    def do_update(_):
      return inner.update(updates, state.inner_state, params, **extra_args)

    def reject_update(_):
      # Zeros of the inner update's type (shape, dtype and, on an Explicit
      # mesh, sharding): param-shaped, not shaped like the microbatched input.
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(do_update, None)[0])
      return zeros, state.inner_state

    new_updates, new_inner_state = jax.lax.cond(
        jnp.logical_or(isfinite, notfinite_count > max_consecutive_errors),
        do_update, reject_update, operand=None)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count,
        last_finite=isfinite,
        total_notfinite=jnp.where(
            isfinite, state.total_notfinite,
            optax.safe_increment(state.total_notfinite)),
        inner_state=new_inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
