"""stacked == pmap == shard_map == vmap(axis_name) for the core transforms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt
from named_axis import AXIS, CURRENT_MAPPINGS, run_mapped

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((5,))}


def _grads(m, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(0.5 + rng.normal(size=(m,) + p.shape),
                            jnp.float32), PARAMS)


def _two_steps(make_tx, grads, mapping):
  """Two updates; returns (updates, state) of the second."""
  stacked = make_tx(None)
  state = stacked.init(PARAMS)
  if mapping == "stacked":
    update = jax.jit(stacked.update)
    for _ in range(2):
      u, state = update(grads, state, PARAMS)
    return u, state
  named = make_tx(AXIS)

  def step(g, s, _):
    return named.update(g, s, PARAMS)

  for _ in range(2):
    u, state = run_mapped(mapping, step, grads, state)
  return u, state


# Each distinct code path (standard with a correction, the two-fold group
# weights, LOO with either estimator) under shard_map, two under pmap
# (maintenance mode); vmap(axis_name) is in tests/test_properties.py.
CONFIGS = [(None, "jackknife"), ("twofold", "jackknife"), ("symmetric", "paper"),
           ("loo", "jackknife"), ("loo", "paper")]


@pytest.mark.parametrize("mapping,scheme,estimator", [
    ("shard_map",) + c for c in CONFIGS] + [
        ("pmap", "loo", "jackknife"), ("pmap", "symmetric", "paper")])
def test_adam_named_axis_equals_stacked(mapping, scheme, estimator):
  grads = _grads(8)
  make = lambda axis: bcopt.scale_by_adam_bc(
      cross_fit=scheme, inverse_correction=estimator, axis_name=axis)
  u_ref, s_ref = _two_steps(make, grads, "stacked")
  u, s = _two_steps(make, grads, mapping)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s, s_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mapping", CURRENT_MAPPINGS)
def test_one_microbatch_per_member(mapping):
  """M_local = 1 on 4 members: M = 4 global microbatches."""
  grads = _grads(4, seed=1)
  make = lambda axis: bcopt.scale_by_adam_bc(
      cross_fit="symmetric", inverse_correction="jackknife", axis_name=axis)
  u_ref, _ = _two_steps(make, grads, "stacked")
  u, _ = _two_steps(make, grads, mapping)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mapping", ["shard_map"])
def test_companions_named_axis(mapping):
  grads = _grads(8, seed=2)
  grads["b"] = grads["b"].at[5, 0].set(jnp.nan)
  make = lambda axis: bcopt.apply_if_finite(optax.chain(
      bcopt.clip_by_global_norm(0.5, axis_name=axis),
      bcopt.adamw_bc(1e-2, axis_name=axis)), 2, axis_name=axis)
  u_ref, s_ref = _two_steps(make, grads, "stacked")
  u, s = _two_steps(make, grads, mapping)
  assert int(s.notfinite_count) == int(s_ref.notfinite_count) == 2
  chex.assert_trees_all_close(u, u_ref)
  clean = _grads(8, seed=3)
  u_ref, _ = _two_steps(make, clean, "stacked")
  u, _ = _two_steps(make, clean, mapping)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-7)


def test_too_few_microbatches_names_the_axis():
  tx = bcopt.scale_by_adam_bc(cross_fit="twofold", axis_name=AXIS)
  grads = _grads(2)
  with pytest.raises(ValueError, match=f"M >= 4.*axis '{AXIS}'"):
    jax.vmap(lambda g: tx.update(g, tx.init(PARAMS), PARAMS),
             axis_name=AXIS)(jax.tree.map(lambda x: x[:, None], grads))
