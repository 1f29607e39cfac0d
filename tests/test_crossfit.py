"""cross_fit as a public building block for user preconditioners."""

import itertools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt
import reference

SCHEMES = [None, "twofold", "symmetric", "loo"]
ESTIMATORS = [None, "jackknife", "paper"]


class MyAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def my_adam_bc(b1, b2, eps, *, scheme, estimator):
  """scale_by_adam_bc rebuilt from public blocks only (as a user would)."""

  def init(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return MyAdamState(jnp.zeros([], jnp.int32), z, z)

  def update(grads, state, params=None):
    t = state.count + 1
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    num = lambda a: jax.tree.map(lambda m, x: (b1 * m + (1 - b1) * x) / bc1, state.mu, a)
    den = lambda s: jax.tree.map(lambda v, x: jnp.sqrt((b2 * v + (1 - b2) * x**2) / bc2) + eps, state.nu, s)
    u = bcopt.cross_fit(grads, num, den, cross_fit=scheme, inverse_correction=estimator)
    g = bcopt.microbatch_mean(grads)
    mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, g)
    nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x**2, state.nu, g)
    return u, MyAdamState(t, mu, nu)

  return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("scheme,estimator", list(itertools.product(SCHEMES, ESTIMATORS)))
def test_rebuilt_adam_equals_scale_by_adam_bc(scheme, estimator):
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  rng = np.random.default_rng(0)
  ours = bcopt.scale_by_adam_bc(0.9, 0.95, 1e-8, cross_fit=scheme, inverse_correction=estimator)
  mine = my_adam_bc(0.9, 0.95, 1e-8, scheme=scheme, estimator=estimator)
  s1, s2 = ours.init(params), mine.init(params)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(0.3 + rng.normal(size=(8,) + p.shape), jnp.float32), params)
    u1, s1 = jax.jit(ours.update)(g, s1, params)
    u2, s2 = jax.jit(mine.update)(g, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(tuple(s1), tuple(s2), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scheme,estimator", list(itertools.product(SCHEMES, ESTIMATORS)))
def test_separate_statistics_and_combine_match_numpy(scheme, estimator):
  """Sophia-like use: statistics differ from gradients, folds are clipped."""
  rng = np.random.default_rng(1)
  m, n = 8, 30
  g = rng.normal(size=(m, n)) + 0.2
  r = np.abs(rng.normal(size=(m, n))) + 0.1  # curvature estimates
  h = rng.uniform(0.1, 1.0, size=n)
  mom = rng.normal(size=n) * 0.1
  b1, b2, rho, eps, clip = 0.9, 0.99, 0.05, 1e-12, 1.0
  num = lambda a: b1 * mom + (1 - b1) * a
  den = lambda s: rho * (b2 * h + (1 - b2) * s) + eps
  expected = reference.cross_fit_update(num, den, g, r, scheme, estimator,
                                        combine=lambda x, y: np.clip(x * y, -clip, clip))
  got = bcopt.cross_fit(
      {"x": jnp.asarray(g, jnp.float32)},
      lambda a: jax.tree.map(lambda x: b1 * jnp.asarray(mom, jnp.float32) + (1 - b1) * x, a),
      lambda s: jax.tree.map(lambda x: rho * (b2 * jnp.asarray(h, jnp.float32) + (1 - b2) * x) + eps, s),
      stats={"x": jnp.asarray(r, jnp.float32)},
      combine=lambda a, b: jax.tree.map(lambda x, y: jnp.clip(x * y, -clip, clip), a, b),
      cross_fit=scheme, inverse_correction=estimator)
  np.testing.assert_allclose(got["x"], expected, rtol=1e-4, atol=1e-5)


def test_statistics_must_match_gradients():
  g = {"x": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match="structure and microbatch count"):
    bcopt.cross_fit(g, lambda a: a, lambda s: s, stats={"x": jnp.ones((3, 3))})


def test_unknown_scheme():
  with pytest.raises(ValueError, match="'fourfold' is not one of"):
    bcopt.cross_fit({"x": jnp.ones((4, 3))}, lambda a: a, lambda s: s, cross_fit="fourfold")
