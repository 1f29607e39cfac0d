"""variance_correct_inverse and the variance estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcopt
from bcopt._src import crossfit, inverse, microbatch


def test_shampoo_coefficient_is_five_thirty_seconds():
  x, v = jnp.array([2.0, 5.0]), jnp.array([0.3, 1.0])
  got = bcopt.variance_correct_inverse(x, v, exponent=4)
  np.testing.assert_allclose(got, x ** -0.25 - 5 / 32 * x ** (-0.25 - 2) * v, rtol=1e-6)


def test_trees_and_bad_exponent():
  tree = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
  out = bcopt.variance_correct_inverse(tree, {"a": jnp.zeros(2), "b": jnp.array(1.0)})
  np.testing.assert_allclose(out["b"], 1 / 4 - 1 / 64)
  with pytest.raises(ValueError, match="exponent"):
    bcopt.variance_correct_inverse(tree, exponent=0)


def test_jackknife_equals_svar_over_n_for_linear_statistics():
  """SPEC 2: for a statistic linear in the microbatches, jackknife = svar/n."""
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  mb = microbatch.Microbatches(6, 6, None)
  identity = lambda t: t
  spread = crossfit.denominator_spread(identity, {"x": s}, {"x": s.mean(0)}, mb, "all", loo=True)
  v = inverse.variance_from_spread(spread, 6, "jackknife", loo=True)["x"]
  np.testing.assert_allclose(v, np.var(np.asarray(s), axis=0, ddof=1) / 6, rtol=1e-5)


def test_jackknife_variance_matches_monte_carlo():
  """Jackknife V of p(gbar) = sqrt(b2 nu + (1-b2) gbar^2)+eps vs a Monte Carlo variance."""
  m, coords, draws = 16, 64, 4000
  rng = np.random.default_rng(1)
  mu_true = rng.uniform(0.2, 1.5, size=coords)
  sigma = rng.uniform(0.5, 2.0, size=coords)  # per-microbatch noise
  nu = rng.uniform(0.1, 1.0, size=coords)
  b2 = 0.9
  denom = lambda s: jax.tree.map(lambda v, x: jnp.sqrt(b2 * v + (1 - b2) * x * x) + 1e-8, {"x": jnp.asarray(nu, jnp.float32)}, s)
  mb = microbatch.Microbatches(m, m, None)

  @jax.jit
  @jax.vmap
  def stats(g):
    gbar = {"x": g.mean(0)}
    spread = crossfit.denominator_spread(denom, {"x": g}, gbar, mb, "all", loo=True)
    v = inverse.variance_from_spread(spread, m, "jackknife", loo=True)["x"]
    return denom(gbar)["x"], v

  g = jnp.asarray(mu_true + sigma * rng.normal(size=(draws, m, coords)), jnp.float32)
  p, v = stats(g)
  mc_var = np.var(np.asarray(p), axis=0, ddof=1)
  mean_jack = np.mean(np.asarray(v), axis=0)
  ratio = mean_jack / mc_var
  # The jackknife is consistent; at M = 16 its bias is a few percent here.
  assert 0.85 < np.median(ratio) < 1.2, np.median(ratio)
  assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio
