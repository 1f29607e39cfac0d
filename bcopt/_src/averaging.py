r"""BEMA and EMA: (bias-corrected) exponential moving averages of the iterates.

Both are optax transforms that pass their updates through unchanged and keep,
in their state, an average of the iterates :math:`\theta_t` = ``params +
updates``. They must therefore be the *last* transform of the chain that
produces the final updates; :func:`bema_params` reads the average out of any
optax state that contains one.
"""

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from bcopt._src import numerics

PyTree = Any


class BEMAState(NamedTuple):
  """State of :func:`bema`."""

  count: chex.Array  # shape=(), dtype=int32: steps taken (t).
  snapshot: optax.Params  # param shapes, dtype (float32 default): theta_0,
  #                         the iterate when averaging (re)started.
  ema: optax.Params  # param shapes, dtype (float32 default): the running EMA.
  average: optax.Params  # param shapes and dtypes: the current BEMA, held
  #                        between refreshes (what bema_params returns).


class EMAState(NamedTuple):
  """State of :func:`ema`."""

  count: chex.Array  # shape=(), dtype=int32: steps taken (t).
  ema: optax.Params  # param shapes, dtype (float32 default): the running EMA.
  average: optax.Params  # param shapes and dtypes: the EMA in the parameter
  #                        dtype (what bema_params returns).


def _check_hyperparams(powers, lag, multiplier, burn_in, update_every):
  """Construction-time checks (skipped for traced values, e.g. injected)."""
  for name, value in powers.items():
    if numerics.is_concrete(value) and not value >= 0:
      raise ValueError(
          f"{name} must be a non-negative number, got {value!r}.")
  if numerics.is_concrete(multiplier) and not multiplier >= 0:
    raise ValueError(
        f"multiplier (gamma) must be non-negative, got {multiplier!r}.")
  if (numerics.is_concrete(lag) and numerics.is_concrete(multiplier)
      and not lag + multiplier >= 1):
    raise ValueError(
        "lag + multiplier (rho + gamma) must be at least 1, so that the"
        " weights (rho + gamma s)^-power stay in (0, 1] for every s >= 1; got"
        f" lag={lag!r}, multiplier={multiplier!r}.")
  if numerics.is_concrete(burn_in):
    numerics.check_integer("burn_in", burn_in, 0)
  if numerics.is_concrete(update_every):
    numerics.check_integer("update_every", update_every, 1)


def _round_to_dtype(x):
  """``x`` rounded to its dtype even where XLA keeps excess precision.

  XLA may compute a bf16 ``params + updates`` in float32 and skip the
  rounding inside a fusion; the stored parameters are rounded, so round
  here too (``reduce_precision`` is never elided).
  """
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, info.nexp, info.nmant)
  return x


def _averager(
    ema_power, bias_power, lag, multiplier, burn_in, update_every, dtype,
) -> optax.GradientTransformation:
  """BEMA (``bias_power`` not None) or plain EMA of the iterates."""
  with_bias = bias_power is not None
  name = "bema" if with_bias else "ema"

  def init_fn(params):
    # Fresh buffers (never aliases of params or of each other), so a train
    # step may donate params and opt_state together.
    def copy(p, in_dtype=True):
      p_dtype = jnp.result_type(p)
      return jnp.array(
          p, numerics.moment_dtype(p_dtype, dtype) if in_dtype else p_dtype,
          copy=True)
    count = jnp.zeros([], jnp.int32)
    average = jax.tree.map(lambda p: copy(p, in_dtype=False), params)
    if with_bias:
      return BEMAState(count=count, snapshot=jax.tree.map(copy, params),
                       ema=jax.tree.map(copy, params), average=average)
    return EMAState(count=count, ema=jax.tree.map(copy, params),
                    average=average)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"bcopt.{name} needs params: it averages the iterates theta_t ="
          f" params + updates, so call update(updates, state, params).")
    count = optax.safe_increment(state.count)
    wdtype = numerics.scalar_dtype()
    steps = count - jnp.asarray(burn_in, jnp.int32)  # s = t - tau
    base = (jnp.asarray(lag, wdtype)
            + jnp.asarray(multiplier, wdtype) * steps.astype(wdtype))
    beta = base ** -jnp.asarray(ema_power, wdtype)
    alpha = base ** -jnp.asarray(bias_power, wdtype) if with_bias else None
    refresh = steps % jnp.asarray(update_every, jnp.int32) == 0
    branch = jnp.where(steps <= 0, 0, jnp.where(refresh, 1, 2))

    def iterate(ops):  # theta_t, exactly as optax.apply_updates stores it.
      return jax.tree.map(_round_to_dtype, optax.apply_updates(*ops))

    def reset(ops):  # burn-in (t <= tau): everything restarts at theta_t.
      theta = iterate(ops)
      ema_ = jax.tree.map(lambda m, x: x.astype(m.dtype), state.ema, theta)
      return ema_, ema_, theta

    def refresh_fn(ops):  # s % phi == 0: the EMA and the average move.
      theta = iterate(ops)
      ema_ = jax.tree.map(
          lambda m, x: ((1 - beta) * m + beta * x.astype(m.dtype)
                        ).astype(m.dtype),
          state.ema, theta)
      if with_bias:
        average = jax.tree.map(
            lambda x, x0, m: (alpha * (x.astype(m.dtype) - x0) + m
                              ).astype(x.dtype),
            theta, state.snapshot, ema_)
        return state.snapshot, ema_, average
      average = jax.tree.map(lambda x, m: m.astype(x.dtype), theta, ema_)
      return ema_, ema_, average

    def hold(ops):
      del ops
      snapshot = state.snapshot if with_bias else state.ema
      return snapshot, state.ema, state.average

    snapshot, ema_, average = jax.lax.switch(
        branch, [reset, refresh_fn, hold], (params, updates))
    if with_bias:
      new_state = BEMAState(
          count=count, snapshot=snapshot, ema=ema_, average=average)
    else:
      new_state = EMAState(count=count, ema=ema_, average=average)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def bema(
    ema_power: jax.typing.ArrayLike = 0.5,
    bias_power: jax.typing.ArrayLike = 0.2,
    lag: jax.typing.ArrayLike = 10.0,
    multiplier: jax.typing.ArrayLike = 1.0,
    burn_in: int = 0,
    update_every: int = 1,
    *,
    dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  r"""Bias-corrected exponential moving average (BEMA) of the iterates.

  Passes ``updates`` through unchanged and tracks, in its state, with
  :math:`\theta_t` the parameters after step :math:`t`:

  .. math::

    s = t - \tau, \qquad
    \beta_s = (\rho + \gamma s)^{-\kappa}, \qquad
    \alpha_s = (\rho + \gamma s)^{-\eta}

    \mu^{\mathrm{EMA}} \leftarrow (1 - \beta_s)\,\mu^{\mathrm{EMA}}
        + \beta_s\,\theta_t, \qquad
    \mu^{\mathrm{BEMA}} = \alpha_s\,(\theta_t - \theta_0)
        + \mu^{\mathrm{EMA}}

  with :math:`\kappa` = ``ema_power``, :math:`\eta` = ``bias_power``,
  :math:`\rho` = ``lag``, :math:`\gamma` = ``multiplier``, :math:`\tau` =
  ``burn_in`` and :math:`\phi` = ``update_every`` (the names of the authors'
  code and of TRL's ``BEMACallback``). The time index is pinned as follows:
  during burn-in (:math:`t \le \tau`) the snapshot :math:`\theta_0`, the EMA
  and the average are all reset to :math:`\theta_t`; afterwards the EMA and
  the average are refreshed on the steps with :math:`s \bmod \phi = 0` (the
  weights use :math:`s` itself, not the number of refreshes) and held in
  between. With ``burn_in=0`` the snapshot is the initial parameters and the
  first step has :math:`s = 1`. ``bias_power=0`` gives :math:`\alpha = 1`
  (the average is then :math:`\theta_t - \theta_0 + \mu^{\mathrm{EMA}}`),
  not a plain EMA: use :func:`ema` for that.
  Place it **last** in the chain that produces the final updates: it computes
  :math:`\theta_t` = ``optax.apply_updates(params, updates)`` from the
  ``updates`` it receives, which are the parameters after the step only when
  no later transform rescales them (a learning rate, a weight decay or a
  clip after it would make it average the wrong points; it cannot detect
  this). It returns ``updates`` unchanged, so training is unaffected.
  Read the average with :func:`bema_params` (evaluation parameters; the
  training parameters are never touched).

  Inside wrappers: under ``optax.MultiSteps`` the inner chain's state only
  advances on the real (every ``k``-th) steps, so :math:`t` counts optimizer
  steps, not micro-steps; under ``optax.apply_if_finite`` (or
  :func:`bcopt.apply_if_finite`) a rejected step leaves the state untouched,
  so it neither counts nor moves the average (the parameters do not move
  either). Put ``bema`` inside such wrappers, last in the wrapped chain.

  Args:
    ema_power: :math:`\kappa \ge 0`, the EMA weight's decay power (0 makes
      the EMA the current iterate).
    bias_power: :math:`\eta \ge 0`, the bias-correction weight's decay power.
    lag: :math:`\rho`, the offset of the schedules (a virtual starting age).
    multiplier: :math:`\gamma \ge 0`, the time scale of the schedules;
      ``lag + multiplier`` must be at least 1 so that both weights stay in
      :math:`(0, 1]`. With ``multiplier=0`` the weights are constant.
    burn_in: :math:`\tau \ge 0`, steps during which averaging restarts.
    update_every: :math:`\phi \ge 1`, refresh interval (the authors used 400
      when fine-tuning).
    dtype: dtype of the snapshot and the EMA (default float32, or the
      parameters' dtype if wider; float32 even for bf16 parameters). The
      average itself is kept in each parameter's dtype.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`BEMAState`
    (three parameter-sized trees: snapshot, EMA, average). Its ``update``
    raises a ``ValueError`` when ``params`` is None.

  Raises:
    ValueError: at construction, for a negative power, ``multiplier < 0``,
      ``lag + multiplier < 1``, a negative or fractional ``burn_in`` or an
      ``update_every`` that is not a positive integer.

  Examples:
    >>> import jax.numpy as jnp, optax, bcopt
    >>> tx = optax.chain(optax.sgd(0.1), bcopt.bema())  # bema last
    >>> params = {"w": jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, opt_state = tx.update({"w": -jnp.ones(2)}, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params["w"]
    Array([0.3, 0.3], dtype=float32)
    >>> bcopt.bema_params(opt_state)["w"]  # on a straight path, extrapolates
    Array([0.32003695, 0.32003695], dtype=float32)

  References:
    Block and Zhang, 2025, "EMA Without the Lag: Bias-Corrected Iterate
    Averaging Schemes", arXiv:2508.00180, Algorithm 1.
  """
  _check_hyperparams({"ema_power": ema_power, "bias_power": bias_power},
                     lag, multiplier, burn_in, update_every)
  return _averager(ema_power, bias_power, lag, multiplier, burn_in,
                   update_every, dtype)


def ema(
    ema_power: jax.typing.ArrayLike = 0.5,
    lag: jax.typing.ArrayLike = 10.0,
    multiplier: jax.typing.ArrayLike = 1.0,
    burn_in: int = 0,
    update_every: int = 1,
    *,
    dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  r"""Exponential moving average of the iterates, with BEMA's schedule.

  :func:`bema` without the bias-correction term:

  .. math::

    \beta_s = (\rho + \gamma s)^{-\kappa}, \qquad
    \mu^{\mathrm{EMA}} \leftarrow (1 - \beta_s)\,\mu^{\mathrm{EMA}}
        + \beta_s\,\theta_t

  with the same symbols, time index (:math:`s = t - \tau`), burn-in reset
  and refresh every :math:`\phi` steps as :func:`bema`; the average is
  :math:`\mu^{\mathrm{EMA}}`. ``multiplier=0`` gives a constant weight
  :math:`\rho^{-\kappa}` (e.g. ``ema(1.0, lag=1 / (1 - decay),
  multiplier=0)`` is the classic EMA with ``decay``, started at the initial
  parameters).
  Place it **last** in the chain that produces the final updates: it computes
  :math:`\theta_t` = ``optax.apply_updates(params, updates)`` from the
  ``updates`` it receives, which are the parameters after the step only when
  no later transform rescales them (a learning rate, a weight decay or a
  clip after it would make it average the wrong points; it cannot detect
  this). It returns ``updates`` unchanged, so training is unaffected.
  Read the average with :func:`bema_params`. ``optax.MultiSteps`` and
  ``optax.apply_if_finite`` behave as for :func:`bema`.

  Args:
    ema_power: :math:`\kappa \ge 0`.
    lag: :math:`\rho`.
    multiplier: :math:`\gamma \ge 0`, with ``lag + multiplier >= 1``.
    burn_in: :math:`\tau \ge 0`.
    update_every: :math:`\phi \ge 1`.
    dtype: dtype of the EMA (default float32, or the parameters' dtype if
      wider); the average is also kept in each parameter's dtype.

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`EMAState`
    (two parameter-sized trees: EMA and average).

  Raises:
    ValueError: as for :func:`bema`.

  Examples:
    >>> import jax.numpy as jnp, optax, bcopt
    >>> tx = optax.chain(optax.sgd(0.1), bcopt.ema())
    >>> params = {"w": jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, opt_state = tx.update({"w": -jnp.ones(2)}, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bcopt.bema_params(opt_state)["w"]   # lags behind params (0.3)
    Array([0.1404261, 0.1404261], dtype=float32)

  References:
    Block and Zhang, 2025, arXiv:2508.00180.
  """
  _check_hyperparams({"ema_power": ema_power}, lag, multiplier, burn_in,
                     update_every)
  return _averager(ema_power, None, lag, multiplier, burn_in, update_every,
                   dtype)


def _is_averaging_state(x) -> bool:
  return isinstance(x, (BEMAState, EMAState))


def bema_params(opt_state: PyTree) -> optax.Params:
  """The averaged parameters held by a :func:`bema` or :func:`ema` state.

  Accepts the transform's own state or any optax state tree that contains
  exactly one of them: ``optax.chain`` tuples, ``optax.MultiSteps``,
  ``optax.apply_if_finite``/:func:`bcopt.apply_if_finite`,
  ``optax.inject_hyperparams``, ``optax.multi_transform`` partitions (then
  the parameters of other partitions are ``optax.MaskedNode``), or any
  pytree of these. Pure and jittable.

  Args:
    opt_state: an optimizer state.

  Returns:
    The average, a tree like the parameters and in their dtypes (the EMA
    and snapshot stay in ``dtype``), ready to be used as evaluation
    parameters. Before the first refresh it is the initial parameters (or
    the latest burn-in iterate). For a ``flax.nnx.Optimizer`` pass its
    ``opt_state``; the result is then an ``nnx.State`` of ``OptVariable``
    leaves, and ``nnx.to_pure_dict`` of it fills a parameter state with
    ``replace_by_pure_dict``.

  Raises:
    ValueError: if ``opt_state`` holds no :class:`BEMAState`/
      :class:`EMAState`, or more than one (e.g. ``ema()`` and ``bema()`` in
      the same chain, or one per ``multi_transform`` partition): pass the
      sub-state you want, e.g. ``bema_params(opt_state[2])``, or put a single
      averager after the ``multi_transform``.

  Examples:
    >>> import jax.numpy as jnp, optax, bcopt
    >>> tx = optax.MultiSteps(optax.chain(optax.adam(1e-2), bcopt.bema()), 2)
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> bcopt.bema_params(state)["w"]
    Array([1., 1., 1.], dtype=float32)
  """
  found = [
      (path, x) for path, x in jax.tree_util.tree_leaves_with_path(
          opt_state, is_leaf=_is_averaging_state)
      if _is_averaging_state(x)]
  if not found:
    raise ValueError(
        "bema_params: no bcopt.bema or bcopt.ema state found in opt_state"
        f" (of type {type(opt_state).__name__}); add bcopt.bema() (or"
        " bcopt.ema()) as the last transform of the optimizer chain.")
  if len(found) > 1:
    paths = ", ".join(
        f"opt_state{jax.tree_util.keystr(p)} ({type(x).__name__})"
        for p, x in found)
    raise ValueError(
        f"bema_params: found {len(found)} averaging states, at {paths}; pass"
        " the one you want, e.g. bema_params(opt_state[i]).")
  return found[0][1].average
