"""Sophia-G-BC against the numpy restatement of SPEC section 4."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import bcopt
import reference
from named_axis import AXIS, run_mapped

SCHEMES = [None, "twofold", "symmetric", "loo"]
ESTIMATORS = [None, "jackknife", "paper"]
B1, B2, RHO, EPS, CLIP = 0.9, 0.9, 0.05, 1e-12, 1.0
REFRESH = [True, False, False, True, False]  # refresh and cached steps mixed


def _data(seed, m=8, shape=(5, 3), steps=5):
  rng = np.random.default_rng(seed)
  signal = rng.normal(size=shape) * 0.05
  grads = [signal + 0.05 * rng.normal(size=(m,) + shape) for _ in range(steps)]
  curv = [np.abs(1.0 + rng.normal(size=(m,) + shape)) if refresh else None
          for refresh in REFRESH[:steps]]
  return grads, curv


def _run(tx, grads, curv, params):
  state = tx.init(params)
  step = jax.jit(lambda g, s, c: tx.update(g, s, params, curvature=c))
  outs = []
  for g, r in zip(grads, curv):
    wrap = lambda x: None if x is None else {"w": jnp.asarray(x, jnp.float32)}
    u, state = step(wrap(g), state, wrap(r))
    outs.append(np.asarray(u["w"]))
  return outs, state


@pytest.mark.parametrize("scheme,estimator",
                         list(itertools.product(SCHEMES, ESTIMATORS)))
def test_matches_numpy_restatement(scheme, estimator):
  grads, curv = _data(0)
  params = {"w": jnp.zeros((5, 3))}
  expected, (mu, h, inv) = reference.sophia_bc_run(
      grads, curv, B1, B2, RHO, EPS, CLIP, scheme, estimator)
  tx = bcopt.scale_by_sophia_bc(B1, B2, RHO, EPS, CLIP, cross_fit=scheme,
                                inverse_correction=estimator)
  got, state = _run(tx, grads, curv, params)
  for t, (a, b) in enumerate(zip(got, expected)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=f"step {t}")
  np.testing.assert_allclose(state.mu["w"], mu, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(state.h["w"], h, rtol=1e-5)
  np.testing.assert_allclose(state.inv["w"], inv, rtol=1e-4)


def test_cached_inverse_starts_at_one_over_eps_sign_like():
  tx = bcopt.scale_by_sophia_bc(b1=0.5)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  np.testing.assert_array_equal(state.inv["w"], np.full(4, 1e12, np.float32))
  g = {"w": jnp.array([[1e-3, -2e-4, 5.0, -1e-6]] * 4)}
  u, _ = tx.update(g, state, params)
  np.testing.assert_allclose(u["w"], [1, -1, 1, -1])


def test_loo_clips_each_fold_before_averaging():
  """Folds whose unclipped updates are 3 and -1 average to 0, not 1."""
  params = {"w": jnp.zeros(1)}
  tx = bcopt.scale_by_sophia_bc(b1=0.0, b2=0.0, rho=1.0, eps=1e-12, clip=1.0,
                                cross_fit="loo", inverse_correction=None)
  g = {"w": jnp.array([[3.0], [-1.0]])}
  r = {"w": jnp.array([[1.0], [1.0]])}  # every fold's denominator is 1
  u, _ = tx.update(g, tx.init(params), params, curvature=r)
  np.testing.assert_allclose(u["w"], [0.0], atol=1e-7)
  expected, _ = reference.sophia_bc_run([np.array([[3.0], [-1.0]])],
                                        [np.ones((2, 1))], 0.0, 0.0, 1.0,
                                        1e-12, 1.0, "loo", None)
  np.testing.assert_allclose(u["w"], expected[0], atol=1e-7)


def test_official_sophia_rule_with_one_microbatch():
  lr, h0 = 0.1, 0.5
  tx = bcopt.sophia_bc(lr, b1=0.9, b2=0.99, rho=0.04, eps=1e-12,
                       weight_decay=0.0, cross_fit=None, inverse_correction=None)
  params = {"w": jnp.zeros(5)}
  state = tx.init(params)
  rng = np.random.default_rng(1)
  m, h = np.zeros(5), np.zeros(5)
  for t in range(6):
    g = rng.normal(size=5) * 0.05
    r = np.abs(rng.normal(size=5)) + h0 if t % 3 == 0 else None
    u, state = tx.update(
        {"w": jnp.asarray(g[None], jnp.float32)}, state, params,
        curvature=None if r is None else {"w": jnp.asarray(r[None], jnp.float32)})
    m = 0.9 * m + 0.1 * g
    if r is not None:
      h = 0.99 * h + 0.01 * r
    expected = -lr * np.sign(m) * np.minimum(np.abs(m) / (0.04 * h + 1e-12), 1)
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-9)


def test_agrees_with_optax_contrib_sophia_where_definitions_meet():
  """b1 = 0 (no momentum, so no bias correction), gamma = rho, same h fed in.

  optax refreshes h at the end of step 1 and uses it from step 2 on; bcopt
  refreshes on step 1 with that estimate: steps 2..k must agree.
  """
  rho, b2, k = 0.05, 0.9, 5
  r = jnp.asarray(np.random.default_rng(2).uniform(0.5, 2.0, size=6), jnp.float32)

  fixed_estimate = optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None, **kw: (r, state))
  ref = contrib.sophia(0.1, b1=0.0, b2=b2, eps=1e-12, weight_decay=0.0,
                       gamma=rho, update_interval=k,
                       hessian_diagonal_fn=fixed_estimate)
  ours = bcopt.sophia_bc(0.1, b1=0.0, b2=b2, rho=rho, eps=1e-12,
                         weight_decay=0.0, cross_fit=None,
                         inverse_correction=None)
  params = r * 0
  s_ref, s_ours = ref.init(params), ours.init(params)
  rng = np.random.default_rng(3)
  for t in range(1, k + 1):
    g = jnp.asarray(rng.normal(size=6) * 0.01, jnp.float32)
    u_ref, s_ref = ref.update(g, s_ref, params)
    u_ours, s_ours = ours.update(g[None], s_ours, params,
                                 curvature=r[None] if t == 1 else None)
    if t > 1:
      np.testing.assert_allclose(u_ours, u_ref, rtol=1e-5)


def test_no_retracing_beyond_two_compiled_steps():
  params = {"w": jnp.zeros((3, 2))}
  tx = bcopt.scale_by_sophia_bc()
  grads, curv = _data(4, shape=(3, 2), steps=5)

  @jax.jit
  @chex.assert_max_traces(n=2)
  def step(g, s, c):
    return tx.update(g, s, params, curvature=c)

  state = tx.init(params)
  for i in range(10):
    g, r = grads[i % 5], curv[i % 5]
    _, state = step({"w": jnp.asarray(g, jnp.float32)}, state,
                    None if r is None else {"w": jnp.asarray(r, jnp.float32)})
  chex.clear_trace_counter()


@pytest.mark.parametrize("mapping", ["shard_map"])
@pytest.mark.parametrize("scheme,estimator",
                         [("loo", "jackknife"), ("symmetric", "paper"),
                          (None, "jackknife")])
def test_named_axis_equals_stacked_with_curvature(mapping, scheme, estimator):
  params = {"w": jnp.zeros((4, 2))}
  grads, curv = _data(5, shape=(4, 2), steps=2)
  g = {"w": jnp.asarray(grads[1], jnp.float32)}
  r = {"w": jnp.asarray(curv[0], jnp.float32)}
  stacked = bcopt.scale_by_sophia_bc(cross_fit=scheme,
                                     inverse_correction=estimator)
  named = bcopt.scale_by_sophia_bc(cross_fit=scheme,
                                   inverse_correction=estimator,
                                   axis_name=AXIS)
  s, update = stacked.init(params), jax.jit(stacked.update)
  u_ref, s_ref = update(g, s, params, curvature=r)
  u_ref2, _ = update(g, s_ref, params)
  step = lambda g_, s_, r_: named.update(g_, s_, params, curvature=r_)
  u, s_named = run_mapped(mapping, step, g, s, r)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(s_named, s_ref, rtol=1e-5)
  cached = lambda g_, s_, _: named.update(g_, s_, params)
  u2, _ = run_mapped(mapping, cached, g, s_named, r)
  chex.assert_trees_all_close(u2, u_ref2, rtol=1e-5, atol=1e-7)


def _softmax_regression(seed, b=6, d=3, c=4):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
  return x, w


def test_gnb_is_unbiased_for_gauss_newton_diagonal():
  x, w = _softmax_regression(0)
  logits_fn = lambda p, inputs: inputs @ p["w"]
  # Closed form: GN of (1/B) sum_b CE(x_b W, y_b) has diagonal entries
  # (1/B) sum_b x_bd^2 (p_bc - p_bc^2).
  probs = np.asarray(jax.nn.softmax(x @ w, axis=-1), np.float64)
  xs = np.asarray(x, np.float64)
  exact = np.einsum("bd,bc->dc", xs ** 2, probs - probs ** 2) / len(xs)
  keys = jax.random.split(jax.random.key(0), 20000)
  samples = jax.jit(jax.vmap(bcopt.gnb_diag, in_axes=(None, None, None, 0)),
                    static_argnums=0)(logits_fn, {"w": w}, x, keys)["w"]
  mean = np.asarray(samples, np.float64).mean(0)
  stderr = np.asarray(samples, np.float64).std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-6), (mean, exact)


def test_gnb_label_mask_counts_only_masked_positions():
  x, w = _softmax_regression(1)
  logits_fn = lambda p, inputs: inputs @ p["w"]
  mask = jnp.array([1, 1, 0, 1, 0, 1])
  keys = jax.random.split(jax.random.key(1), 20000)
  samples = jax.jit(jax.vmap(lambda k: bcopt.gnb_diag(
      logits_fn, {"w": w}, x, k, label_mask=mask)))(keys)["w"]
  keep = np.asarray(mask, bool)
  probs = np.asarray(jax.nn.softmax(x @ w, axis=-1), np.float64)[keep]
  xs = np.asarray(x, np.float64)[keep]
  exact = np.einsum("bd,bc->dc", xs ** 2, probs - probs ** 2) / keep.sum()
  mean = np.asarray(samples, np.float64).mean(0)
  stderr = np.asarray(samples, np.float64).std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-6)


def test_hutchinson_is_unbiased_for_hessian_diagonal():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=5), jnp.float32)
  loss_fn = lambda p, inputs: (jnp.sum(jnp.sin(p["u"]) * inputs)
                               + jnp.sum(p["u"] * p["v"]) ** 2
                               + jnp.sum(jnp.exp(0.3 * p["v"])))
  params = {"u": jnp.asarray(rng.normal(size=5), jnp.float32),
            "v": jnp.asarray(rng.normal(size=5), jnp.float32)}
  flat = lambda u_v: {"u": u_v[:5], "v": u_v[5:]}
  full = jnp.concatenate([params["u"], params["v"]])
  exact = np.diag(np.asarray(jax.hessian(lambda z: loss_fn(flat(z), a))(full)))
  keys = jax.random.split(jax.random.key(2), 20000)
  samples = jax.jit(jax.vmap(lambda k: bcopt.hutchinson_diag(
      loss_fn, params, a, k)))(keys)
  samples = np.concatenate([np.asarray(samples["u"]), np.asarray(samples["v"])], axis=1)
  mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-5), (mean, exact)
  assert np.any(samples.std(0) > 0.1)  # the estimator is genuinely noisy here


def test_bf16_params_and_dtypes():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  tx = bcopt.sophia_bc(1e-2)
  state = tx.init(params)
  assert state[0].mu["w"].dtype == jnp.float32
  assert state[0].h["w"].dtype == jnp.float32
  g = {"w": jnp.full((4, 3, 2), 0.1, jnp.bfloat16)}
  u, state = tx.update(g, state, params, curvature=jax.tree.map(jnp.ones_like, g))
  assert u["w"].dtype == jnp.bfloat16
  chex.assert_tree_all_finite(u)


class TestBadInput:

  def test_construction(self):
    with pytest.raises(ValueError, match="clip must be positive"):
      bcopt.scale_by_sophia_bc(clip=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
      bcopt.scale_by_sophia_bc(eps=0.0)
    with pytest.raises(ValueError, match="rho must be positive"):
      bcopt.sophia_bc(1e-3, rho=-1.0)
    with pytest.raises(ValueError, match="is not one of"):
      bcopt.sophia_bc(1e-3, cross_fit="threefold")

  def test_curvature_structure_and_count(self):
    tx = bcopt.scale_by_sophia_bc()
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    g = {"w": jnp.ones((4, 3)), "b": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match="structure of the gradients"):
      tx.update(g, tx.init(params), params, curvature={"w": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match="same leading microbatch axis"):
      tx.update(g, tx.init(params), params,
                curvature={"w": jnp.ones((2, 3)), "b": jnp.ones((2, 2))})

  def test_curvature_of_tuple_params(self):
    """A tuple of parameters is not taken for a (gradient, curvature) pair:
    matching curvature is accepted, a mismatched leaf is named."""
    tx = bcopt.scale_by_sophia_bc()
    params = (jnp.zeros(3), jnp.zeros((2, 2)))
    g = (jnp.ones((4, 3)), jnp.ones((4, 2, 2)))
    u, _ = tx.update(g, tx.init(params), params, curvature=g)
    chex.assert_trees_all_equal_shapes(u, params)
    with pytest.raises(ValueError, match=r"curvature leaf \[1\]"):
      tx.update(g, tx.init(params), params,
                curvature=(g[0], jnp.ones((4, 2, 3))))

  def test_too_few_microbatches(self):
    tx = bcopt.scale_by_sophia_bc(cross_fit="loo")
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="at least 2 microbatches"):
      tx.update({"w": jnp.ones((1, 3))}, tx.init(params), params)
