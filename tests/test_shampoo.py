"""Shampoo-BC against the numpy restatement of SPEC sections 5 and 5a."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt
import reference
from bcopt._src import inverse
from bcopt._src import microbatch
from bcopt._src import shampoo
from named_axis import AXIS, run_mapped

SCHEMES = [None, "twofold", "symmetric"]
ESTIMATORS = [None, "jackknife", "paper"]
B1, B2, DAMPING, EXPONENT = 0.9, 0.95, 1e-3, 4
FALLBACK_B2, FALLBACK_EPS = 0.999, 1e-8
K = 4  # the default variance_groups: with M = 8 the full batch has 4
#        subgroups of 2, each two-fold group 4 of 1 (the exact jackknife)


def _steps(seed, shape, steps=5, m=8, noise=0.7):
  rng = np.random.default_rng(seed)
  signal = rng.normal(size=shape)
  return [signal + noise * rng.normal(size=(m,) + shape) for _ in range(steps)]


def _run(tx, steps, name="w", params=None):
  """Jitted updates of a one-leaf tree; returns updates and the last state."""
  params = params or {name: jnp.zeros(steps[0].shape[1:], jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for g in steps:
    u, state = update({name: jnp.asarray(g, jnp.float32)}, state, params)
    outs.append(np.asarray(u[name], np.float64))
  return outs, state


def _tiles(x, rows, cols):
  """The (row slice, col slice) tiles of the last two axes of x."""
  return [x[..., r, c] for r in rows for c in cols]


def _assert_close(got, expected, rtol=1e-3, atol=1e-5, msg=""):
  np.testing.assert_allclose(got, expected, rtol=rtol,
                             atol=atol * np.max(np.abs(expected)) + 1e-12,
                             err_msg=msg)


def test_standard_shampoo_matches_eigh_formula():
  """cross_fit=None, no correction: textbook Shampoo with cached roots."""
  rng = np.random.default_rng(0)
  lr, wd, every, shape = 0.1, 0.01, 3, (5, 3)
  params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
  tx = bcopt.shampoo_bc(lr, B1, B2, DAMPING, wd, precondition_every=every,
                        cross_fit=None, inverse_correction=None)
  state = tx.init(params)
  update = jax.jit(tx.update)
  w = np.asarray(params["w"], np.float64)
  mom, left, right = np.zeros(shape), np.zeros((5, 5)), np.zeros((3, 3))

  def inv_root(factor):
    l, q = np.linalg.eigh(factor + DAMPING * np.eye(len(factor)))
    return q @ np.diag(l ** -0.25) @ q.T

  for t, g in enumerate(_steps(1, shape, steps=7), start=1):
    gbar = g.mean(axis=0)
    if (t - 1) % every == 0:
      left = B2 * left + (1 - B2) * gbar @ gbar.T
      right = B2 * right + (1 - B2) * gbar.T @ gbar
      pl, pr = inv_root(left), inv_root(right)
    mom = B1 * mom + (1 - B1) * gbar
    w = w - lr * (pl @ mom @ pr + wd * w)
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
    _assert_close(np.asarray(params["w"]), w, rtol=1e-4, msg=f"step {t}")
  assert int(state[0].count) == 7


@pytest.mark.parametrize("estimator,groups", [
    ("jackknife", None), ("jackknife", K), ("jackknife", 3), ("paper", K)])
def test_eigenvalue_variance_shortcut_equals_explicit_projection(
    estimator, groups):
  """Cached roots after a root step with a nonzero prior factor.

  The numpy restatement forms every leave-one-out / leave-subgroup-out /
  per-microbatch factor as a d x d matrix and projects it; bcopt uses row
  norms of Q^T G (M = 16: subgroups of 4 with K = 4, of 6, 5, 5 with 3).
  """
  shape, m = (5, 4), 16
  steps = _steps(2, shape, steps=2, m=m, noise=1.5)
  _, ref = reference.shampoo_bc_run(steps, B1, B2, DAMPING, EXPONENT, 1,
                                    None, estimator, groups)
  _, plain = reference.shampoo_bc_run(steps, B1, B2, DAMPING, EXPONENT, 1,
                                      None, None)
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=1,
                                 cross_fit=None, inverse_correction=estimator,
                                 variance_groups=groups)
  _, state = _run(tx, steps)
  for got, expected, uncorrected in [
      (state.left_root["w"][0], ref[3], plain[3]),
      (state.right_root["w"][0], ref[4], plain[4])]:
    _assert_close(np.asarray(got), expected, msg=f"{estimator} {groups}")
    # the correction is far larger than the tolerance (rtol 1e-3)
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(expected - uncorrected)) > 0.02 * scale


def test_correction_only_shrinks_the_roots():
  """Same eigenbasis, each d_k in [0, l_k^(-1/e)]: 0 <= PL_corr <= PL."""
  steps = _steps(14, (6, 5), steps=1, noise=2.0)
  roots = {}
  for estimator in [None, "jackknife"]:
    tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, cross_fit=None,
                                   inverse_correction=estimator)
    _, state = _run(tx, steps)
    roots[estimator] = [np.asarray(state.left_root["w"][0], np.float64),
                        np.asarray(state.right_root["w"][0], np.float64)]
  for plain, corrected in zip(roots[None], roots["jackknife"]):
    tol = 1e-5 * np.max(np.abs(plain))
    assert np.linalg.eigvalsh(corrected).min() >= -tol
    assert np.linalg.eigvalsh(plain - corrected).min() >= -tol
    assert np.linalg.eigvalsh(plain - corrected).max() > 0.01 * np.max(
        np.abs(plain))


@pytest.mark.parametrize("scheme,estimator",
                         list(itertools.product(SCHEMES, ESTIMATORS)))
def test_matches_numpy_restatement(scheme, estimator):
  """Root steps (t = 1, 3, 5) and cached steps, every scheme x estimator."""
  steps = _steps(3, (4, 3))
  expected, (mom, left, right, pl, pr) = reference.shampoo_bc_run(
      steps, B1, B2, DAMPING, EXPONENT, 2, scheme, estimator, K)
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 cross_fit=scheme,
                                 inverse_correction=estimator)
  got, state = _run(tx, steps)
  for t, (a, b) in enumerate(zip(got, expected), start=1):
    _assert_close(a, b, msg=f"step {t}")
  np.testing.assert_allclose(state.mu["w"], mom, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.left["w"][0], left, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.right["w"][0], right, rtol=1e-5, atol=1e-7)
  _assert_close(np.asarray(state.left_root["w"][0]), pl)
  _assert_close(np.asarray(state.right_root["w"][0]), pr)


@pytest.mark.parametrize("scheme,groups", [
    ("twofold", None), ("twofold", 8), ("symmetric", 3), (None, 5)])
def test_variance_groups_match_numpy_restatement(scheme, groups):
  """M = 8 over a root, a cached and a root step: groups=None and 8 (= n)
  are the exact jackknife; 3 and 5 give unequal subgroups (8 -> 3, 3, 2 and
  2, 2, 2, 1, 1; the two-fold groups of 4 -> 2, 1, 1 and 4 of 1)."""
  steps = _steps(16, (4, 3), steps=3)
  expected, (_, _, _, pl, pr) = reference.shampoo_bc_run(
      steps, B1, B2, DAMPING, EXPONENT, 2, scheme, "jackknife", groups)
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 cross_fit=scheme, variance_groups=groups)
  got, state = _run(tx, steps)
  for t, (a, b) in enumerate(zip(got, expected), start=1):
    _assert_close(a, b, msg=f"step {t}")
  _assert_close(np.asarray(state.left_root["w"][0]), pl)
  _assert_close(np.asarray(state.right_root["w"][0]), pr)
  if groups in (None, 8):  # the exact jackknife, not the default K = 4:
    # step 2 uses the roots of all 8 (4 subgroups of 2 with K = 4)
    grouped, _ = reference.shampoo_bc_run(
        steps, B1, B2, DAMPING, EXPONENT, 2, scheme, "jackknife", K)
    assert np.max(np.abs(grouped[1] - expected[1])) > 1e-2 * np.max(
        np.abs(expected[1]))


def test_subgroup_means_and_weights_over_the_global_index():
  """Subgroup means of each group, stacked and on a named axis (4 members x
  3 microbatches), against numpy slices of the global microbatch order."""
  rng = np.random.default_rng(17)
  g = {"w": jnp.asarray(rng.normal(size=(12, 3, 2)), jnp.float32)}
  stacked = microbatch.layout(g)
  for group, count, start in [("all", 5, 0), ("first", 4, 0),
                              ("second", 4, 6), ("second", None, 6)]:
    n = microbatch.group_size(stacked, group)
    parts = reference.subgroups(n, count)
    expected = np.stack([np.asarray(g["w"])[start + p].mean(0) for p in parts])
    got = microbatch.subgroup_means(g, stacked, group, count)["w"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    step = jax.jit(lambda g_, s_, _, group=group, count=count: (
        microbatch.subgroup_means(
            g_, microbatch.layout(g_, AXIS), group, count), s_))
    named, _ = run_mapped("shard_map", step, g, jnp.zeros(()))
    np.testing.assert_allclose(named["w"], expected, rtol=1e-6, atol=1e-7)


def test_subgroup_means_slices_equal_the_weighted_pass_bitwise():
  """A local axis sums static slices, a named axis weights every microbatch:
  on one member (``vmap`` over an axis of size 1) the two agree bitwise,
  float32 and bfloat16 gradients alike."""
  rng = np.random.default_rng(5)
  g = {"w": jnp.asarray(rng.normal(size=(16, 5, 3)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(16, 4)), jnp.bfloat16)}
  for group, count in [("all", 4), ("second", 4), ("first", 3),
                       ("all", None), ("second", 3)]:
    sliced = jax.jit(lambda g_, group=group, count=count:
                     microbatch.subgroup_means(
                         g_, microbatch.layout(g_), group, count))(g)
    weighted = jax.jit(jax.vmap(
        lambda g_, group=group, count=count: microbatch.subgroup_means(
            g_, microbatch.layout(g_, AXIS), group, count),
        axis_name=AXIS))(jax.tree.map(lambda x: x[None], g))
    chex.assert_trees_all_equal(sliced, jax.tree.map(lambda x: x[0],
                                                     weighted))


@pytest.mark.parametrize("groups", [2, 4, 6])
def test_grouped_jackknife_of_a_linear_statistic(groups):
  """A statistic linear in the microbatches, equal subgroups (M = 12): the
  delete-a-group jackknife is svar(subgroup means) / K, for the shared
  helpers bcopt's Shampoo uses (subgroup means, leave-out means, variance)."""
  rng = np.random.default_rng(18)
  g = rng.normal(size=(12, 5))
  linear = lambda x: 3.0 * x[..., ::-1] - 2.0 * x  # any linear map
  sizes = microbatch.subgroup_sizes(12, groups)
  means = microbatch.subgroup_means(
      {"x": jnp.asarray(g, jnp.float32)},
      microbatch.layout({"x": g}), "all", groups)["x"]
  _, left_out = microbatch.leave_subgroup_out(list(means), sizes)
  got = inverse.grouped_jackknife_variance(linear(jnp.stack(left_out)))
  subgroup_means = np.stack([g[p].mean(0) for p in reference.subgroups(
      12, groups)])
  expected = np.var(linear(subgroup_means), axis=0, ddof=1) / groups
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # the numpy restatement's grouped jackknife agrees
  np.testing.assert_allclose(reference.group_variance(
      linear, g, "jackknife", groups=groups), expected, rtol=1e-10)


def test_root_step_flag_compiles_one_step_kind():
  """root_step=True/False give the lax.cond program's updates and states
  (a root step, then a cached one), and each program holds only its own
  kind's scratch memory: the non-root one far less than the cond's."""
  d, m = 48, 8
  params = {"w": jnp.zeros((d, d))}
  steps = _steps(19, (d, d), steps=2, m=m)
  tx = bcopt.scale_by_shampoo_bc(precondition_every=2)
  static = jax.jit(tx.update, static_argnames="root_step")
  state_cond = state_flag = tx.init(params)
  for g, root in zip(steps, (True, False)):
    g = {"w": jnp.asarray(g, jnp.float32)}
    u_cond, state_cond = jax.jit(tx.update)(g, state_cond, params)
    u_flag, state_flag = static(g, state_flag, params, root_step=root)
    chex.assert_trees_all_close((u_flag, state_flag), (u_cond, state_cond),
                                rtol=1e-6, atol=1e-7)
  shapes = ({"w": jax.ShapeDtypeStruct((m, d, d), jnp.float32)},
            tx.init(params), params)
  temp = lambda **kw: jax.jit(lambda *a: tx.update(*a, **kw)).lower(
      *shapes).compile().memory_analysis().temp_size_in_bytes
  cond, root, cached = temp(), temp(root_step=True), temp(root_step=False)
  assert cached < 0.25 * cond, (cached, root, cond)
  assert root <= cond, (root, cond)


def test_factors_change_on_root_steps_only():
  steps = _steps(4, (3, 3), steps=4)
  tx = bcopt.scale_by_shampoo_bc(precondition_every=3)
  params = {"w": jnp.zeros((3, 3))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in steps:
    _, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    history.append(np.asarray(state.left["w"]))
  changed = [not np.array_equal(a, b) for a, b in zip(history, history[1:])]
  assert changed == [False, False, True]  # steps 2, 3 cached; step 4 a root


@pytest.mark.parametrize("scheme,estimator",
                         [(None, None), ("twofold", "jackknife")])
def test_blocking_reproduces_unblocked_on_block_diagonal_problem(
    scheme, estimator):
  blocks = _steps(5, (2, 3, 3))
  steps = [np.zeros((8, 6, 6)) for _ in blocks]
  for s, b in zip(steps, blocks):
    s[:, :3, :3], s[:, 3:, 3:] = b[:, 0], b[:, 1]
  expected, _ = reference.shampoo_bc_run(steps, B1, B2, DAMPING, EXPONENT, 2,
                                         scheme, estimator, K)
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 block_size=3, cross_fit=scheme,
                                 inverse_correction=estimator)
  got, state = _run(tx, steps)
  assert state.left["w"].shape == (4, 3, 3)
  for t, (a, b) in enumerate(zip(got, expected), start=1):
    _assert_close(a, b, msg=f"step {t}")


@pytest.mark.parametrize("scheme,estimator",
                         [(None, None), ("symmetric", "jackknife")])
def test_uneven_blocks_are_padded_without_effect(scheme, estimator):
  """(7, 7) with block_size 4: tiles 4 + 3 (one padded row/col)."""
  steps = _steps(6, (7, 7))
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 block_size=4, cross_fit=scheme,
                                 inverse_correction=estimator)
  got, state = _run(tx, steps)
  assert state.left["w"].shape == (4, 4, 4)
  cuts = [slice(0, 4), slice(4, 7)]
  per_tile = [reference.shampoo_bc_run(
      tile_steps, B1, B2, DAMPING, EXPONENT, 2, scheme, estimator, K)[0]
              for tile_steps in zip(*[_tiles(s, cuts, cuts) for s in steps])]
  for t, g in enumerate(got):
    for k, tile in enumerate(_tiles(g, cuts, cuts)):
      _assert_close(tile, per_tile[k][t], msg=f"step {t + 1} tile {k}")


def test_graft_rescales_each_tile_to_adam_norm():
  scheme, estimator = "twofold", "jackknife"
  steps = _steps(7, (7, 4))
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 block_size=4, graft="adam", cross_fit=scheme,
                                 inverse_correction=estimator)
  got, _ = _run(tx, steps)
  rows, cols = [slice(0, 4), slice(4, 7)], [slice(0, 4)]  # one padded row
  adam_dirs, _ = reference.adam_bc_run(steps, B1, FALLBACK_B2, FALLBACK_EPS,
                                       scheme, estimator)
  shampoo_dirs = [reference.shampoo_bc_run(
      tile_steps, B1, B2, DAMPING, EXPONENT, 2, scheme, estimator, K)[0]
                  for tile_steps in zip(*[_tiles(s, rows, cols)
                                          for s in steps])]
  for t, g in enumerate(got):
    pairs = zip(_tiles(g, rows, cols), _tiles(adam_dirs[t], rows, cols))
    for k, (tile, adam_tile) in enumerate(pairs):
      direction = shampoo_dirs[k][t]
      expected = direction * np.linalg.norm(adam_tile) / np.linalg.norm(
          direction)
      _assert_close(tile, expected, msg=f"step {t + 1} tile {k}")
      np.testing.assert_allclose(np.linalg.norm(tile),
                                 np.linalg.norm(adam_tile), rtol=1e-4)


def test_fallback_leaves_equal_adamw_bc():
  """Grafting runs Adam on every leaf: the fallback leaves are unchanged."""
  scheme, estimator, graft = "symmetric", "paper", "adam"
  big = shampoo.MAX_PRECONDITIONED_DIM + 1
  shapes = {"w": (4, 3), "b": (3,), "s": (), "row": (1, 5), "big": (2, big)}
  rng = np.random.default_rng(8)
  steps = [{k: 0.3 + rng.normal(size=(8,) + s) for k, s in shapes.items()}
           for _ in range(3)]
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  tx = bcopt.scale_by_shampoo_bc(B1, B2, DAMPING, precondition_every=2,
                                 graft=graft, cross_fit=scheme,
                                 inverse_correction=estimator)
  adam = bcopt.scale_by_adam_bc(B1, FALLBACK_B2, FALLBACK_EPS,
                                cross_fit=scheme, inverse_correction=estimator)
  fallback = ["b", "s", "row", "big"]
  state = tx.init(params)
  adam_state = adam.init({k: params[k] for k in fallback})
  for k in fallback:
    assert state.left[k] == optax.MaskedNode()
  for g in steps:
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    u, state = jax.jit(tx.update)(g, state, params)
    u_adam, adam_state = jax.jit(adam.update)({k: g[k] for k in fallback},
                                              adam_state)
    chex.assert_trees_all_close({k: u[k] for k in fallback}, u_adam,
                                rtol=1e-4, atol=1e-7)
  for k in fallback:
    expected, _ = reference.adam_bc_run([s[k] for s in steps], B1,
                                        FALLBACK_B2, FALLBACK_EPS, scheme,
                                        estimator)
    _assert_close(np.asarray(u[k]), expected[-1], rtol=2e-4, atol=2e-5)
  direction, _ = reference.shampoo_bc_run([s["w"] for s in steps], B1, B2,
                                          DAMPING, EXPONENT, 2, scheme,
                                          estimator, K)
  adam_w, _ = reference.adam_bc_run([s["w"] for s in steps], B1, FALLBACK_B2,
                                    FALLBACK_EPS, scheme, estimator)
  scale = np.linalg.norm(adam_w[-1]) / np.linalg.norm(direction[-1])
  _assert_close(np.asarray(u["w"]), direction[-1] * scale)


def test_rank3_parameter_merges_leading_axes():
  steps = _steps(9, (6, 4), steps=3)
  tx = bcopt.scale_by_shampoo_bc(precondition_every=2, block_size=4)
  flat, flat_state = _run(tx, steps)
  cube, cube_state = _run(tx, [s.reshape(8, 2, 3, 4) for s in steps])
  assert cube_state.left["w"].shape == (2, 3, 3)  # rows 6 -> 2 tiles of 3
  assert cube_state.right["w"].shape == (2, 4, 4)
  for a, b in zip(cube, flat):
    np.testing.assert_allclose(a.reshape(6, 4), b, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(cube_state.left, flat_state.left)


def test_nonfinite_decomposition_keeps_cached_roots():
  """An overflowing gradient in one tile: that tile keeps its factors."""
  params = {"w": jnp.zeros((4, 2))}
  tx = bcopt.scale_by_shampoo_bc(precondition_every=1, block_size=2,
                                 cross_fit="twofold")
  state = tx.init(params)
  good = _steps(10, (4, 2), steps=2)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.asarray(good[0], jnp.float32)}, state, params)
  crafted = good[1].copy()
  crafted[:, 0, 0] = 1e25  # finite, but its square overflows float32
  u, new = update({"w": jnp.asarray(crafted, jnp.float32)}, state, params)
  chex.assert_tree_all_finite(u)
  chex.assert_tree_all_finite(new)
  for field in ["left", "right", "left_root", "right_root"]:
    before, after = getattr(state, field)["w"], getattr(new, field)["w"]
    np.testing.assert_array_equal(after[0], before[0])  # poisoned tile kept
    assert not np.allclose(after[1], before[1])  # the other tile refreshed
  # the poisoned tile's update used the cached roots
  mom = 0.9 * np.asarray(state.mu["w"]) + 0.1 * crafted[:4].mean(0)
  expected = (np.asarray(state.left_root["w"][0]) @ mom[:2]
              @ np.asarray(state.right_root["w"][0]))
  np.testing.assert_allclose(u["w"][:2], expected, rtol=1e-5)


@pytest.mark.parametrize("estimator", [None, "jackknife"])
def test_eigenvalues_are_floored_at_the_damping(estimator):
  """A rank-one factor of norm ~2e5: float32 eigh returns null-space
  eigenvalues off by ~1e-2, some negative; the floor keeps the roots finite
  and each root eigenvalue in [0, damping^(-1/e)]."""
  damping = 1e-6
  rng = np.random.default_rng(15)
  g = 1e3 * np.outer(rng.normal(size=6), rng.normal(size=5))
  left = (1 - B2) * g @ g.T + damping * np.eye(6)
  assert np.linalg.eigvalsh(np.asarray(left, np.float32)).min() < 0  # float32
  tx = bcopt.scale_by_shampoo_bc(B1, B2, damping, precondition_every=1,
                                 cross_fit=None, inverse_correction=estimator)
  u, state = _run(tx, [np.tile(g, (4, 1, 1))])
  chex.assert_tree_all_finite((u, state))
  ceiling = damping ** (-1 / EXPONENT)
  top_l, top_r = np.linalg.eigh(left)[1][:, -1], np.linalg.svd(g)[2][0]
  for root, top, factor in [(state.left_root["w"][0], top_l, left),
                            (state.right_root["w"][0], top_r, None)]:
    root = np.asarray(root, np.float64)
    eig = np.linalg.eigvalsh(0.5 * (root + root.T))
    assert eig.min() >= -1e-3 * ceiling and eig.max() <= ceiling * (1 + 1e-3)
    # the signal direction gets the textbook l_max^(-1/e)
    l_max = (1 - B2) * np.sum(g * g) + damping
    np.testing.assert_allclose(top @ root @ top, l_max ** (-1 / EXPONENT),
                               rtol=1e-3)


@pytest.mark.parametrize("groups,ms", [(None, (4, 16)), (K, (16, 32))])
def test_root_step_scratch_memory_does_not_grow_with_microbatches(groups, ms):
  """XLA's buffer assignment: more microbatches add under a quarter of a
  d x d matrix per extra microbatch (exact: only the (M, t1 + t2)
  eigenvalue estimates are stacked; grouped: K subgroup means whatever M),
  where a matrix kept per microbatch would add at least one."""
  d = 48
  params = {"w": jnp.zeros((d, d))}
  tx = bcopt.scale_by_shampoo_bc(cross_fit="twofold",
                                 inverse_correction="jackknife",
                                 variance_groups=groups)
  temp = {}
  for m in ms:
    grads = {"w": jax.ShapeDtypeStruct((m, d, d), jnp.float32)}
    compiled = jax.jit(tx.update).lower(grads, tx.init(params),
                                        params).compile()
    temp[m] = compiled.memory_analysis().temp_size_in_bytes
  per_microbatch = (temp[ms[1]] - temp[ms[0]]) / (ms[1] - ms[0])
  assert per_microbatch < 0.25 * d * d * 4, temp


def test_no_retracing_across_root_and_cached_steps():
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  tx = bcopt.scale_by_shampoo_bc(precondition_every=2, graft="adam")
  rng = np.random.default_rng(12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s):
    return tx.update(g, s, params)

  state = tx.init(params)
  for _ in range(5):
    g = jax.tree.map(lambda p: jnp.asarray(
        rng.normal(size=(4,) + p.shape), jnp.float32), params)
    _, state = step(g, state)
  assert int(state.count) == 5
  chex.clear_trace_counter()


@functools.cache
def _named_axis_case():
  """Symmetric (both group assignments) with graft (the Adam path too)."""
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  rng = np.random.default_rng(13)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      0.5 + rng.normal(size=(8,) + p.shape), jnp.float32), params)
           for _ in range(2)]
  make = lambda axis: bcopt.scale_by_shampoo_bc(
      precondition_every=2, block_size=3, graft="adam", cross_fit="symmetric",
      inverse_correction="jackknife", axis_name=axis)
  stacked = make(None)
  state, expected = stacked.init(params), []
  for g in grads:  # a root step, then a cached one
    u, state = jax.jit(stacked.update)(g, state, params)
    expected.append((u, state))
  return params, grads, make(AXIS), stacked.init(params), expected


# vmap(axis_name) with a plain configuration is in tests/test_properties.py.
@pytest.mark.parametrize("mapping", ["shard_map"])
def test_named_axis_equals_stacked(mapping):
  params, grads, named, state, expected = _named_axis_case()
  step = jax.jit(lambda g_, s_, _: named.update(g_, s_, params))
  for g, (u_ref, s_ref) in zip(grads, expected):
    u, state = run_mapped(mapping, step, g, state)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(state, s_ref, rtol=1e-4, atol=1e-6)


def test_named_axis_subgroups_straddling_members_equal_stacked():
  """variance_groups=3 with M = 8 over 4 members of 2: subgroups of 3, 3, 2
  (all) and 2, 1, 1 (each half) cross the members' boundaries."""
  params = {"w": jnp.zeros((5, 4))}
  steps = _steps(20, (5, 4), steps=1)
  g = {"w": jnp.asarray(steps[0], jnp.float32)}
  expected, (_, _, _, pl, _) = reference.shampoo_bc_run(
      steps, B1, B2, DAMPING, EXPONENT, 1, "twofold", "jackknife", 3)
  make = lambda axis: bcopt.scale_by_shampoo_bc(
      B1, B2, DAMPING, cross_fit="twofold", variance_groups=3, axis_name=axis)
  state = make(None).init(params)
  stacked = jax.jit(make(None).update)(g, state, params)
  named = make(AXIS)
  step = jax.jit(lambda g_, s_, _: named.update(g_, s_, params))
  for u, new in (stacked, run_mapped("shard_map", step, g, state)):
    _assert_close(np.asarray(u["w"]), expected[0])
    _assert_close(np.asarray(new.left_root["w"][0]), pl)


def test_dtypes():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  tx = bcopt.shampoo_bc(1e-2, graft="adam")
  state = tx.init(params)
  inner = state[0]
  assert inner.mu["w"].dtype == inner.left["w"].dtype == jnp.float32
  assert inner.nu["b"].dtype == inner.left_root["w"].dtype == jnp.float32
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(
      size=(4,) + p.shape), jnp.bfloat16), params)
  u, state = jax.jit(tx.update)(g, state, params)
  assert u["w"].dtype == u["b"].dtype == jnp.bfloat16
  chex.assert_tree_all_finite(u)
  low = bcopt.scale_by_shampoo_bc(mu_dtype=jnp.bfloat16).init(params)
  assert low.mu["w"].dtype == jnp.bfloat16


class TestBadInput:

  def test_loo_explains_the_cost(self):
    with pytest.raises(ValueError, match="one eigendecomposition per"):
      bcopt.scale_by_shampoo_bc(cross_fit="loo")
    with pytest.raises(ValueError, match="one eigendecomposition per"):
      bcopt.shampoo_bc(1e-3, cross_fit="loo")

  @pytest.mark.parametrize("kwargs,match", [
      ({"cross_fit": "threefold"}, "is not one of"),
      ({"inverse_correction": "delta"}, "is not one of"),
      ({"graft": "sgd"}, "graft='sgd' is not one of"),
      ({"damping": 0.0}, "damping must be positive"),
      ({"exponent": 0}, "exponent must be positive"),
      ({"precondition_every": 0}, "precondition_every must be"),
      ({"precondition_every": 2.5}, "precondition_every must be"),
      ({"block_size": 1}, "block_size must be"),
      ({"variance_groups": 1}, "variance_groups must be None .* got 1"),
      ({"variance_groups": 0}, "variance_groups must be None .* got 0"),
      ({"variance_groups": 2.5}, "variance_groups must be None .* got 2.5"),
      ({"variance_groups": True}, "variance_groups must be None .* True"),
      ({"variance_groups": "4"}, "variance_groups must be None .* '4'"),
  ])
  def test_construction(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      bcopt.scale_by_shampoo_bc(**kwargs)

  def test_root_step_must_be_static(self):
    tx = bcopt.scale_by_shampoo_bc()
    params = {"w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="root_step must be None or"):
      jax.jit(tx.update)({"w": jnp.ones((4, 3, 3))}, tx.init(params), params,
                         root_step=jnp.bool_(True))

  def test_too_few_microbatches(self):
    tx = bcopt.scale_by_shampoo_bc(cross_fit="twofold")
    params = {"w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="M >= 4"):
      tx.update({"w": jnp.ones((2, 3, 3))}, tx.init(params), params)

  def test_missing_microbatch_axis(self):
    tx = bcopt.scale_by_shampoo_bc(cross_fit=None, inverse_correction=None)
    params = {"w": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match="expected \\(3, 3, 3\\)"):
      tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)
