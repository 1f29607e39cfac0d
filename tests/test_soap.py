"""SOAP-BC against the numpy restatement of SPEC section 8, and its identities
with AdamW-BC."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcopt
import reference
from bcopt._src import adam
from named_axis import AXIS, run_mapped

B1, B2, EPS, SB2, DAMPING = 0.9, 0.95, 1e-8, 0.9, 1e-3
HP = dict(b1=B1, b2=B2, eps=EPS, shampoo_b2=SB2, damping=DAMPING)


def _steps(seed, shape, steps=5, m=8, noise=0.7):
  rng = np.random.default_rng(seed)
  signal = rng.normal(size=shape)
  return [signal + noise * rng.normal(size=(m,) + shape) for _ in range(steps)]


def _run(tx, steps, params=None):
  """Jitted updates of the one-leaf tree {"w": ...}; updates, last state."""
  params = params or {"w": jnp.zeros(steps[0].shape[1:], jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in steps:
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    outs.append(np.asarray(u["w"], np.float64))
  return outs, state


def _assert_close(got, expected, rtol=1e-3, atol=1e-5, msg=""):
  np.testing.assert_allclose(got, expected, rtol=rtol,
                             atol=atol * np.max(np.abs(expected)) + 1e-12,
                             err_msg=msg)


@pytest.mark.parametrize("scheme,estimator,groups", [
    ("symmetric", "jackknife", 4), ("loo", "jackknife", 4),
    (None, None, 4), ("twofold", "paper", 4), ("loo", "paper", 4),
    ("twofold", "jackknife", 3),  # halves of 4: subgroups of 2, 1, 1
    (None, "jackknife", 3)])  # 8: subgroups of 3, 3, 2
def test_matches_numpy_restatement(scheme, estimator, groups):
  """Five steps across basis refreshes (after steps 1, 2 and 4). The shape
  keeps every eigenvalue simple from step 1 on (L is 4 x 4 of rank 3): a
  repeated eigenvalue's eigenvectors are any basis of its eigenspace, in
  which SOAP's coordinatewise Adam is not invariant."""
  steps = _steps(0, (4, 3))
  expected, (mu, nu, left, right) = reference.soap_bc_run(
      steps, B1, B2, EPS, SB2, DAMPING, 2, scheme, estimator, groups)
  outs, state = _run(bcopt.scale_by_soap_bc(
      **HP, precondition_every=2, cross_fit=scheme,
      inverse_correction=estimator, variance_groups=groups), steps)
  for t, (got, want) in enumerate(zip(outs, expected), start=1):
    _assert_close(got, want, msg=f"step {t}")
  _assert_close(np.asarray(state.mu["w"]), mu)
  _assert_close(np.asarray(state.nu["w"][0]), nu)
  _assert_close(np.asarray(state.left["w"][0]), left)
  _assert_close(np.asarray(state.right["w"][0]), right)


@pytest.mark.parametrize("scheme,estimator", [
    (None, "jackknife"), ("symmetric", "paper"), ("loo", "jackknife"),
    ("twofold", None)])
def test_identity_bases_equal_adamw_bc(scheme, estimator):
  """Q = I: step 1 of a rotated matrix, and every step of a parameter
  whose sides are both above max_precond_dim, are AdamW-BC's updates."""
  steps = _steps(1, (4, 3), steps=3)
  kwargs = dict(cross_fit=scheme, inverse_correction=estimator)
  adam_outs, adam_state = _run(
      bcopt.scale_by_adam_bc(B1, B2, EPS, **kwargs), steps)
  soap_outs, _ = _run(bcopt.scale_by_soap_bc(
      **HP, variance_groups=None, **kwargs), steps[:1])
  np.testing.assert_allclose(soap_outs[0], adam_outs[0], rtol=1e-5,
                             atol=1e-7)
  flat_outs, flat_state = _run(bcopt.scale_by_soap_bc(
      **HP, max_precond_dim=2, variance_groups=None, **kwargs), steps)
  for got, want in zip(flat_outs, adam_outs):
    np.testing.assert_array_equal(got, want)
  chex.assert_trees_all_equal(flat_state.nu, adam_state.nu)


@pytest.mark.parametrize("scheme,estimator", [
    ("loo", "jackknife"), ("twofold", "jackknife"), ("symmetric", "paper"),
    (None, "jackknife"), ("loo", "paper")])
def test_update_is_rotated_adamw_bc(scheme, estimator):
  """Given the state's bases, the update is Q_L AdamW-BC(rotated
  microbatches, rotated mu, nu) Q_R^T."""
  steps = _steps(2, (5, 4), steps=4)
  tx = bcopt.scale_by_soap_bc(
      **HP, precondition_every=2, cross_fit=scheme,
      inverse_correction=estimator, variance_groups=None)
  _, state = _run(tx, steps[:3])
  params = {"w": jnp.zeros((5, 4))}
  g = jnp.asarray(steps[3], jnp.float32)
  u, _ = jax.jit(tx.update)({"w": g}, state, params)
  q_l = np.asarray(state.left_basis["w"][0], np.float64)
  q_r = np.asarray(state.right_basis["w"][0], np.float64)
  rotate = lambda x: q_l.T @ np.asarray(x, np.float64) @ q_r
  inner = bcopt.scale_by_adam_bc(B1, B2, EPS, cross_fit=scheme,
                                 inverse_correction=estimator)
  adam_state = adam.ScaleByAdamBCState(
      count=state.count, mu={"w": jnp.asarray(rotate(state.mu["w"]),
                                               jnp.float32)},
      nu={"w": state.nu["w"][0]})
  rotated = jnp.asarray(np.stack([rotate(x) for x in steps[3]]), jnp.float32)
  u_rot, _ = jax.jit(inner.update)({"w": rotated}, adam_state)
  _assert_close(np.asarray(u["w"]),
                q_l @ np.asarray(u_rot["w"], np.float64) @ q_r.T, rtol=1e-4)


@pytest.mark.parametrize("scheme,estimator", [("loo", "jackknife"),
                                              ("twofold", "jackknife")])
def test_blocks_and_one_sided_tiles_are_independent_soaps(scheme, estimator):
  """A (5, 4) matrix in tiles of at most 3 (rows 3 + 2 padded to 3, columns
  2 + 2) runs one SOAP-BC per tile: the padding has no effect."""
  steps = _steps(3, (5, 4), steps=3)
  outs, _ = _run(bcopt.scale_by_soap_bc(
      **HP, precondition_every=2, block_size=3, cross_fit=scheme,
      inverse_correction=estimator), steps)
  for rows in (slice(0, 3), slice(3, 5)):
    for cols in (slice(0, 2), slice(2, 4)):
      expected, _ = reference.soap_bc_run(
          [g[:, rows, cols] for g in steps], B1, B2, EPS, SB2, DAMPING, 2,
          scheme, estimator, 4)
      for got, want in zip(outs, expected):
        _assert_close(got[rows, cols], want)


def test_one_sided_rotation_keeps_the_identity_on_large_sides():
  """Rows above max_precond_dim: no L, Q_L = I; R and Q_R as in SPEC 8,
  and the update is AdamW-BC on the microbatches g_j Q_R, rotated back."""
  steps = _steps(4, (6, 3), steps=3)
  tx = bcopt.scale_by_soap_bc(**HP, precondition_every=1, max_precond_dim=4,
                              cross_fit="loo")
  params = {"w": jnp.zeros((6, 3))}
  state = tx.init(params)
  assert not jax.tree.leaves(state.left) + jax.tree.leaves(state.left_basis)
  assert state.right_basis["w"].shape == (1, 3, 3)
  assert state.nu["w"].shape == (1, 6, 3)
  _, state = _run(tx, steps[:2])
  right = np.zeros((3, 3))
  for g in steps[:2]:
    gbar = g.mean(axis=0)
    right = SB2 * right + (1 - SB2) * gbar.T @ gbar
  _assert_close(np.asarray(state.right["w"][0]), right)
  q_r = np.asarray(state.right_basis["w"][0], np.float64)
  expected_q = np.linalg.eigh(right + DAMPING * np.eye(3))[1]
  np.testing.assert_allclose(np.abs(q_r.T @ expected_q), np.eye(3),
                             atol=1e-4)  # the same basis up to signs
  u, _ = jax.jit(tx.update)({"w": jnp.asarray(steps[2], jnp.float32)}, state,
                            params)
  adam_state = adam.ScaleByAdamBCState(
      count=state.count,
      mu={"w": jnp.asarray(np.asarray(state.mu["w"]) @ q_r, jnp.float32)},
      nu={"w": state.nu["w"][0]})
  rotated = jnp.asarray(steps[2] @ q_r, jnp.float32)
  u_rot, _ = jax.jit(bcopt.scale_by_adam_bc(B1, B2, EPS).update)(
      {"w": rotated}, adam_state)
  _assert_close(np.asarray(u["w"]),
                np.asarray(u_rot["w"], np.float64) @ q_r.T, rtol=1e-4)


def test_rank3_parameter_merges_leading_axes():
  steps = _steps(5, (2, 3, 4), steps=3)
  tx = bcopt.scale_by_soap_bc(**HP, precondition_every=1)
  cube, _ = _run(tx, steps)
  flat, _ = _run(tx, [g.reshape(8, 6, 4) for g in steps])
  for a, b in zip(cube, flat):
    np.testing.assert_allclose(a.reshape(6, 4), b, rtol=1e-6, atol=1e-7)


def test_nonfinite_factors_keep_the_previous_tile():
  """A gradient whose square overflows in one tile: that tile keeps its
  factors and bases, the other tile refreshes."""
  params = {"w": jnp.zeros((4, 2))}
  tx = bcopt.scale_by_soap_bc(precondition_every=1, block_size=2,
                              cross_fit="twofold")
  state = tx.init(params)
  good = _steps(10, (4, 2), steps=2)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.asarray(good[0], jnp.float32)}, state, params)
  crafted = good[1].copy()
  crafted[:, 0, 0] = 1e25  # finite, but its square overflows float32
  _, new = update({"w": jnp.asarray(crafted, jnp.float32)}, state, params)
  for field in ["left", "right", "left_basis", "right_basis"]:
    before, after = getattr(state, field)["w"], getattr(new, field)["w"]
    chex.assert_tree_all_finite(after)
    np.testing.assert_array_equal(after[0], before[0])  # poisoned tile kept
    assert not np.allclose(after[1], before[1])  # the other tile refreshed


def test_named_axis_equals_stacked():
  params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}
  rng = np.random.default_rng(6)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=(8,) + p.shape), jnp.float32), params) for _ in range(2)]
  for scheme in ("loo", "twofold"):
    make = lambda axis: bcopt.scale_by_soap_bc(
        **HP, cross_fit=scheme, variance_groups=3, axis_name=axis)
    stacked, named = make(None), make(AXIS)
    state = ref_state = stacked.init(params)
    step = jax.jit(lambda g_, s_, _: named.update(g_, s_, params))
    for g in grads:  # a refresh step, then one with the refreshed bases
      u_ref, ref_state = jax.jit(stacked.update)(g, ref_state, params)
      u, state = run_mapped("shard_map", step, g, state)
      chex.assert_trees_all_close(u, u_ref, rtol=1e-4, atol=1e-6)
      chex.assert_trees_all_close(state, ref_state, rtol=1e-4, atol=1e-6)


def test_dtypes():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  tx = bcopt.soap_bc(1e-2)
  inner = tx.init(params)[0]
  assert inner.mu["w"].dtype == inner.nu["w"].dtype == jnp.float32
  assert inner.left["w"].dtype == inner.right_basis["w"].dtype == jnp.float32
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(
      size=(4,) + p.shape), jnp.bfloat16), params)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  assert u["w"].dtype == u["b"].dtype == jnp.bfloat16
  chex.assert_tree_all_finite(u)


class TestBadInput:

  @pytest.mark.parametrize("kwargs,match", [
      ({"cross_fit": "threefold"}, "is not one of"),
      ({"inverse_correction": "delta"}, "is not one of"),
      ({"damping": 0.0}, "damping must be positive"),
      ({"precondition_every": 0}, "precondition_every must be"),
      ({"block_size": 1}, "block_size must be"),
      ({"max_precond_dim": 1.5}, "max_precond_dim must be"),
      ({"variance_groups": 1}, "variance_groups must be None .* got 1"),
  ])
  def test_construction(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      bcopt.scale_by_soap_bc(**kwargs)

  @pytest.mark.parametrize("scheme,m,match", [
      ("twofold", 2, "M >= 4"), ("loo", 1, "at least 2 microbatches")])
  def test_too_few_microbatches(self, scheme, m, match):
    tx = bcopt.scale_by_soap_bc(cross_fit=scheme)
    params = {"w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match=match):
      tx.update({"w": jnp.ones((m, 3, 3))}, tx.init(params), params)

  def test_missing_microbatch_axis(self):
    tx = bcopt.scale_by_soap_bc(cross_fit=None, inverse_correction=None)
    params = {"w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="expected \\(3, 3, 3\\)"):
      tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)
