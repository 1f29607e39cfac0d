"""Sophia-G-BC: diagonal-curvature preconditioning with bias corrections."""

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


class ScaleBySophiaBCState(NamedTuple):
  """State of :func:`scale_by_sophia_bc`."""

  count: chex.Array  # shape=(), dtype=int32: steps taken.
  mu: optax.Updates  # param shapes, mu_dtype (float32 default): momentum.
  h: optax.Updates  # param shapes, float32: EMA of the curvature estimates.
  inv: optax.Updates  # param shapes, float32: cached (corrected) inverse of
  #                     rho * h + eps from the last curvature step; 1/eps
  #                     before the first one.


def _check_curvature(updates: PyTree, curvature: PyTree) -> None:
  if jax.tree.structure(curvature) != jax.tree.structure(updates):
    raise ValueError(
        "curvature must have the structure of the gradients (one microbatched"
        " diagonal estimate per parameter): got"
        f" {jax.tree.structure(curvature)} for gradients"
        f" {jax.tree.structure(updates)}."
    )
  # Same structure, so the leaves pair up in order (pairing them with a
  # tree map would mistake a tuple of parameters for a pair).
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(updates),
                          jax.tree.leaves(curvature)):
    if jnp.shape(g) != jnp.shape(r):
      raise ValueError(
          f"curvature leaf {jax.tree_util.keystr(path)} has shape"
          f" {jnp.shape(r)} but its gradient has shape {jnp.shape(g)}: pass one"
          " curvature estimate per microbatch, stacked along the same leading"
          " microbatch axis (e.g. jax.vmap(bcopt.gnb_diag, ...) over the same"
          " microbatches)."
      )


def scale_by_sophia_bc(
    b1: jax.typing.ArrayLike = 0.965,
    b2: jax.typing.ArrayLike = 0.99,
    rho: jax.typing.ArrayLike = 0.04,
    eps: jax.typing.ArrayLike = 1e-12,
    clip: jax.typing.ArrayLike = 1.0,
    *,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescale microbatched gradients by bias-corrected Sophia.

  ``update(updates, state, params=None, *, curvature=None)`` takes
  microbatched gradients and, on curvature-refresh steps, microbatched
  diagonal curvature estimates :math:`r_j` (same tree and leading axis, e.g.
  from :func:`bcopt.gnb_diag` or :func:`bcopt.hutchinson_diag`); other
  keyword arguments, which ``optax.chain`` forwards to every member, are
  ignored:

  .. math::

    m_c(a) = \beta_1 \mu + (1-\beta_1) a, \qquad
    p(s) = \rho\,(\beta_2 h + (1-\beta_2) s) + \epsilon

    u = \begin{cases}
      \mathrm{scheme}\big[\mathrm{clip}(m_c(a)\, \tilde f(p(s)), \pm c)\big]
        & \text{curvature given} \\
      \mathrm{clip}(m_c(\bar g) \cdot \mathrm{inv}, \pm c) & \text{otherwise}
    \end{cases}

  where the cross-fit scheme takes the numerator gradients :math:`a` and the
  curvature means :math:`s` from independent microbatch groups (each LOO fold
  is clipped before the folds are averaged) and :math:`\tilde f` is the
  variance-corrected inverse :math:`\max(0, 1/p - V/p^3)`. Persistent state
  comes from the full batch: :math:`\mu \leftarrow m_c(\bar g)` every step;
  on curvature steps :math:`h \leftarrow \beta_2 h + (1-\beta_2)\bar r` and
  the cached :math:`\mathrm{inv} \leftarrow \tilde f(\rho h + \epsilon)` with
  the variance over all ``M`` microbatches. Steps without curvature use the
  cached inverse, which depends on earlier batches only, so their numerator
  is the full-batch mean. ``inv`` starts at :math:`1/\epsilon`, so steps
  before the first curvature step are sign-like (as in official Sophia).

  The caller picks the refresh interval, so the estimator's extra backward
  pass is paid only on refresh steps: compile two steps, one with and one
  without ``curvature`` (two traces in all), and call the first every ``k``
  steps (see the example).

  Differences from ``optax.contrib.sophia``: optax runs a Hutchinson
  estimator inside ``update`` on a fixed interval, bias-corrects the momentum,
  divides by :math:`\max(\gamma h, \epsilon)` and refreshes :math:`h` after
  using it; here the caller supplies the estimates (GNB or Hutchinson), the
  momentum is not bias-corrected (official Sophia), the denominator is
  :math:`\rho h + \epsilon`, and a refresh step uses its own fresh estimate.
  With ``b1=0`` and ``rho=gamma`` the two agree on the steps after a refresh
  (tested).

  Args:
    b1: :math:`\beta_1`, momentum decay.
    b2: :math:`\beta_2`, decay of the curvature EMA (per refresh).
    rho: :math:`\rho > 0`, curvature scale (official Sophia 0.04; the paper's
      runs 0.05).
    eps: :math:`\epsilon > 0`, added to the denominator.
    clip: :math:`c > 0`, elementwise clip of each (fold's) update.
    cross_fit: ``None``, ``"twofold"``, ``"symmetric"`` or ``"loo"``.
    inverse_correction: ``None``, ``"jackknife"`` or ``"paper"``.
    mu_dtype: dtype of :math:`\mu` (default float32, or wider params' dtype).
    axis_name: the named microbatch axis, or None.
    diagnostics: also measure the microbatch diagnostics (as
      :func:`bcopt.scale_by_adam_bc`); steps without curvature use the
      cached inverse, so their coupling and Jensen shares are 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for bad options at construction (unknown scheme/estimator,
      ``rho <= 0``, ``clip <= 0``, ``eps <= 0``) and, at trace time, for too few
      microbatches or ``curvature`` not matching the gradients.

  Examples:
    >>> import functools, jax, jax.numpy as jnp, optax, bcopt
    >>> def logits_fn(params, x):
    ...   return x @ params["w"]
    >>> def loss_fn(params, batch):
    ...   x, y = batch
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits_fn(params, x), y).mean()
    >>> tx = bcopt.sophia_bc(1e-2, weight_decay=0.0)
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> opt_state = tx.init(params)
    >>> grads_fn = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    >>> @functools.partial(jax.jit, static_argnames="refresh")
    ... def train_step(params, opt_state, batch, key, refresh):
    ...   grads = grads_fn(params, batch)
    ...   curvature = None
    ...   if refresh:   # static: two compiled steps
    ...     keys = jax.random.split(key, batch[0].shape[0])
    ...     curvature = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))(
    ...         logits_fn, params, batch[0], keys)
    ...   updates, opt_state = tx.update(grads, opt_state, params,
    ...                                  curvature=curvature)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> x = jax.random.normal(jax.random.key(0), (8, 16, 4))   # M = 8
    >>> batch = (x, (x[..., 0] > 0).astype(jnp.int32))
    >>> for step in range(20):
    ...   params, opt_state = train_step(params, opt_state, batch,
    ...                                  jax.random.key(step), step % 10 == 0)

  References:
    Liu et al., 2023, arXiv:2305.14342 (Sophia); Nayak et al., 2026,
    arXiv:2605.20756.
  """
  crossfit.check_scheme(cross_fit)
  inverse.check_estimator(inverse_correction)
  numerics.check_positive("rho", rho)
  numerics.check_positive("clip", clip)
  numerics.check_positive("eps", eps, "the cached inverse starts at 1/eps")

  def init_fn(params):
    h = numerics.zeros_moment(params)
    return ScaleBySophiaBCState(
        count=jnp.zeros([], jnp.int32),
        mu=numerics.zeros_moment(params, mu_dtype),
        h=h,
        inv=jax.tree.map(lambda x: jnp.full_like(x, 1.0 / eps), h),
    )

  def update_fn(updates, state, params=None, *, diagnostics, curvature=None,
                **extra_args):
    del extra_args
    mb = microbatch.layout(updates, axis_name, params)
    crossfit.check_microbatch_count(mb, cross_fit, inverse_correction)
    if diagnostics:
      mean_sq_sum = microbatch.mean_and_squares(updates, mb)
      g_bar = mean_sq_sum[0]
    else:
      g_bar = microbatch.mean(updates, mb)

    def numerator_fn(a):
      return jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, a)

    def clipped(numerator, inv):
      return jax.tree.map(
          lambda n, i: jnp.clip(n * i, -clip, clip), numerator, inv)

    m_full = numerator_fn(g_bar)   # the full batch's momentum: the new mu
    if curvature is None:
      direction = clipped(m_full, state.inv)
      h, inv = state.h, state.inv
      measured = diagnostics_lib.measure(
          mb, mean_sq_sum, direction) if diagnostics else None
    else:
      _check_curvature(updates, curvature)

      def denominator_fn(s):
        return jax.tree.map(
            lambda h_, x: rho * (b2 * h_ + (1 - b2) * x) + eps, state.h, s)

      # The cached inverse's full-batch mean and variance, shared with the
      # step where it needs the same values.
      r_bar = microbatch.mean(curvature, mb)
      full = crossfit.FullBatch(r_bar, crossfit.group_variance(
          denominator_fn, curvature, r_bar, mb, "all", inverse_correction))
      direction = crossfit.cross_fitted(
          updates, numerator_fn, denominator_fn, mb, scheme=cross_fit,
          inverse_correction=inverse_correction, stats=curvature,
          combine=clipped, full=full, diagnostics=diagnostics)
      measured = None
      if diagnostics:
        direction, uncorrected, standard = direction
        measured = diagnostics_lib.measure(mb, mean_sq_sum, direction,
                                           uncorrected, standard)
      h = numerics.update_moment(state.h, r_bar, b2)
      inv = optax.tree.cast_like(
          inverse.variance_correct_inverse(denominator_fn(r_bar),
                                           full.variance),
          state.inv)

    new_state = ScaleBySophiaBCState(
        count=optax.safe_increment(state.count),
        mu=optax.tree.cast_like(m_full, state.mu),
        h=h,
        inv=inv,
    )
    return optax.tree.cast_like(direction, updates), new_state, measured

  init, update = diagnostics_lib.transform(init_fn, update_fn, diagnostics)
  return optax.GradientTransformationExtraArgs(
      init, microbatch.on_explicit_mesh(update))


def sophia_bc(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.965,
    b2: jax.typing.ArrayLike = 0.99,
    rho: jax.typing.ArrayLike = 0.04,
    eps: jax.typing.ArrayLike = 1e-12,
    clip: jax.typing.ArrayLike = 1.0,
    weight_decay: jax.typing.ArrayLike = 0.1,
    *,
    cross_fit: crossfit.Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    mask: Optional[Any] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    axis_name: Optional[str] = None,
    diagnostics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia-G with cross-fitting and variance-corrected inversion.

  ``optax.chain(scale_by_sophia_bc(...), optax.add_decayed_weights(
  weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``:

  .. math::

    \Delta\theta = -\eta_t\big(u + \lambda\theta\big)

  with :math:`u` from :func:`scale_by_sophia_bc`; pass ``curvature=`` to
  ``update`` on refresh steps. With ``cross_fit=None,
  inverse_correction=None`` and one microbatch this is the official Sophia
  rule :math:`\eta\,\mathrm{sign}(m)\min(|m|/(\rho h+\epsilon), 1)`.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1, b2, rho, eps, clip: see :func:`scale_by_sophia_bc`.
    weight_decay: :math:`\lambda`, decoupled weight decay.
    cross_fit, inverse_correction, mu_dtype, axis_name, diagnostics: see
      :func:`scale_by_sophia_bc`.
    mask: which parameters decay (as in ``optax.adamw``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, bcopt
    >>> tx = bcopt.sophia_bc(1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((4, 3))}
    >>> updates, state = tx.update(grads, state, params,
    ...                            curvature={"w": jnp.ones((4, 3))})

  References:
    Liu et al., 2023, arXiv:2305.14342; Nayak et al., 2026, arXiv:2605.20756.
  """
  return optax.chain(
      scale_by_sophia_bc(
          b1, b2, rho, eps, clip, cross_fit=cross_fit,
          inverse_correction=inverse_correction, mu_dtype=mu_dtype,
          axis_name=axis_name, diagnostics=diagnostics),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def gnb_diag(
    logits_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    key: jax.Array,
    *,
    label_mask: Optional[jax.Array] = None,
) -> PyTree:
  r"""Sophia-G's Gauss-Newton-Bartlett diagonal estimate for one microbatch.

  Samples labels :math:`\hat y \sim \mathrm{softmax}(z)` per position from
  the logits :math:`z` = ``logits_fn(params, inputs)`` (shape
  ``(..., vocab)``), and returns

  .. math::

    \hat r = B\, \nabla_\theta \hat L \odot \nabla_\theta \hat L,\qquad
    \hat L = \frac1B \sum_{b} \mathrm{CE}(z_b, \hat y_b)

  with :math:`B` the number of label positions (those where ``label_mask``
  is true). :math:`E[\hat r]` is the diagonal of the Gauss-Newton matrix of
  the mean cross-entropy. One forward and one backward pass (``jax.vjp``).
  Jittable; vmap it over microbatches with split keys.

  Args:
    logits_fn: ``(params, inputs) -> logits`` with a trailing vocab axis.
    params: the parameters (a pytree).
    inputs: one microbatch of inputs for ``logits_fn``.
    key: a PRNG key for the label sampling.
    label_mask: optional boolean/0-1 array shaped like the logits without
      the vocab axis; positions where it is 0 are ignored.

  Returns:
    A pytree like ``params``: the diagonal curvature estimate.

  Examples:
    >>> import jax, jax.numpy as jnp, bcopt
    >>> logits_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> x = jnp.ones((8, 5, 4))          # M = 8 microbatches of 5 positions
    >>> keys = jax.random.split(jax.random.key(0), 8)
    >>> r = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))(
    ...     logits_fn, params, x, keys)
    >>> r["w"].shape
    (8, 4, 3)

  References:
    Liu et al., 2023, arXiv:2305.14342, Algorithm 2.
  """
  logits, vjp = jax.vjp(lambda p: logits_fn(p, inputs), params)
  labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  if label_mask is None:
    weights = jnp.ones(labels.shape, probs.dtype)
  else:
    weights = jnp.broadcast_to(label_mask, labels.shape).astype(probs.dtype)
  count = jnp.sum(weights)
  # d/dz of (1/B) sum_b w_b CE(z_b, y_b) is w_b (softmax(z_b) - e_{y_b}) / B.
  d_logits = (probs - one_hot) * (weights / jnp.maximum(count, 1.0))[..., None]
  (grad,) = vjp(d_logits.astype(logits.dtype))
  return jax.tree.map(
      lambda g: (count * jnp.square(g.astype(jnp.float32))).astype(g.dtype),
      grad)


def hutchinson_diag(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    key: jax.Array,
) -> PyTree:
  r"""Hutchinson's diagonal Hessian estimate (Sophia-H) for one microbatch.

  .. math::

    \hat r = z \odot (H z), \qquad z \sim \mathrm{Rademacher},\quad
    H = \nabla^2_\theta\, \mathrm{loss\_fn}(\theta, \mathrm{inputs})

  with :math:`Hz` a forward-over-reverse Hessian-vector product.
  :math:`E[\hat r] = \mathrm{diag}(H)`. Jittable; vmap it over microbatches
  with split keys.

  Args:
    loss_fn: ``(params, inputs) -> scalar loss``.
    params: the parameters (a pytree).
    inputs: one microbatch.
    key: a PRNG key for the Rademacher probe.

  Returns:
    A pytree like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, bcopt
    >>> loss_fn = lambda p, x: jnp.sum(jnp.sin(p["w"]) * x)
    >>> r = bcopt.hutchinson_diag(loss_fn, {"w": jnp.ones(3)}, jnp.ones(3),
    ...                           jax.random.key(0))
    >>> r["w"].shape
    (3,)

  References:
    Hutchinson, 1989; Liu et al., 2023, arXiv:2305.14342.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  probes = jax.tree.unflatten(treedef, [
      jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys, leaves)])
  grad_fn = jax.grad(lambda p: loss_fn(p, inputs))
  _, hz = jax.jvp(grad_fn, (params,), (probes,))
  return jax.tree.map(jnp.multiply, probes, hz)
