"""An independent numpy restatement of shared/SPEC.md sections 1-5a and 8.

Written from the SPEC text with explicit loops over microbatches, in float64,
sharing no code with bcopt. Tests compare bcopt against it.
"""

import numpy as np


def corrected_inverse(p, variance=None, exponent=1.0):
  """SPEC section 2: f(p) - 0.5 f''(p) V, clamped at 0, f(x) = x^(-1/e)."""
  a = 1.0 / exponent
  f = p ** (-a)
  if variance is None:
    return f
  second_derivative = a * (a + 1.0) * p ** (-a - 2.0)
  return np.maximum(f - 0.5 * second_derivative * variance, 0.0)


def subgroups(n, groups):
  """SPEC 5a: index arrays of min(groups, n) contiguous subgroups of sizes
  differing by at most one, larger first (None: n subgroups of one)."""
  k = n if groups is None else min(groups, n)
  sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
  return np.split(np.arange(n), np.cumsum(sizes)[:-1])


def group_variance(denominator, stats, estimator, *, loo_scheme=False,
                   groups=None):
  """Variance of a group's denominator from its microbatches (SPEC 2; the
  jackknife leaves out `groups` subgroups as in SPEC 5a)."""
  n = len(stats)
  if estimator == "jackknife" and not loo_scheme:
    parts = subgroups(n, groups)
    values = np.stack([denominator(np.delete(stats, part, axis=0).mean(axis=0))
                       for part in parts])
    k = len(parts)
    return (k - 1) / k * ((values - values.mean(axis=0)) ** 2).sum(axis=0)
  if estimator == "jackknife" or loo_scheme:
    values = np.stack([
        denominator(np.delete(stats, j, axis=0).mean(axis=0))
        for j in range(n)])
  else:  # "paper", per-microbatch hypothetical denominators
    values = np.stack([denominator(stats[j]) for j in range(n)])
  if estimator == "jackknife":
    return (n - 1) / n * ((values - values.mean(axis=0)) ** 2).sum(axis=0)
  if loo_scheme:  # paper LOO: svar of the fold denominators
    return values.var(axis=0, ddof=1)
  return values.var(axis=0, ddof=1) / n


def cross_fit_update(numerator, denominator, grads, stats, scheme, estimator,
                     exponent=1.0, combine=np.multiply, groups=None):
  """SPEC section 1 table, with the corrected inverse of section 2 (the
  jackknife of a group leaving out `groups` subgroups, section 5a)."""
  m = len(grads)

  def inverse_of(group_stats):
    p = denominator(group_stats.mean(axis=0))
    v = None if estimator is None else group_variance(
        denominator, group_stats, estimator, groups=groups)
    return corrected_inverse(p, v, exponent)

  if scheme is None:
    return combine(numerator(grads.mean(axis=0)), inverse_of(stats))
  a, b = slice(0, m // 2), slice(m // 2, m)
  if scheme == "twofold":
    return combine(numerator(grads[a].mean(axis=0)), inverse_of(stats[b]))
  if scheme == "symmetric":
    return 0.5 * (
        combine(numerator(grads[a].mean(axis=0)), inverse_of(stats[b]))
        + combine(numerator(grads[b].mean(axis=0)), inverse_of(stats[a])))
  assert scheme == "loo"
  v = None if estimator is None else group_variance(
      denominator, stats, estimator, loo_scheme=True)
  folds = [
      combine(numerator(grads[r]),
              corrected_inverse(
                  denominator(np.delete(stats, r, axis=0).mean(axis=0)), v,
                  exponent))
      for r in range(m)]
  return np.mean(folds, axis=0)


def adam_bc_run(grad_steps, b1, b2, eps, scheme, estimator):
  """SPEC section 3 over several steps; grad_steps: list of (M, ...) arrays.

  Returns the list of updates and the final (mu, nu).
  """
  mu = np.zeros(grad_steps[0].shape[1:])
  nu = np.zeros_like(mu)
  outputs = []
  for t, g in enumerate(grad_steps, start=1):
    g = np.asarray(g, np.float64)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    numerator = lambda a, mu=mu, bc1=bc1: (b1 * mu + (1 - b1) * a) / bc1
    denominator = lambda s, nu=nu, bc2=bc2: np.sqrt(
        np.maximum(0.0, (b2 * nu + (1 - b2) * s ** 2) / bc2)) + eps
    outputs.append(cross_fit_update(numerator, denominator, g, g, scheme,
                                    estimator))
    gbar = g.mean(axis=0)
    mu = b1 * mu + (1 - b1) * gbar
    nu = b2 * nu + (1 - b2) * gbar ** 2
  return outputs, (mu, nu)


def sophia_bc_run(grad_steps, curvature_steps, b1, b2, rho, eps, clip, scheme,
                  estimator):
  """SPEC section 4 over several steps.

  curvature_steps[t] is an (M, ...) array on refresh steps, None otherwise.
  Returns the list of updates and the final (mu, h, inv).
  """
  mu = np.zeros(grad_steps[0].shape[1:])
  h = np.zeros_like(mu)
  inv = np.full_like(mu, 1.0 / eps)
  clipped = lambda n, i: np.clip(n * i, -clip, clip)
  outputs = []
  for g, r in zip(grad_steps, curvature_steps):
    g = np.asarray(g, np.float64)
    gbar = g.mean(axis=0)
    numerator = lambda a, mu=mu: b1 * mu + (1 - b1) * a
    if r is None:
      outputs.append(clipped(numerator(gbar), inv))
    else:
      r = np.asarray(r, np.float64)
      denominator = lambda s, h=h: rho * (b2 * h + (1 - b2) * s) + eps
      outputs.append(cross_fit_update(numerator, denominator, g, r, scheme,
                                      estimator, combine=clipped))
      p = denominator(r.mean(axis=0))
      v = None if estimator is None else group_variance(denominator, r,
                                                        estimator)
      inv = corrected_inverse(p, v)
      h = b2 * h + (1 - b2) * r.mean(axis=0)
    mu = b1 * mu + (1 - b1) * gbar
  return outputs, (mu, h, inv)


def shampoo_bc_run(grad_steps, b1, b2, damping, exponent, every, scheme,
                   estimator, groups=None):
  """SPEC section 5 (5a with `groups`) for one matrix over several steps,
  unblocked.

  grad_steps: list of (M, d1, d2) arrays. The eigenvalue variance is
  computed the explicit way: each leave-one-out (jackknife) or
  per-microbatch ("paper") factor is formed as a d x d matrix and
  projected on the eigenbasis. Returns the list of updates and the final
  (mom, L, R, PL, PR).
  """
  d1, d2 = grad_steps[0].shape[1:]
  mom, left, right = np.zeros((d1, d2)), np.zeros((d1, d1)), np.zeros((d2, d2))
  left_root, right_root = np.eye(d1), np.eye(d2)
  outer = (lambda x: x @ x.T, lambda x: x.T @ x)

  def roots(factors, group):
    """Candidate corrected roots of `factors` updated with `group`'s mean."""
    out = []
    for factor, stat in zip(factors, outer):
      candidate = lambda x, f=factor, s=stat: (
          b2 * f + (1 - b2) * s(x) + damping * np.eye(len(f)))
      l, q = np.linalg.eigh(candidate(group.mean(axis=0)))
      l = np.maximum(l, damping)
      v = None
      if estimator is not None:
        eig = lambda x, q=q, c=candidate: np.diag(q.T @ c(x) @ q)
        v = group_variance(eig, group, estimator, groups=groups)
      out.append(q @ np.diag(corrected_inverse(l, v, exponent)) @ q.T)
    return out

  outputs = []
  for t, g in enumerate(grad_steps, start=1):
    g = np.asarray(g, np.float64)
    m = len(g)
    gbar = g.mean(axis=0)
    mom_c = lambda a: b1 * mom + (1 - b1) * a
    if (t - 1) % every == 0:
      a, b = g[: m // 2], g[m // 2:]
      if scheme is None:
        pl, pr = roots((left, right), g)
        u = pl @ mom_c(gbar) @ pr
      else:
        pl, pr = roots((left, right), b)
        u = pl @ mom_c(a.mean(axis=0)) @ pr
        if scheme == "symmetric":
          pl, pr = roots((left, right), a)
          u = 0.5 * (u + pl @ mom_c(b.mean(axis=0)) @ pr)
      left_root, right_root = roots((left, right), g)
      left = b2 * left + (1 - b2) * gbar @ gbar.T
      right = b2 * right + (1 - b2) * gbar.T @ gbar
    else:
      u = left_root @ mom_c(gbar) @ right_root
    outputs.append(u)
    mom = b1 * mom + (1 - b1) * gbar
  return outputs, (mom, left, right, left_root, right_root)


def soap_bc_run(grad_steps, b1, b2, eps, shampoo_b2, damping, every, scheme,
                estimator, groups=None):
  """SPEC section 8 for one unblocked matrix over several steps.

  Each step is section 3's AdamW-BC update on the rotated microbatch
  gradients Q_L^T g_j Q_R (with mu rotated), rotated back; the bases are
  the eigenvectors of L + damping I and R + damping I, refreshed after
  steps 1, every, 2 every, ... Returns the list of updates and the final
  (mu, nu, L, R).
  """
  d1, d2 = grad_steps[0].shape[1:]
  mu, nu = np.zeros((d1, d2)), np.zeros((d1, d2))
  left, right = np.zeros((d1, d1)), np.zeros((d2, d2))
  q_l, q_r = np.eye(d1), np.eye(d2)
  outputs = []
  for t, g in enumerate(grad_steps, start=1):
    g = np.asarray(g, np.float64)
    rot = lambda x, q_l=q_l, q_r=q_r: q_l.T @ x @ q_r
    rotated = np.stack([rot(x) for x in g])
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    numerator = lambda a, m=rot(mu), bc1=bc1: (b1 * m + (1 - b1) * a) / bc1
    denominator = lambda s, nu=nu, bc2=bc2: np.sqrt(
        np.maximum(0.0, (b2 * nu + (1 - b2) * s ** 2) / bc2)) + eps
    u = cross_fit_update(numerator, denominator, rotated, rotated, scheme,
                         estimator, groups=groups)
    outputs.append(q_l @ u @ q_r.T)
    gbar = g.mean(axis=0)
    mu = b1 * mu + (1 - b1) * gbar
    nu = b2 * nu + (1 - b2) * rot(gbar) ** 2
    left = shampoo_b2 * left + (1 - shampoo_b2) * gbar @ gbar.T
    right = shampoo_b2 * right + (1 - shampoo_b2) * gbar.T @ gbar
    if t == 1 or t % every == 0:
      q_l = np.linalg.eigh(left + damping * np.eye(d1))[1]
      q_r = np.linalg.eigh(right + damping * np.eye(d2))[1]
  return outputs, (mu, nu, left, right)
