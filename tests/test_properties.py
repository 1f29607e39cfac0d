"""Properties shared by the three families (STYLE.md, "Tests"), with hypothesis.

1. A corrected inverse lies in ``[0, f(p)]``, so a correction never flips or
   enlarges a single-fold update (SPEC section 2).
2. Identical microbatches give the standard update, for every scheme and
   estimator (no variance, and every group has the same mean).
3. Permuting the microbatches within a preconditioner group changes nothing.
4. A stacked microbatch axis equals a named one (SPEC section 0).
5. AdamW-BC and Shampoo-BC (exponent 4) are scale-free: ``g -> c g`` leaves
   their updates unchanged when ``eps``/``damping`` is negligible.

Every expected value is an exact identity or an independent computation
(optax, the numpy restatement in ``reference.py``, numpy's ``eigh``), never
the code under test in the same configuration.

Speed: shapes are fixed, and each family's configurations run together in one
jitted function per purpose (stacked, a named-axis mapping, float64), built
once and kept in ``_COMPILED``; a test that makes one of them trace again
fails. Most of the file's time is compiling them.
"""

import collections
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import bcopt
import reference
from named_axis import AXIS, run_mapped

M = 8  # microbatches; the two cross-fit groups are [0, 4) and [4, 8)
HALF = M // 2
SHAPES = {"w": (4, 3)}  # one leaf: a second one would double compile time
FAMILIES = ("adam", "sophia", "shampoo")
ESTIMATORS = (None, "jackknife", "paper")
SCHEMES = {"adam": (None, "twofold", "symmetric", "loo"),
           "sophia": (None, "twofold", "symmetric", "loo"),
           "shampoo": (None, "twofold", "symmetric")}
CONFIGS = {f: tuple(itertools.product(SCHEMES[f], ESTIMATORS))
           for f in FAMILIES}
HYPER = {
    "adam": dict(b1=0.9, b2=0.95, eps=1e-8),
    "sophia": dict(b1=0.9, b2=0.9, rho=1.0, eps=1e-12, clip=1.0),
    "shampoo": dict(b1=0.9, b2=0.95, damping=1e-3, precondition_every=2,
                    fallback_b2=0.999, fallback_eps=1e-8),
}
BUILD = {"adam": bcopt.scale_by_adam_bc, "sophia": bcopt.scale_by_sophia_bc,
         "shampoo": bcopt.scale_by_shampoo_bc}
# Sophia refreshes its curvature on odd steps, Shampoo (precondition_every=2)
# computes roots on odd steps: step t is "fresh" when t is odd.
FRESH = (True, False, True)
WARM_STEPS = 4  # tests starting from _warm_states run steps 5 (fresh), 6


def _make(family, config, axis_name=None, **hyper):
  """config = (cross_fit, inverse_correction[, extra hyperparameter pairs])."""
  scheme, estimator, *extra = config
  hyper = {**HYPER[family], **hyper, **dict(*extra)}
  return BUILD[family](**hyper, cross_fit=scheme,
                       inverse_correction=estimator, axis_name=axis_name)


_COMPILED = {}
_TRACES = collections.Counter()


def _stepper(family, configs, params, mapping=None, **hyper):
  """``(txs, step)``: one jitted update of every configuration at once.

  ``step(grads, states, curvature)`` returns one ``(updates, state)`` per
  configuration; with ``mapping`` the microbatch axis is a named axis of
  ``named_axis.run_mapped`` (4 members of 2 microbatches). Built once per key.
  """
  key = (family, configs, mapping, str(jnp.result_type(params["w"])),
         tuple(sorted(hyper.items())))
  if key not in _COMPILED:
    axis = None if mapping is None else AXIS
    txs = [_make(family, c, axis, **hyper) for c in configs]

    def every(grads, states, curvature):
      extra = {} if curvature is None else {"curvature": curvature}
      return tuple(tx.update(grads, s, params, **extra)
                   for tx, s in zip(txs, states))

    def body(grads, states, curvature):
      # One trace per input signature (Sophia: with and without curvature);
      # chex.assert_max_traces would key all of these closures on one source.
      _TRACES[key] += 1
      assert _TRACES[key] <= (2 if family == "sophia" else 1), f"{key} retraced"
      if mapping is None:
        return every(grads, states, curvature)
      return run_mapped(mapping, every, grads, states, curvature)

    _COMPILED[key] = txs, jax.jit(body)
  return _COMPILED[key]


def _run(step, states, steps):
  """Per step, one ``(updates, state)`` per configuration (numpy)."""
  history = []
  for grads, curvature in steps:
    # numpy in, numpy out: the next call has the same signature (a sharded
    # output fed back would be a new one and trace again)
    out = jax.device_get(step(grads, tuple(states), curvature))
    states = [s for _, s in out]
    history.append(out)
  return history


def _schedule(family, steps, fresh):
  """Sophia gets its curvature on fresh steps; the others never."""
  return [(g, r if family == "sophia" and f else None)
          for (g, r), f in zip(steps, fresh)]


@functools.cache
def _warm_states(family):
  """Every configuration's state after four fixed, well-conditioned steps.

  Starting there keeps each denominator away from zero (nu, h, L, R > 0), so
  summing the microbatches in another order (a permutation, a psum) moves
  the update by float rounding only.
  """
  rng = np.random.default_rng(0)
  steps = []
  for _ in range(WARM_STEPS):
    grads = {k: (rng.normal(size=s) + 0.5 * rng.normal(size=(M,) + s))
             .astype(np.float32) for k, s in SHAPES.items()}
    curvature = {k: (1 + np.abs(rng.normal(size=(M,) + s)))
                 .astype(np.float32) for k, s in SHAPES.items()}
    steps.append((grads, curvature))
  txs, step = _stepper(family, CONFIGS[family], _params())
  # Two root steps: Shampoo's 4 x 4 factor L has full rank (one has rank 3).
  return _run(step, [tx.init(_params()) for tx in txs],
              _schedule(family, steps, FRESH[:2] * 2))[-1]


@functools.cache
def _params():
  return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def _signal(shape, dtype=np.float32):
  return hnp.arrays(dtype, shape, elements=st.floats(
      -2.0, 2.0, width=np.dtype(dtype).itemsize * 8, allow_subnormal=False))


_NOISE = st.floats(0.05, 3.0)


@st.composite
def _steps(draw, n, identical=False, shapes=SHAPES, dtype=np.float32,
           noise=st.one_of(st.just(0.0), _NOISE)):
  """``n`` steps of ``(grads, curvature)`` trees with M microbatches each.

  Microbatch j's gradient is ``a + s z_j`` and its curvature
  ``exp(b + s' z_j')`` (positive, heavy-tailed for large s'), with
  hypothesis' arrays a, b in [-2, 2], noise scales s, s' and standard normal
  z; ``identical=True`` takes s = s' = 0.
  """
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def microbatches(shape):
    scale = 0.0 if identical else draw(noise)
    return (draw(_signal(shape, dtype))
            + scale * rng.standard_normal((M,) + shape)).astype(dtype)

  return [({k: microbatches(s) for k, s in shapes.items()},
           {k: np.exp(microbatches(s)) for k, s in shapes.items()})
          for _ in range(n)]


def _assert_close(actual, expected, rtol, atol, msg=""):
  """assert_trees_all_close, atol relative to each leaf's largest entry."""
  def leaf(a, e):
    scale = float(np.max(np.abs(e))) if np.size(e) else 0.0
    chex.assert_trees_all_close(a, e, rtol=rtol, atol=atol * scale + 1e-30,
                                custom_message=msg)
  jax.tree.map(leaf, actual, expected)


# 1. A corrected inverse is in [0, f(p)]; a correction never flips or enlarges
#    a single-fold update.


@functools.cache
def _corrected_inverse(exponent):
  return jax.jit(functools.partial(bcopt.variance_correct_inverse,
                                   exponent=exponent))


@settings(max_examples=30, deadline=None)
@given(log_p=hnp.arrays(np.float64, 64, elements=st.floats(-15, 15)),
       ratio=hnp.arrays(np.float64, 64, elements=st.one_of(
           st.just(0.0), st.floats(1e-6, 100.0))),
       exponent=st.sampled_from([1, 2, 4]))
def test_corrected_inverse_lies_in_zero_to_plain(log_p, ratio, exponent):
  """f~(p) = max(0, f(p) - f''(p) V / 2), f(p) = p^(-1/e): in [0, f(p)].

  V = ratio * p^2 covers both sides of the clamp (at V / p^2 = 2 e^2 / (1 + e):
  1, 2.7, 6.4). p stays in [1e-15, 1e15]: below about 1e-19 float32 1/p^2
  overflows (p^2 underflows), and V = 0 then gives NaN.
  """
  p = (10.0 ** log_p).astype(np.float32)
  v = (ratio * np.float64(p) ** 2).astype(np.float32)
  got = np.asarray(_corrected_inverse(exponent)(p, v), np.float64)
  plain = np.float64(p) ** (-1.0 / exponent)  # f(p), numpy float64
  assert np.all(got >= 0)
  assert np.all(got <= plain * (1 + 1e-6))
  # numpy restatement; near the clamp the float32 rounding of 1 - c V / p^2
  # is absolute, on the scale of f(p)
  expected = reference.corrected_inverse(np.float64(p), np.float64(v), exponent)
  np.testing.assert_array_less(np.abs(got - expected),
                               1e-5 * expected + 1e-6 * plain)


def _single_fold(family, scheme, fresh):
  """Is the update one fold (a numerator times one inverse) on this step?

  Steps reusing a cached inverse (Sophia without curvature, Shampoo between
  root steps) have one fold in every scheme; Adam has a fresh inverse on
  every step.
  """
  cached = not fresh and family != "adam"
  return cached or scheme in (None, "twofold")


def _assert_elementwise_shrink(corrected, plain, msg):
  """u' = s u entrywise with 0 <= s <= 1: the same numerator times an inverse
  in [0, f(p)] (Sophia: then a monotone, odd clip).

  The two configurations compute the numerator b1 mu + (1 - b1) a in
  differently fused code; where it cancels they differ by rounding on the
  scale of the leaf, hence the slack 1e-5 max|u|.
  """
  c, p = np.asarray(corrected, np.float64), np.asarray(plain, np.float64)
  slack = 1e-5 * np.max(np.abs(p)) + 1e-30
  assert np.all((c * p >= 0) | (np.abs(c) <= slack)), (msg, c, p)
  assert np.all(np.abs(c) <= np.abs(p) * (1 + 1e-6) + slack), (msg, c, p)


def _assert_shrinks_in_common_eigenbasis(corrected, plain, msg):
  """Shampoo: ``U = PL Mom PR`` with ``PL = Q_L diag(d_L) Q_L^T``; the
  correction keeps ``Q`` and shrinks each ``d_k`` into ``[0, d_k]``, so
  ``Q_L^T U' Q_R = S * (Q_L^T U Q_R)`` entrywise with ``0 <= S <= 1``. Hence,
  in any basis (Frobenius), ``||U'||^2 <= <U', U> <= ||U||^2``: the corrected
  update never points against, nor is longer than, the plain one.
  """
  a, b = np.asarray(corrected, np.float64), np.asarray(plain, np.float64)
  inner, own, ref = np.vdot(a, b), np.vdot(a, a), np.vdot(b, b)
  slack = 1e-5 * ref + 1e-30
  assert own <= inner + slack, (msg, own, inner)
  assert inner <= ref + slack, (msg, inner, ref)


def _assert_roots_per_eigenvalue(state, estimator, damping, msg):
  """Cached roots after a root step: ``P = Q diag(d) Q^T`` with ``Q`` the
  eigenvectors of ``L + damping I`` (L from the state) and ``d_k`` in
  ``[0, f(l_k)]``, ``f(l) = max(l, damping)^(-1/4)`` from numpy: ``P``
  commutes with ``L`` and ``0 <= P <= f(L + damping I)`` (Loewner); the plain
  root is ``f(L + damping I)`` itself.
  """
  for factor, root in [(state.left, state.left_root),
                       (state.right, state.right_root)]:
    big_l = np.asarray(factor["w"][0], np.float64)
    p = np.asarray(root["w"][0], np.float64)
    l, q = np.linalg.eigh(big_l + damping * np.eye(len(big_l)))
    f = q @ np.diag(np.maximum(l, damping) ** -0.25) @ q.T
    # float32 eigh: eigenvalue errors ~ 1e-6 ||L||, times max f' = f'(damping)
    slack = 1e-5 * np.max(np.abs(f)) + (
        0.25 * damping ** -1.25 * 1e-6 * np.linalg.norm(big_l, 2))
    if estimator is None:
      np.testing.assert_allclose(p, f, atol=slack, err_msg=msg)
      continue
    commutator = np.linalg.norm(p @ big_l - big_l @ p, 2)
    assert commutator <= 1e-4 * np.linalg.norm(p, 2) * np.linalg.norm(
        big_l, 2) + 1e-30, msg
    assert np.linalg.eigvalsh(0.5 * (p + p.T)).min() >= -slack, msg
    assert np.linalg.eigvalsh(f - 0.5 * (p + p.T)).min() >= -slack, msg


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=12, deadline=None)
@given(steps=_steps(3))
def test_correction_never_flips_or_enlarges_a_single_fold_update(
    family, steps):
  """Corrected vs uncorrected, same scheme, three steps from init.

  Persistent state comes from the full batch, so both runs share the
  numerator and (up to the cached inverse) the preconditioner: a single-fold
  update shrinks entrywise (Adam, Sophia) or within the shared eigenbasis
  (Shampoo). Averages of folds (symmetric, LOO on fresh steps) may flip
  (SPEC section 2) and are not checked. After Shampoo's root steps the
  cached roots are checked eigenvalue by eigenvalue against numpy.
  """
  configs = CONFIGS[family]
  txs, step = _stepper(family, configs, _params())
  history = _run(step, [tx.init(_params()) for tx in txs],
                 _schedule(family, steps, FRESH))
  for t, (fresh, results) in enumerate(zip(FRESH, history), start=1):
    out = dict(zip(configs, results))
    for (scheme, estimator), (update, _) in out.items():
      if estimator is None or not _single_fold(family, scheme, fresh):
        continue
      plain, _ = out[(scheme, None)]
      msg = f"step {t} {scheme} {estimator}"
      if family == "shampoo":
        _assert_shrinks_in_common_eigenbasis(update["w"], plain["w"], msg)
      else:
        _assert_elementwise_shrink(update["w"], plain["w"], msg)
    if family == "shampoo" and fresh:
      for (scheme, estimator), (_, state) in out.items():
        _assert_roots_per_eigenvalue(state, estimator, HYPER[family]["damping"],
                                     f"step {t} {scheme} {estimator} roots")


# 2. Identical microbatches give the standard update.


def _optax_adam(b1, b2, eps):
  key = ("optax", b1, b2, eps)
  if key not in _COMPILED:
    tx = optax.scale_by_adam(b1, b2, eps)
    _COMPILED[key] = tx, jax.jit(tx.update)
  return _COMPILED[key]


def _optax_adam_updates(signals, b1, b2, eps):
  tx, update = _optax_adam(b1, b2, eps)
  state, out = tx.init(signals[0]), []
  for g in signals:
    u, state = update(g, state)
    out.append(jax.device_get(u))
  return out


def _standard_updates(family, steps):
  """The standard update (no cross-fit, no correction) of each step, from
  optax (Adam) or the numpy restatement (Sophia, Shampoo)."""
  signals = [jax.tree.map(lambda x: x[0], g) for g, _ in steps]
  h = HYPER[family]
  if family == "adam":
    return _optax_adam_updates(signals, h["b1"], h["b2"], h["eps"])
  if family == "sophia":
    per_leaf = {k: reference.sophia_bc_run(
        [g[k] for g, _ in steps], [None if r is None else r[k]
                                   for _, r in steps],
        h["b1"], h["b2"], h["rho"], h["eps"], h["clip"], None, None)[0]
                for k in SHAPES}
    return [{k: per_leaf[k][t] for k in SHAPES} for t in range(len(steps))]
  matrix, _ = reference.shampoo_bc_run(
      [g["w"] for g, _ in steps], h["b1"], h["b2"], h["damping"], 4,
      h["precondition_every"], None, None)
  return [{"w": w} for w in matrix]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None)
@given(steps=_steps(3, identical=True))
def test_identical_microbatches_give_the_standard_update(family, steps):
  """Every group mean is the common gradient and every variance is zero
  (all leave-one-out / per-microbatch values are equal), so every scheme
  and estimator is the standard optimizer: three steps from init (Sophia:
  refresh with identical curvature, cached, refresh; Shampoo: root, cached,
  root)."""
  configs = CONFIGS[family]
  txs, step = _stepper(family, configs, _params())
  steps = _schedule(family, steps, FRESH)
  history = _run(step, [tx.init(_params()) for tx in txs], steps)
  expected = _standard_updates(family, steps)
  # Shampoo: float32 eigh against float64; a factor of rank < 4 has
  # eigenvalues at the damping floor, whose roots carry ~1e-5 of the update.
  tol = (1e-4, 1e-4) if family == "shampoo" else (1e-5, 1e-6)
  for t, (results, want) in enumerate(zip(history, expected), start=1):
    for config, (update, _) in zip(configs, results):
      _assert_close(update, want, *tol, msg=f"step {t} {config}")


# 3. Permuting microbatches within a group changes nothing.

_ANYWHERE = st.permutations(range(M))
_WITHIN_GROUPS = st.tuples(st.permutations(range(HALF)),
                           st.permutations(range(HALF, M))).map(
                               lambda ab: list(ab[0]) + list(ab[1]))


def _permuted(steps, orders):
  """Reorders every step's microbatches (gradients and curvature alike)."""
  take = lambda order: lambda tree: None if tree is None else jax.tree.map(
      lambda x: x[np.asarray(order)], tree)
  return [(take(o)(g), take(o)(r)) for (g, r), o in zip(steps, orders)]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None)
@given(steps=_steps(2, noise=_NOISE),
       anywhere=st.lists(_ANYWHERE, min_size=2, max_size=2),
       within=st.lists(_WITHIN_GROUPS, min_size=2, max_size=2))
def test_permuting_microbatches_within_groups_changes_nothing(
    family, steps, anywhere, within):
  """Standard and LOO treat microbatches symmetrically: any permutation.
  Twofold and symmetric split [0, M/2) | [M/2, M): permutations within
  each group. Updates and states of two steps (fresh, then cached) from a
  warm state, to float rounding. Shampoo runs the exact jackknife here
  (``variance_groups=None``): the default delete-a-group jackknife is
  invariant only under permutations that keep its contiguous subgroups."""
  configs = CONFIGS[family]
  exact = {"variance_groups": None} if family == "shampoo" else {}
  _, step = _stepper(family, configs, _params(), **exact)
  warm = [s for _, s in _warm_states(family)]
  steps = _schedule(family, steps, FRESH[:2])
  base = _run(step, warm, steps)
  moved = {"anywhere": _run(step, warm, _permuted(steps, anywhere)),
           "within": _run(step, warm, _permuted(steps, within))}
  tol = (1e-4, 1e-5) if family == "shampoo" else (1e-5, 1e-5)
  for i, (scheme, estimator) in enumerate(configs):
    kind = "anywhere" if scheme in (None, "loo") else "within"
    for t in range(len(steps)):
      _assert_close(moved[kind][t][i], base[t][i], *tol,
                    msg=f"step {t + 5} {scheme} {estimator} {kind}")


# 4. A stacked microbatch axis equals a named one.

# vmap exercises the named-axis statistics of a wide set; shard_map (the same
# collectives, partitioned over 4 devices) one configuration per family.
NAMED_CONFIGS = {
    "vmap": {
        "adam": ((None, "jackknife"), ("twofold", "paper"),
                 ("symmetric", "jackknife"), ("loo", "jackknife"),
                 ("loo", "paper")),
        "sophia": ((None, "paper"), ("twofold", "jackknife"),
                   ("symmetric", "paper"), ("loo", "jackknife")),
        "shampoo": (("symmetric", "jackknife"),),
    },
    "shard_map": {
        "adam": (("symmetric", "paper"),),
        "sophia": (("loo", "jackknife"),),
        "shampoo": (("twofold", "paper"),),
    },
}


@pytest.mark.parametrize("mapping", ["vmap", "shard_map"])
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=6, deadline=None)
@given(steps=_steps(2, noise=_NOISE))
def test_named_axis_equals_stacked(family, mapping, steps):
  """``axis_name=`` under ``vmap(axis_name=...)`` / ``shard_map`` (4 members
  x 2 microbatches) vs the stacked axis: updates and states of two steps
  (fresh, then cached) from a warm state, to float rounding."""
  configs = NAMED_CONFIGS[mapping][family]
  _, stacked = _stepper(family, CONFIGS[family], _params())
  _, named = _stepper(family, configs, _params(), mapping)
  warm = [s for _, s in _warm_states(family)]
  steps = _schedule(family, steps, FRESH[:2])
  expected = _run(stacked, warm, steps)
  index = [CONFIGS[family].index(c) for c in configs]
  got = _run(named, [warm[i] for i in index], steps)
  tol = (1e-4, 1e-5) if family == "shampoo" else (1e-5, 1e-5)
  for t in range(len(steps)):
    for config, i, out in zip(configs, index, got[t]):
      _assert_close(out, expected[t][i], *tol,
                    msg=f"step {t + 5} {config} {mapping}")


# 5. Scaling the gradients by c > 0.

SCALE_SHAPES = {"adam": SHAPES, "shampoo": {"w": (3, 3)}}
SCALE_CONFIGS = {  # every scheme and estimator formula at least once
    "adam": ((None, None), (None, "jackknife"), ("twofold", "paper"),
             ("symmetric", "jackknife"), ("loo", "jackknife"),
             ("loo", "paper")),
    "shampoo": (("twofold", "jackknife"), ("symmetric", "paper"),
                (None, "jackknife", (("exponent", 2),))),
}
# Negligible against every denominator below (float64, p >~ 1e-6).
SCALE_HYPER = {"adam": dict(eps=1e-30),
               "shampoo": dict(damping=1e-30)}


def _scaled_state(family, state, c, exponent):
  """The state the scaled run must reach: moments scale by c and c^2,
  Shampoo's factors by c^2 and their inverse roots by c^(-2/e)."""
  if family == "adam":
    return state._replace(mu=jax.tree.map(lambda x: c * x, state.mu),
                          nu=jax.tree.map(lambda x: c * c * x, state.nu))
  scale = lambda k: lambda tree: jax.tree.map(lambda x: k * x, tree)
  return state._replace(
      mu=scale(c)(state.mu), nu=scale(c * c)(state.nu),
      left=scale(c * c)(state.left), right=scale(c * c)(state.right),
      left_root=scale(c ** (-2 / exponent))(state.left_root),
      right_root=scale(c ** (-2 / exponent))(state.right_root))


@pytest.mark.parametrize("family", ["adam", "shampoo"])
@settings(max_examples=6, deadline=None)
@given(data=st.data(), log_c=st.floats(-2.0, 2.0))
def test_scaling_the_gradients(family, data, log_c):
  """g -> c g for every microbatch of every step, state built from the
  scaled gradients over three steps from init (Shampoo: root, cached, root).

  With eps = damping = 0 these are identities for every scheme and
  estimator: Adam's numerator and p = sqrt(vhat) scale by c, its variances
  V by c^2, so f~(p) = (1 - V/p^2)+ / p scales by 1/c and the update is
  unchanged; Shampoo's L, R and eigenvalues l scale by c^2, V by c^4,
  f~(l) = l^(-1/e) (1 - (1+1/e)/(2e) V/l^2)+ by c^(-2/e), so
  U = PL Mom PR scales by c^(1 - 4/e): invariant for e = 4, 1/c for e = 2.
  Run in float64 with eps and damping 1e-30, far below every denominator
  (noise > 0 keeps Shampoo's square factors positive definite), the
  identities hold to rounding; float32 would blur them wherever a group
  mean nearly cancels.
  """
  c = 10.0 ** log_c
  shapes = SCALE_SHAPES[family]
  configs = SCALE_CONFIGS[family]
  with jax.enable_x64(True):
    steps = data.draw(_steps(3, shapes=shapes, dtype=np.float64,
                             noise=st.floats(0.1, 2.0)))
    params = {k: jnp.zeros(s, jnp.float64) for k, s in shapes.items()}
    txs, step = _stepper(family, configs, params, **SCALE_HYPER[family])
    init = [tx.init(params) for tx in txs]
    plain = _run(step, init, [(g, None) for g, _ in steps])
    scaled = _run(step, init, [(jax.tree.map(lambda x: c * x, g), None)
                               for g, _ in steps])
  for t in range(len(steps)):
    for config, (u, s), (u_c, s_c) in zip(configs, plain[t], scaled[t]):
      exponent = dict(*config[2:]).get("exponent", 4)
      msg = f"step {t + 1} {config} c={c}"
      if family == "shampoo":
        u = {"w": c ** (1 - 4 / exponent) * u["w"]}
      _assert_close(u_c, u, 1e-7, 1e-9, msg=msg)
      _assert_close(s_c, _scaled_state(family, s, c, exponent), 1e-7, 1e-9,
                    msg=msg)
