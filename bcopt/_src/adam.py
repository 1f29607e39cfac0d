"""AdamW-BC: Adam with cross-fitting and variance-corrected inversion."""

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from bcopt._src import crossfit
from bcopt._src import diagnostics as diagnostics_lib
from bcopt._src import inverse
from bcopt._src import microbatch
from bcopt._src import numerics

PyTree = Any


def adam_terms(
    mu: PyTree, nu: PyTree, count: chex.Array, b1: chex.Numeric,
    b2: chex.Numeric, eps: chex.Numeric,
) -> tuple[Callable[[PyTree], PyTree], Callable[[PyTree], PyTree]]:
  r"""Adam's numerator and denominator as functions of group means.

  .. math::

    \hat m(a) = \frac{\beta_1 \mu + (1-\beta_1) a}{1-\beta_1^t},\qquad
    p(s) = \sqrt{\max\Big(0, \frac{\beta_2 \nu + (1-\beta_2) s^2}
        {1-\beta_2^t}\Big)} + \epsilon

  Args:
    mu, nu: the moments *before* this step.
    count: the 1-based step count :math:`t` of this step.
    b1, b2, eps: Adam's hyperparameters.

  Returns:
    ``(numerator_fn, denominator_fn)`` for :func:`bcopt.cross_fit`.
  """
  bc1 = numerics.bias_correction(b1, count)
  bc2 = numerics.bias_correction(b2, count)
  # Both maps are affine in their input (the denominator in its square):
  # fold the moments and the bias corrections into per-step constants once,
  # so each call (one per fold or leave-one-out value) is a multiply-add.
  m_scale = (1 - b1) / bc1
  v_scale = (1 - b2) / bc2
  m_base = jax.tree.map(lambda m: m * (b1 / bc1), numerics.upcast(mu))
  v_base = jax.tree.map(lambda v: v * (b2 / bc2), numerics.upcast(nu))

  def numerator_fn(a):
    return jax.tree.map(
        lambda k, x: k + m_scale.astype(k.dtype) * x, m_base, a)

  def denominator_fn(s):
    return jax.tree.map(
        lambda c, x: jnp.sqrt(jnp.maximum(
            c + v_scale.astype(c.dtype) * (x * x), 0.0)) + eps,
        v_base, s)

  return numerator_fn, denominator_fn


class ScaleByAdamBCState(NamedTuple):
  """State of :func:`scale_by_adam_bc`: exactly ``optax.scale_by_adam``'s."""

  count: chex.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # param shapes, mu_dtype (float32 default): first moment.
  nu: optax.Updates  # param shapes, nu_dtype (float32 default): second moment.


def scale_by_adam_bc(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformation:
  r"""Rescale microbatched gradients by bias-corrected Adam.

  ``update`` takes microbatched gradients (every leaf
  ``(M_local,) + param.shape``) and returns the param-shaped direction

  .. math::

    u = \mathrm{scheme}\big[\hat m(a) \cdot \tilde f(p(s))\big], \quad
    \hat m(a) = \frac{\beta_1 \mu + (1-\beta_1) a}{1-\beta_1^t}, \quad
    p(s) = \sqrt{\frac{\beta_2 \nu + (1-\beta_2) s^2}{1-\beta_2^t}}+\epsilon

  where the scheme (``cross_fit``) picks the numerator mean gradient
  :math:`a` and the preconditioner mean gradient :math:`s` from independent
  microbatch groups and :math:`\tilde f` is the variance-corrected inverse
  :math:`\max(0, 1/p - V/p^3)` (see :func:`bcopt.cross_fit`). The state is
  updated from the full-batch mean :math:`\bar g`:
  :math:`\mu \leftarrow \beta_1\mu + (1-\beta_1)\bar g`,
  :math:`\nu \leftarrow \beta_2\nu + (1-\beta_2)\bar g^2`, so it has the same
  size and meaning as ``optax.scale_by_adam``'s. With ``cross_fit=None`` and
  ``inverse_correction=None`` this is ``optax.scale_by_adam`` on :math:`\bar
  g`.

  Args:
    b1: :math:`\beta_1`, decay of the first moment.
    b2: :math:`\beta_2`, decay of the second moment.
    eps: :math:`\epsilon`, added to the square root.
    cross_fit: ``None`` (standard), ``"twofold"``, ``"symmetric"`` or
      ``"loo"`` (leave-one-out, the default).
    inverse_correction: ``None``, ``"jackknife"`` (default) or ``"paper"``
      (the reference code's estimator).
    mu_dtype: dtype of :math:`\mu` (default float32, or wider params' dtype).
    nu_dtype: dtype of :math:`\nu` (same default).
    axis_name: named microbatch axis when ``update`` runs inside ``pmap``,
      ``shard_map`` or ``vmap(axis_name=...)``; statistics are then reduced
      with collectives over it.
    diagnostics: also measure, on every update and from the same passes,
      the gradient noise scale and how much cross-fitting and the
      correction change the step; the state is then a
      ``bcopt.DiagnosticsState`` around the one above (read it with
      :func:`bcopt.microbatch_diagnostics`).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for unknown ``cross_fit``/``inverse_correction`` values (at
      construction) and, at trace time, for too few microbatches or
      gradients without the microbatch axis.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, bcopt
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p, x: jnp.sum((p["w"] - x) ** 2)
    >>> batches = jax.random.normal(jax.random.key(0), (8, 3))   # M = 8
    >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batches)
    >>> tx = bcopt.scale_by_adam_bc()
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"].shape
    (3,)

  References:
    Nayak et al., 2026, arXiv:2605.20756; Kingma and Ba, 2014,
    arXiv:1412.6980.
  """
  crossfit.check_scheme(cross_fit)
  inverse.check_estimator(inverse_correction)

  def init_fn(params):
    return ScaleByAdamBCState(
        count=jnp.zeros([], jnp.int32),
        mu=numerics.zeros_moment(params, mu_dtype),
        nu=numerics.zeros_moment(params, nu_dtype),
    )

  def update_fn(updates, state, params=None, *, diagnostics):
    mb = microbatch.layout(updates, axis_name, params)
    crossfit.check_microbatch_count(mb, cross_fit, inverse_correction)
    count = optax.safe_increment(state.count)
    numerator_fn, denominator_fn = adam_terms(
        state.mu, state.nu, count, b1, b2, eps)
    measured = None
    if diagnostics:
      # The stored mean of the diagnostics' pass serves every use of the
      # full-batch mean (crossfit.FullBatch): no other pass recomputes it.
      mean_sq_sum = microbatch.mean_and_squares(updates, mb)
      g_bar = mean_sq_sum[0]
      full = crossfit.FullBatch(g_bar, crossfit.group_variance(
          denominator_fn, updates, g_bar, mb, "all", inverse_correction))
      direction, uncorrected, standard = crossfit.cross_fitted(
          updates, numerator_fn, denominator_fn, mb, scheme=cross_fit,
          inverse_correction=inverse_correction, full=full, diagnostics=True)
      measured = diagnostics_lib.measure(mb, mean_sq_sum, direction,
                                         uncorrected, standard)
    else:
      direction = crossfit.cross_fitted(
          updates, numerator_fn, denominator_fn, mb, scheme=cross_fit,
          inverse_correction=inverse_correction)
      g_bar = microbatch.mean(updates, mb)
    new_state = ScaleByAdamBCState(
        count=count,
        mu=numerics.update_moment(state.mu, g_bar, b1),
        nu=numerics.update_moment(state.nu, jax.tree.map(jnp.square, g_bar),
                                  b2),
    )
    return optax.tree.cast_like(direction, updates), new_state, measured

  init, update = diagnostics_lib.transform(init_fn, update_fn, diagnostics)
  return optax.GradientTransformation(
      init, microbatch.on_explicit_mesh(update))


def adamw_bc(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    *,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    mask: Optional[Any] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    nu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformation:
  r"""AdamW with cross-fitting and variance-corrected inversion.

  ``optax.chain(scale_by_adam_bc(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``: the update is

  .. math::

    \Delta\theta = -\eta_t \big(u + \lambda \theta\big)

  with :math:`u` from :func:`scale_by_adam_bc`. ``update`` takes microbatched
  gradients and needs ``params`` (for the weight decay). With
  ``cross_fit=None, inverse_correction=None`` it equals ``optax.adamw`` on the
  mean gradient.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1, b2, eps: see :func:`scale_by_adam_bc`.
    weight_decay: :math:`\lambda`, decoupled weight decay.
    cross_fit: ``None``, ``"twofold"``, ``"symmetric"`` or ``"loo"``.
    inverse_correction: ``None``, ``"jackknife"`` or ``"paper"``.
    mask: as in ``optax.adamw``: a tree (or callable) of booleans selecting
      the parameters that decay.
    mu_dtype, nu_dtype, axis_name, diagnostics: see
      :func:`scale_by_adam_bc`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, bcopt
    >>> params = {"w": jnp.ones(3)}
    >>> loss = lambda p, x: jnp.sum((p["w"] - x) ** 2)
    >>> batches = jax.random.normal(jax.random.key(0), (8, 3))
    >>> tx = bcopt.adamw_bc(1e-3)
    >>> state = tx.init(params)
    >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batches)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Nayak et al., 2026, arXiv:2605.20756; Loshchilov and Hutter, 2017,
    arXiv:1711.05101.
  """
  return optax.chain(
      scale_by_adam_bc(
          b1, b2, eps, cross_fit=cross_fit,
          inverse_correction=inverse_correction, mu_dtype=mu_dtype,
          nu_dtype=nu_dtype, axis_name=axis_name, diagnostics=diagnostics),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
