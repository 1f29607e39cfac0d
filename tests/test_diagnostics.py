"""The bias monitor (SPEC section 9) against a numpy restatement, a Monte
Carlo noise scale, the named axis, and SOAP's identity with AdamW-BC."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcopt
import reference
from named_axis import AXIS, run_mapped

B1, B2, EPS = 0.9, 0.95, 1e-8
SHAPES = {"a": (5,), "b": (3, 2)}


def _grads(seed, m=8, shift=0.5):
  rng = np.random.default_rng(seed)
  return {k: shift + rng.normal(size=(m,) + s) for k, s in SHAPES.items()}


def _bcopt_diagnostics(scheme, estimator, steps, b):
  tx = bcopt.scale_by_adam_bc(B1, B2, EPS, cross_fit=scheme,
                              inverse_correction=estimator, diagnostics=True)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  for g in steps:
    _, state = jax.jit(tx.update)(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, params)
  return bcopt.microbatch_diagnostics(state, microbatch_size=b)


def _restated(scheme, estimator, steps, b):
  """SPEC 9 on the last step, leaf by leaf and in total, in float64."""
  t = len(steps)
  sums = {k: {} for k in SHAPES}
  for k in SHAPES:
    g_steps = [np.asarray(g[k], np.float64) for g in steps]
    _, (mu, nu) = reference.adam_bc_run(g_steps[:-1] or [0 * g_steps[0]],
                                        B1, B2, EPS, None, None)
    if t == 1:
      mu, nu = 0 * mu, 0 * nu
    g = g_steps[-1]
    numerator = lambda a: (B1 * mu + (1 - B1) * a) / (1 - B1 ** t)
    denominator = lambda s: np.sqrt((B2 * nu + (1 - B2) * s ** 2)
                                    / (1 - B2 ** t)) + EPS
    update = lambda sc, est: reference.cross_fit_update(
        numerator, denominator, g, g, sc, est)
    u, u_plain, u_std = (update(scheme, estimator), update(scheme, None),
                         update(None, None))
    m = len(g)
    gbar = g.mean(axis=0)
    sums[k] = dict(
        trace=((g - gbar) ** 2).sum() / (m - 1), mean_sq=(gbar ** 2).sum(),
        coupling=((u_plain - u_std) ** 2).sum(), standard=(u_std ** 2).sum(),
        jensen=((u - u_plain) ** 2).sum(), uncorrected=(u_plain ** 2).sum())
  m = len(steps[-1]["a"])

  def figures(s):
    signal = s["mean_sq"] - s["trace"] / m
    return {"noise_scale": b * s["trace"] / signal if signal > 0 else np.inf,
            "coupling": np.sqrt(s["coupling"] / s["standard"]),
            "jensen": (np.sqrt(s["jensen"] / s["uncorrected"])
                       if s["uncorrected"] > 0 else 0.0)}
  total = {f: sum(s[f] for s in sums.values()) for f in sums["a"]}
  return {k: figures(s) for k, s in sums.items()}, figures(total)


@pytest.mark.parametrize("scheme,estimator", [
    (None, "jackknife"), ("symmetric", "paper"), ("loo", "jackknife"),
    ("twofold", None)])
def test_matches_numpy_restatement(scheme, estimator):
  steps = [_grads(0), _grads(1)]  # the second step has moments from the first
  got = _bcopt_diagnostics(scheme, estimator, steps, b=4)
  leaves, total = _restated(scheme, estimator, steps, b=4)
  for name in ("noise_scale", "coupling", "jensen"):
    np.testing.assert_allclose(got[name]["total"], total[name], rtol=2e-4,
                               atol=1e-6, err_msg=name)
    for k in SHAPES:
      np.testing.assert_allclose(got[name]["leaves"][k], leaves[k][name],
                                 rtol=2e-4, atol=1e-6, err_msg=f"{name} {k}")
  if scheme is None:
    assert float(got["coupling"]["total"]) == 0.0
  if estimator is None:
    assert float(got["jensen"]["total"]) == 0.0


def test_noise_scale_recovers_a_known_one():
  """Microbatches of b examples with per-example covariance sigma^2 I around
  a true gradient G: B_simple = d sigma^2 / |G|^2. One draw of d = 4000
  coordinates and M = 16: tr S / (d sigma^2 / b) is chi^2 with d (M - 1)
  degrees of freedom over them, a relative standard error of 0.4%; the
  debiased |G|^2 adds less."""
  d, m, b, sigma = 4000, 16, 32, 2.0
  rng = np.random.default_rng(7)
  true_g = rng.normal(size=d) * 0.1
  noise = rng.normal(size=(m, d)) * sigma / np.sqrt(b)
  tx = bcopt.scale_by_adam_bc(diagnostics=True)
  params = {"w": jnp.zeros(d)}
  _, state = tx.update({"w": jnp.asarray(true_g + noise, jnp.float32)},
                       tx.init(params), params)
  got = float(bcopt.microbatch_diagnostics(state, b)["noise_scale"]["total"])
  expected = d * sigma ** 2 / np.sum(true_g ** 2)
  se = expected * np.sqrt(2 / (d * (m - 1)) + 2 * (
      4 * sigma ** 2 / (b * m)) / np.sum(true_g ** 2))
  assert abs(got - expected) < 4 * se, (got, expected, se)


def test_noise_scale_is_inf_without_signal():
  tx = bcopt.scale_by_adam_bc(diagnostics=True)
  params = {"w": jnp.zeros(50)}
  g = jax.random.normal(jax.random.key(0), (8, 50))
  _, state = tx.update({"w": g - g.mean(0)}, tx.init(params), params)
  assert np.isinf(bcopt.microbatch_diagnostics(state)["noise_scale"]["total"])


def test_named_axis_equals_stacked():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _grads(3))
  for scheme in ("loo",):
    make = lambda axis: bcopt.adamw_bc(1e-3, cross_fit=scheme, axis_name=axis,
                                       diagnostics=True)
    tx = make(None)
    state = tx.init(params)
    _, expected = jax.jit(tx.update)(g, state, params)
    named = make(AXIS)
    step = jax.jit(lambda g_, s_, _: named.update(g_, s_, params))
    _, got = run_mapped("shard_map", step, g, state)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scheme", ["loo"])
def test_soap_with_identity_bases_measures_like_adamw_bc(scheme):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _grads(4))
  kw = dict(cross_fit=scheme, diagnostics=True)
  adam = bcopt.scale_by_adam_bc(B1, B2, EPS, **kw)
  soap = bcopt.scale_by_soap_bc(B1, B2, EPS, variance_groups=None, **kw)
  _, a = adam.update(g, adam.init(params), params)  # step 1: Q = I
  _, s = soap.update(g, soap.init(params), params)
  chex.assert_trees_all_close(a.diagnostics, s.diagnostics, rtol=1e-5,
                              atol=1e-8)


def test_state_and_errors():
  params = {"w": jnp.zeros(3)}
  tx = bcopt.adamw_bc(1e-3, diagnostics=True)
  state = tx.init(params)
  assert isinstance(state[0], bcopt.DiagnosticsState)
  plain = bcopt.adamw_bc(1e-3).init(params)
  chex.assert_trees_all_equal(state[0].inner, plain[0])
  with pytest.raises(ValueError, match="found 0 diagnostics states"):
    bcopt.microbatch_diagnostics(plain)


def _shares(u, u_plain, u_std):
  norm = lambda x: np.sqrt(np.sum(np.square(x)))
  return {"coupling": norm(u_plain - u_std) / norm(u_std),
          "jensen": norm(u - u_plain) / norm(u_plain)}


@pytest.mark.parametrize("scheme", ["loo"])
def test_sophia_refresh_step_matches_numpy_restatement(scheme):
  """Step 1 (mu = h = 0) with curvature, and a step without curvature,
  whose cached inverse carries no coupling and no correction."""
  b1, b2, rho, eps, clip = 0.9, 0.99, 0.05, 1e-12, 1.0
  rng = np.random.default_rng(5)
  g = 0.3 + rng.normal(size=(8, 6))
  r = np.abs(1.0 + 0.5 * rng.normal(size=(8, 6)))
  numerator = lambda a: (1 - b1) * a
  denominator = lambda s: rho * (1 - b2) * s + eps
  clipped = lambda n, i: np.clip(n * i, -clip, clip)
  update = lambda sc, est: reference.cross_fit_update(
      numerator, denominator, g, r, sc, est, combine=clipped)
  expected = _shares(update(scheme, "jackknife"), update(scheme, None),
                     update(None, None))
  tx = bcopt.scale_by_sophia_bc(b1, b2, rho, eps, clip, cross_fit=scheme,
                                diagnostics=True)
  params = {"w": jnp.zeros(6)}
  _, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params),
                       params, curvature={"w": jnp.asarray(r, jnp.float32)})
  got = bcopt.microbatch_diagnostics(state)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name]["total"], value, rtol=2e-4,
                               atol=1e-7, err_msg=name)
  _, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
  got = bcopt.microbatch_diagnostics(state)
  assert float(got["coupling"]["total"]) == float(got["jensen"]["total"]) == 0


@pytest.mark.parametrize("scheme", ["symmetric"])
def test_shampoo_root_step_matches_numpy_restatement(scheme):
  """A root step of one (3, 4) matrix (every eigenvalue simple): the shares
  of the restatement's corrected, uncorrected and standard updates."""
  b1, b2, damping, exponent = 0.9, 0.95, 1e-3, 4
  rng = np.random.default_rng(6)
  steps = [0.5 + rng.normal(size=(8, 3, 4))]
  run = lambda sc, est: reference.shampoo_bc_run(
      steps, b1, b2, damping, exponent, 1, sc, est)[0][0]
  expected = _shares(run(scheme, "jackknife"), run(scheme, None),
                     run(None, None))
  tx = bcopt.scale_by_shampoo_bc(b1, b2, damping, cross_fit=scheme,
                                 variance_groups=None, diagnostics=True)
  params = {"w": jnp.zeros((3, 4))}
  _, state = jax.jit(tx.update)({"w": jnp.asarray(steps[0], jnp.float32)},
                                tx.init(params), params)
  got = bcopt.microbatch_diagnostics(state)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name]["total"], value, rtol=1e-3,
                               err_msg=name)
