"""AdamW-BC against the numpy restatement of SPEC sections 1-3."""

import itertools

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
B1, B2, EPS = 0.9, 0.95, 1e-8


def _grad_steps(seed, steps, m, shape, mean=1.0, noise=0.7):
  rng = np.random.default_rng(seed)
  signal = rng.normal(size=shape) * mean
  return [signal + noise * rng.normal(size=(m,) + shape) for _ in range(steps)]


def _run_bcopt(tx, grad_steps, shape):
  params = {"w": jnp.zeros(shape, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in grad_steps:
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    outs.append(np.asarray(u["w"]))
  return outs, state


@pytest.mark.parametrize("scheme,estimator",
                         list(itertools.product(SCHEMES, ESTIMATORS)))
def test_matches_numpy_restatement(scheme, estimator):
  shape = (5, 3)
  steps = _grad_steps(0, 4, 8, shape)
  expected, (mu, nu) = reference.adam_bc_run(steps, B1, B2, EPS, scheme,
                                             estimator)
  tx = bcopt.scale_by_adam_bc(B1, B2, EPS, cross_fit=scheme,
                              inverse_correction=estimator)
  got, state = _run_bcopt(tx, steps, shape)
  for t, (g, e) in enumerate(zip(got, expected)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5,
                               err_msg=f"step {t + 1}")
  np.testing.assert_allclose(state.mu["w"], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.nu["w"], nu, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 4


@pytest.mark.parametrize("m", [5, 7])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_odd_microbatch_counts(m, scheme):
  steps = _grad_steps(1, 2, m, (6,))
  for estimator in ESTIMATORS:
    expected, _ = reference.adam_bc_run(steps, B1, B2, EPS, scheme, estimator)
    tx = bcopt.scale_by_adam_bc(B1, B2, EPS, cross_fit=scheme,
                                inverse_correction=estimator)
    got, _ = _run_bcopt(tx, steps, (6,))
    np.testing.assert_allclose(got[-1], expected[-1], rtol=2e-4, atol=2e-5)


def test_heavy_noise_engages_clamp():
  """Noise >> signal: many corrected inverses clamp at zero; still exact."""
  steps = _grad_steps(2, 3, 8, (40,), mean=0.05, noise=2.0)
  for scheme, estimator in [(None, "jackknife"), ("loo", "jackknife"),
                            ("twofold", "paper"), ("loo", "paper")]:
    expected, _ = reference.adam_bc_run(steps, B1, B2, EPS, scheme, estimator)
    tx = bcopt.scale_by_adam_bc(B1, B2, EPS, cross_fit=scheme,
                                inverse_correction=estimator)
    got, _ = _run_bcopt(tx, steps, (40,))
    assert np.mean(expected[-1] == 0) >= 0.02 or scheme == "loo"
    np.testing.assert_allclose(got[-1], expected[-1], rtol=5e-4, atol=5e-5)


def test_adamw_bc_standard_equals_optax_adamw():
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(4)}
  tx = bcopt.adamw_bc(3e-3, b1=0.8, b2=0.9, weight_decay=0.1, cross_fit=None,
                      inverse_correction=None)
  ref = optax.adamw(3e-3, b1=0.8, b2=0.9, weight_decay=0.1)
  s, r = tx.init(params), ref.init(params)
  p_bc, p_ref = params, params
  rng = np.random.default_rng(3)
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  for _ in range(5):
    g = jax.tree.map(lambda x: jnp.asarray(
        rng.normal(size=(4,) + x.shape), jnp.float32), params)
    u, s = update(g, s, p_bc)
    v, r = ref_update(jax.tree.map(lambda x: x.mean(0), g), r, p_ref)
    p_bc, p_ref = optax.apply_updates(p_bc, u), optax.apply_updates(p_ref, v)
    chex.assert_trees_all_close(u, v, rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(p_bc, p_ref, rtol=1e-5)


@pytest.mark.parametrize("scheme", [None, "twofold"])
def test_correction_never_flips_or_enlarges_single_fold(scheme):
  steps = _grad_steps(5, 3, 8, (200,), mean=0.3, noise=1.0)
  plain = bcopt.scale_by_adam_bc(cross_fit=scheme, inverse_correction=None)
  for estimator in ["jackknife", "paper"]:
    corr = bcopt.scale_by_adam_bc(cross_fit=scheme,
                                  inverse_correction=estimator)
    u_plain, _ = _run_bcopt(plain, steps, (200,))
    u_corr, _ = _run_bcopt(corr, steps, (200,))
    for a, b in zip(u_plain, u_corr):
      assert np.all(a * b >= 0)
      assert np.all(np.abs(b) <= np.abs(a) * (1 + 1e-6))
      assert np.any(np.abs(b) < np.abs(a) * 0.999)  # it does shrink


def test_bf16_params_keep_float32_moments():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  tx = bcopt.adamw_bc(1e-2)
  state = tx.init(params)
  adam_state = state[0]
  assert adam_state.mu["w"].dtype == jnp.float32
  assert adam_state.nu["w"].dtype == jnp.float32
  g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 2)),
                        jnp.bfloat16)}
  u, state = jax.jit(tx.update)(g, state, params)
  assert u["w"].dtype == jnp.bfloat16
  assert state[0].mu["w"].dtype == jnp.float32
  chex.assert_tree_all_finite(u)
  # explicit dtypes are honoured
  tx16 = bcopt.scale_by_adam_bc(mu_dtype=jnp.bfloat16)
  assert tx16.init(params).mu["w"].dtype == jnp.bfloat16


def test_state_is_scale_by_adam_sized():
  params = {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}
  bc = bcopt.scale_by_adam_bc().init(params)
  ref = optax.scale_by_adam().init(params)
  size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  assert size(bc) == size(ref)
  assert len(bc) == 3


def test_jit_equals_eager_and_no_retracing():
  params = {"w": jnp.zeros((4, 3))}
  tx = bcopt.scale_by_adam_bc()
  steps = _grad_steps(6, 2, 8, (4, 3))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, state):
    return tx.update(g, state, params)

  s_jit = s_eager = tx.init(params)
  for g in steps:
    g = {"w": jnp.asarray(g, jnp.float32)}
    u_jit, s_jit = step(g, s_jit)
    u_eager, s_eager = tx.update(g, s_eager, params)
    chex.assert_trees_all_close(u_jit, u_eager, rtol=1e-5, atol=1e-7)
  chex.clear_trace_counter()


class TestBadInput:

  def test_unknown_options_at_construction(self):
    with pytest.raises(ValueError, match="cross_fit='leave-one-out'.*loo"):
      bcopt.scale_by_adam_bc(cross_fit="leave-one-out")
    with pytest.raises(ValueError, match="inverse_correction='delta'.*jackknife"):
      bcopt.adamw_bc(1e-3, inverse_correction="delta")

  @pytest.mark.parametrize("scheme", ["twofold", "symmetric", "loo"])
  def test_cross_fit_needs_two_microbatches(self, scheme):
    tx = bcopt.scale_by_adam_bc(cross_fit=scheme, inverse_correction=None)
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="at least 2 microbatches.*M=1"):
      tx.update({"w": jnp.ones((1, 3))}, tx.init(params), params)

  def test_standard_correction_needs_two(self):
    tx = bcopt.scale_by_adam_bc(cross_fit=None)
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="inverse_correction=None"):
      tx.update({"w": jnp.ones((1, 3))}, tx.init(params), params)

  @pytest.mark.parametrize("scheme", ["twofold", "symmetric"])
  @pytest.mark.parametrize("m", [2, 3])
  def test_split_with_correction_needs_four(self, scheme, m):
    tx = bcopt.scale_by_adam_bc(cross_fit=scheme, inverse_correction="paper")
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="M >= 4"):
      tx.update({"w": jnp.ones((m, 3))}, tx.init(params), params)
    ok = bcopt.scale_by_adam_bc(cross_fit=scheme, inverse_correction=None)
    ok.update({"w": jnp.ones((m, 3))}, ok.init(params), params)

  def test_missing_microbatch_axis_with_params(self):
    tx = bcopt.adamw_bc(1e-3)
    params = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match="microbatch axis|microbatched"):
      tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params)

  def test_mismatched_leading_axes(self):
    tx = bcopt.scale_by_adam_bc()
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="share one microbatch axis"):
      tx.update({"a": jnp.ones((4, 3)), "b": jnp.ones((5, 2))},
                tx.init(params))
