"""Cross-fitting for any diagonal preconditioner (docs/algorithms.md).

:func:`cross_fit` combines a numerator and an inverted preconditioner built
from independent microbatch groups, optionally with the variance-corrected
inverse. The caller describes its optimizer by two pure
functions of group means, so the same code serves Adam, Sophia and user
preconditioners (RMSprop, Adagrad, ...).
"""

from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bcopt._src import fusion
from bcopt._src import inverse
from bcopt._src import microbatch
from bcopt._src import numerics

PyTree = Any
Scheme = Optional[Literal["twofold", "symmetric", "loo"]]
SCHEMES = (None, "twofold", "symmetric", "loo")


def check_scheme(cross_fit: Any, allowed=SCHEMES) -> None:
  """Raises a ValueError for an unknown ``cross_fit`` value."""
  if cross_fit not in allowed:
    raise ValueError(f"cross_fit={cross_fit!r} is not one of {allowed}.")


def check_microbatch_count(
    mb: microbatch.Microbatches, scheme: Scheme, estimator: inverse.Estimator
) -> None:
  """Trace-time check that a scheme and estimator can use ``mb.total``."""
  fix = (
      "Stack more microbatch gradients along the leading axis"
      " (jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, microbatches))"
  )
  if scheme is not None and mb.total < 2:
    raise ValueError(
        f"cross_fit={scheme!r} needs at least 2 microbatches, got"
        f" {mb.describe()}. {fix}, or use cross_fit=None."
    )
  if estimator is None:
    return
  if scheme is None and mb.total < 2:
    raise ValueError(
        f"inverse_correction={estimator!r} estimates a variance from"
        " microbatch variability and needs at least 2 microbatches in its"
        f" preconditioner group, got {mb.describe()}. {fix}, or use"
        " inverse_correction=None."
    )
  if scheme in ("twofold", "symmetric") and mb.total < 4:
    raise ValueError(
        f"cross_fit={scheme!r} with inverse_correction={estimator!r} splits"
        f" the microbatches into groups of {mb.total // 2} and"
        f" {mb.total - mb.total // 2} and needs at least 2 in each, so M >= 4;"
        f" got {mb.describe()}. {fix}, use cross_fit='loo', or use"
        " inverse_correction=None."
    )


def _loo_mean(group_mean: PyTree, one: PyTree, n: int) -> PyTree:
  """Mean of a group of ``n`` without one member: ``(n m - x) / (n - 1)``."""
  return jax.tree.map(lambda m, x: (n * m - x) * (1.0 / (n - 1)), group_mean,
                      one)


def denominator_spread(
    denominator_fn: Callable[[PyTree], PyTree],
    stats: PyTree,
    group_mean: PyTree,
    mb: microbatch.Microbatches,
    group: str,
    *,
    loo: bool,
) -> PyTree:
  r"""Spread :math:`S=\sum_{j \in G}(x_j-\bar x)^2` of a group's denominators.

  ``x_j`` is the leave-one-out denominator
  :math:`p((n \bar s_G - s_j)/(n-1))` when ``loo`` and the hypothetical
  per-microbatch denominator :math:`p(s_j)` otherwise. Sums are shifted by
  the group's own denominator :math:`p(\bar s_G)` so the result is accurate
  (and exactly zero for identical microbatches) in float32.

  Args:
    denominator_fn: the preconditioner denominator of a statistic mean.
    stats: microbatched preconditioner statistics.
    group_mean: the group's mean statistic :math:`\bar s_G`.
    mb: the microbatch layout.
    group: ``"all"``, ``"first"`` or ``"second"``.
    loo: leave-one-out values (True) or per-microbatch values (False).

  Returns:
    The spread tree (param-shaped, non-negative).
  """
  n = microbatch.group_size(mb, group)
  center = denominator_fn(group_mean)

  def deviations(s_j):
    s_j = numerics.upcast(s_j)
    x = denominator_fn(_loo_mean(group_mean, s_j, n) if loo else s_j)
    d = jax.tree.map(jnp.subtract, x, center)
    return d, jax.tree.map(jnp.square, d)

  s1, s2 = microbatch.sum_over_microbatches(
      deviations, stats, weights=microbatch.group_weights(mb, group),
      axis_name=mb.axis_name,
  )
  return jax.tree.map(lambda a, b: jnp.maximum(b - a * a / n, 0.0), s1, s2)


class FullBatch(NamedTuple):
  """The full batch's preconditioner statistic, computed once per update.

  A transform that caches the inverse of its persistent, full-batch
  preconditioner (Sophia) needs these values for its state; handing them to
  :func:`cross_fitted` lets the step reuse them where it would compute the
  same thing, so no reduction over the microbatches runs twice (one device
  merges duplicates, a partitioned program keeps both collectives and their
  buffers).
  """

  mean: PyTree  # s_bar: the mean statistic over all M microbatches.
  variance: Optional[PyTree]  # group_variance(..., "all", estimator) with
  #                             its default ``loo``; None without correction.


def group_variance(
    denominator_fn: Callable[[PyTree], PyTree],
    stats: PyTree,
    group_mean: PyTree,
    mb: microbatch.Microbatches,
    group: str,
    estimator: inverse.Estimator,
    *,
    loo: Optional[bool] = None,
    variance_groups: Optional[int] = None,
) -> Optional[PyTree]:
  """The variance :math:`V` of one preconditioner group's denominator.

  Args:
    denominator_fn: the preconditioner denominator of a statistic mean.
    stats: microbatched preconditioner statistics.
    group_mean: the group's mean statistic.
    mb: the microbatch layout.
    group: ``"all"``, ``"first"`` or ``"second"``.
    estimator: ``None``, ``"jackknife"`` or ``"paper"``.
    loo: whether the variance comes from leave-one-out denominators; by
      default those of the jackknife (the ``"paper"`` estimator then uses
      per-microbatch denominators).
    variance_groups: the jackknife's subgroups :math:`K` (the
      delete-a-group jackknife of :func:`grouped_variance`); None (or a
      group of at most ``K``) leaves out one microbatch at a time.

  Returns:
    The param-shaped variance, or None when ``estimator`` is None.
  """
  if estimator is None:
    return None
  loo = estimator == "jackknife" if loo is None else loo
  n = microbatch.group_size(mb, group)
  if estimator == "jackknife" and len(
      microbatch.subgroup_sizes(n, variance_groups)) < n:
    return grouped_variance(denominator_fn, stats, mb, group,
                            variance_groups)
  spread = denominator_spread(
      denominator_fn, stats, group_mean, mb, group, loo=loo)
  return inverse.variance_from_spread(spread, n, estimator, loo=loo)


def group_inverse(
    denominator_fn: Callable[[PyTree], PyTree],
    stats: PyTree,
    group_mean: PyTree,
    mb: microbatch.Microbatches,
    group: str,
    estimator: inverse.Estimator,
    *,
    exponent: float = 1.0,
    loo: Optional[bool] = None,
    variance_groups: Optional[int] = None,
) -> PyTree:
  r"""The (corrected) inverse of one preconditioner group's denominator.

  Args:
    denominator_fn, stats, group_mean, mb, group, estimator, loo: see
      :func:`group_variance`.
    exponent: :math:`e` of :math:`f(p) = p^{-1/e}`.
    variance_groups: see :func:`group_variance`.

  Returns:
    :math:`\tilde f(p(\bar s_G))`, clamped at zero.
  """
  variance = group_variance(denominator_fn, stats, group_mean, mb, group,
                            estimator, loo=loo,
                            variance_groups=variance_groups)
  return inverse.variance_correct_inverse(
      denominator_fn(group_mean), variance, exponent=exponent)


def grouped_variance(
    denominator_fn: Callable[[PyTree], PyTree],
    stats: PyTree,
    mb: microbatch.Microbatches,
    group: str,
    variance_groups: int,
) -> PyTree:
  r"""The delete-a-group jackknife variance of a group's denominator.

  The group's ``n`` microbatches form :math:`K' = \min(K, n)` contiguous
  subgroups of sizes :math:`n_k` (:func:`bcopt._src.microbatch.subgroup_sizes`);
  with :math:`\bar s_{(-k)} = (n \bar s - n_k \bar s_k)/(n - n_k)`,

  .. math::

    V = \frac{K'-1}{K'} \sum_k \big(p(\bar s_{(-k)})
      - \tfrac{1}{K'}\textstyle\sum_{k'} p(\bar s_{(-k')})\big)^2.

  ``denominator_fn`` runs :math:`K'` times on subgroup means, never per
  microbatch: the point when it is costly (SOAP's rotations).
  """
  sizes = microbatch.subgroup_sizes(microbatch.group_size(mb, group),
                                    variance_groups)
  means = microbatch.subgroup_means(stats, mb, group, variance_groups)
  _, left_out = microbatch.leave_subgroup_out(
      [jax.tree.map(lambda x, k=k: x[k], means) for k in range(len(sizes))],
      sizes)
  values = [denominator_fn(x) for x in left_out]
  return inverse.grouped_jackknife_variance(
      jax.tree.map(lambda *v: jnp.stack(v), *values))


def _multiply(numerator: PyTree, inverse_: PyTree) -> PyTree:
  return jax.tree.map(jnp.multiply, numerator, inverse_)


def cross_fit(
    updates: PyTree,
    numerator_fn: Callable[[PyTree], PyTree],
    denominator_fn: Callable[[PyTree], PyTree],
    *,
    cross_fit: Scheme = "loo",
    inverse_correction: inverse.Estimator = "jackknife",
    exponent: float = 1.0,
    stats: Optional[PyTree] = None,
    combine: Optional[Callable[[PyTree, PyTree], PyTree]] = None,
    axis_name: Optional[str] = None,
) -> PyTree:
  r"""A cross-fitted, optionally variance-corrected, diagonal update.

  A preconditioned update is :math:`u = N(a) \cdot f(p(s))` with numerator
  input :math:`a` (a mean gradient), preconditioner statistic :math:`s` and
  :math:`f(p) = p^{-1/e}`. Estimating both from the same microbatches biases
  :math:`u`; the scheme (``cross_fit``) takes them from independent groups:

  .. math::

    \begin{array}{ll}
    \texttt{None}: & N(\bar g)\, \tilde f(p(\bar s)) \\
    \texttt{"twofold"}: & N(\bar g_A)\, \tilde f(p(\bar s_B)) \\
    \texttt{"symmetric"}: & \tfrac12\big[N(\bar g_A)\tilde f(p(\bar s_B))
        + N(\bar g_B)\tilde f(p(\bar s_A))\big] \\
    \texttt{"loo"}: & \tfrac1M \sum_r N(g_r)\, \tilde f(p(\bar s_{-r}))
    \end{array}

  with group A the first :math:`\lfloor M/2 \rfloor` microbatches, B the rest,
  :math:`\bar s_{-r} = (M \bar s - s_r)/(M-1)`, and :math:`\tilde f` the
  :func:`bcopt.variance_correct_inverse` of each group's denominator (clamped
  per fold), whose variance :math:`V` comes from ``inverse_correction``:

  * ``"jackknife"``: :math:`V = \frac{n-1}{n}\sum_j (p_{(-j)} - \bar p)^2`
    over the ``n`` leave-one-out denominators of the group (for LOO these are
    the fold denominators themselves);
  * ``"paper"`` (the reference code): :math:`\mathrm{svar}(p_j)/n` of
    per-microbatch denominators :math:`p_j = p(s_j)`, or
    :math:`\mathrm{svar}_r(p_{(-r)})` for LOO;
  * ``None``: the plain inverse.

  ``numerator_fn`` and ``denominator_fn`` are pure, elementwise functions of
  param-shaped trees (they may close over optimizer state); persistent state
  stays the caller's business and should be updated from the full batch
  (:func:`bcopt.microbatch_mean`). All reductions run over the leading
  microbatch axis and, with ``axis_name``, over the named axis.

  Args:
    updates: microbatched gradients (every leaf ``(M_local,) + shape``): the
      numerator inputs.
    numerator_fn: :math:`N`, a map from a (group) mean gradient tree to the
      numerator tree, e.g. Adam's :math:`\hat m(a)`.
    denominator_fn: :math:`p`, a map from a (group) mean statistic tree to a
      positive denominator tree, e.g. :math:`\sqrt{\hat v(s)} + \epsilon`.
      For Adam-like methods it squares its input.
    cross_fit: the scheme: ``None``, ``"twofold"``, ``"symmetric"`` or
      ``"loo"``.
    inverse_correction: ``None``, ``"jackknife"`` or ``"paper"``.
    exponent: :math:`e` of :math:`f(p) = p^{-1/e}` (1 for a divided update).
    stats: microbatched preconditioner statistics if they differ from
      ``updates`` (Sophia's curvature estimates); defaults to ``updates``.
    combine: how a numerator and an inverse make a fold's update (default:
      elementwise product; Sophia clips it). Applied per fold before folds
      are averaged.
    axis_name: the named microbatch axis, or None.

  Returns:
    The param-shaped update (float32 or higher; cast it to your dtype).

  Raises:
    ValueError: at trace time when there are too few microbatches for the
      scheme or the estimator.

  Examples:
    A bias-corrected RMSprop direction (state ``nu``; decay 0.9):

    >>> import jax, jax.numpy as jnp, bcopt
    >>> nu = {"w": jnp.full((3,), 0.1)}
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 3))}  # M = 8
    >>> u = bcopt.cross_fit(
    ...     grads,
    ...     numerator_fn=lambda g: g,
    ...     denominator_fn=lambda s: jax.tree.map(
    ...         lambda v, x: jnp.sqrt(0.9 * v + 0.1 * x**2) + 1e-8, nu, s),
    ...     cross_fit="loo", inverse_correction="jackknife")
    >>> u["w"].shape
    (3,)

  References:
    Nayak et al., 2026, arXiv:2605.20756.
  """
  check_scheme(cross_fit)
  inverse.check_estimator(inverse_correction)
  mb = microbatch.layout(updates, axis_name)
  if stats is not None:
    stats_mb = microbatch.layout(stats, axis_name)
    if stats_mb.local != mb.local or (
        jax.tree.structure(stats) != jax.tree.structure(updates)):
      raise ValueError(
          "The preconditioner statistics must have the structure and"
          f" microbatch count of the gradients: got {stats_mb.describe()} and"
          f" {jax.tree.structure(stats)} for {mb.describe()} and"
          f" {jax.tree.structure(updates)}."
      )
  check_microbatch_count(mb, cross_fit, inverse_correction)
  return cross_fitted(
      updates, numerator_fn, denominator_fn, mb, scheme=cross_fit,
      inverse_correction=inverse_correction, exponent=exponent, stats=stats,
      combine=combine)


def cross_fitted(
    updates: PyTree,
    numerator_fn: Callable[[PyTree], PyTree],
    denominator_fn: Callable[[PyTree], PyTree],
    mb: microbatch.Microbatches,
    *,
    scheme: Scheme,
    inverse_correction: inverse.Estimator,
    exponent: float = 1.0,
    stats: Optional[PyTree] = None,
    combine: Optional[Callable[[PyTree, PyTree], PyTree]] = None,
    variance_groups: Optional[int] = None,
    full: Optional[FullBatch] = None,
    diagnostics: bool = False,
) -> PyTree:
  """:func:`cross_fit` on inputs already checked against the layout ``mb``.

  The transforms call this after checking their inputs once per update.
  ``variance_groups`` (:func:`group_inverse`) applies to the jackknife of
  the two-fold and standard schemes; the LOO folds are the jackknife's
  leave-one-out values themselves.
  ``full``, when given, holds the full batch's mean statistic and variance
  (:class:`FullBatch`, as :func:`group_variance` computes it by default),
  which are then reused wherever the step needs the same values: the mean
  in the standard and LOO schemes, the variance in the standard scheme and
  in LOO with the jackknife (LOO with ``"paper"`` takes its variance from
  the leave-one-out denominators, which ``"paper"``'s default does not).
  A ``full`` variance must be the one ``variance_groups`` asks for.
  With ``diagnostics`` it returns ``(u, u_uncorrected, u_standard)``: the
  update, the same scheme with the plain inverse, and the standard scheme
  with the plain inverse (what the microbatch diagnostics compare), from
  the same passes over the microbatches.
  """
  combine = _multiply if combine is None else combine
  stats = updates if stats is None else stats
  same_stats = stats is updates
  loo_values = scheme == "loo" or inverse_correction == "jackknife"

  def full_mean() -> PyTree:
    return group_means(stats, "all") if full is None else full.mean

  def full_variance(s_bar: PyTree, loo: bool,
                    groups: Optional[int] = None) -> Optional[PyTree]:
    default_loo = inverse_correction == "jackknife"
    if full is not None and loo == default_loo:
      return full.variance
    return group_variance(denominator_fn, stats, s_bar, mb, "all",
                          inverse_correction, loo=loo,
                          variance_groups=groups)

  # Groups are static slices on a stacked axis, 0/1 weightings on a named
  # one (see microbatch.group).
  def group_means(tree: PyTree, name: str) -> PyTree:
    group = microbatch.group(mb, name)
    return microbatch.mean(group.take(tree), group.layout, group.name)

  def corrected_inverse(name: str, group_mean: PyTree) -> PyTree:
    group = microbatch.group(mb, name)
    return group_inverse(
        denominator_fn, group.take(stats), group_mean, group.layout,
        group.name, inverse_correction, exponent=exponent, loo=loo_values,
        variance_groups=variance_groups)

  def plain(numerator_mean: PyTree, preconditioner_mean: PyTree) -> PyTree:
    return combine(numerator_fn(numerator_mean),
                   inverse.variance_correct_inverse(
                       denominator_fn(preconditioner_mean), exponent=exponent))

  if scheme is None:
    s_bar = full_mean()
    g_bar = s_bar if same_stats else group_means(updates, "all")
    inv = inverse.variance_correct_inverse(
        denominator_fn(s_bar),
        full_variance(s_bar, loo_values, variance_groups), exponent=exponent)
    u = combine(numerator_fn(g_bar), inv)
    if not diagnostics:
      return u
    standard = plain(g_bar, s_bar)  # the standard scheme is this one
    return u, standard, standard

  if scheme in ("twofold", "symmetric"):
    s_a, s_b = group_means(stats, "first"), group_means(stats, "second")
    g_a, g_b = (s_a, s_b) if same_stats else (
        group_means(updates, "first"), group_means(updates, "second"))
    half = lambda x, y: jax.tree.map(lambda a, b: 0.5 * (a + b), x, y)
    if not diagnostics:
      u = combine(numerator_fn(g_a), corrected_inverse("second", s_b))
      if scheme == "symmetric":
        u = half(u, combine(numerator_fn(g_b),
                            corrected_inverse("first", s_a)))
      return u
    # The update and its plain version from one kernel, as the real and
    # imaginary parts of one complex tree (fusion.packed).
    def both(g, s, name):
      return fusion.packed(
          combine(numerator_fn(g), corrected_inverse(name, s)), plain(g, s))
    pairs = both(g_a, s_b, "second")
    if scheme == "symmetric":
      pairs = jax.tree.map(jnp.add, pairs, both(g_b, s_a, "first"))
    u, u_plain = fusion.apart(fusion.unpacked, pairs)
    if scheme == "symmetric":
      u, u_plain = (jax.tree.map(lambda x: 0.5 * x, t) for t in (u, u_plain))
    n_a, m = microbatch.group_size(mb, "first"), mb.total
    whole = lambda a, b: jax.tree.map(
        lambda x, y: (n_a * x + (m - n_a) * y) / m, a, b)
    s_bar = whole(s_a, s_b) if full is None else full.mean
    return u, u_plain, plain(s_bar if same_stats else whole(g_a, g_b), s_bar)

  # Leave-one-out: fold r has numerator g_r and preconditioner "all but r";
  # the jackknife/paper variance is the spread of the fold denominators.
  m = mb.total
  s_bar = full_mean()
  variance = full_variance(s_bar, loo=True)

  def fold(g_r, s_r):
    p = denominator_fn(_loo_mean(s_bar, numerics.upcast(s_r), m))
    numerator = numerator_fn(numerics.upcast(g_r))
    return combine(numerator, inverse.variance_correct_inverse(
        p, variance, exponent=exponent))

  if not diagnostics:
    total = microbatch.sum_over_microbatches(
        fold, updates, stats, axis_name=mb.axis_name)
    return jax.tree.map(lambda x: x / m, total)

  # The corrected and the plain folds from one kernel: their sums are the
  # parts of one complex tree (fusion.packed), split apart afterwards.
  def fold_pair(g_r, s_r):
    p = denominator_fn(_loo_mean(s_bar, numerics.upcast(s_r), m))
    numerator = numerator_fn(numerics.upcast(g_r))
    return (combine(numerator, inverse.variance_correct_inverse(
        p, variance, exponent=exponent)),
            combine(numerator, inverse.variance_correct_inverse(
                p, exponent=exponent)))

  total = fusion.packed(*microbatch.sum_over_microbatches(
      fold_pair, updates, stats, axis_name=mb.axis_name))
  u, u_plain = fusion.apart(
      lambda t: jax.tree.map(lambda x: x / m, fusion.unpacked(t)), total)
  g_bar = s_bar if same_stats else group_means(updates, "all")
  return u, u_plain, plain(g_bar, s_bar)
