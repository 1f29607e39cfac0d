"""bcopt.apply_if_finite and bcopt.clip_by_global_norm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bcopt

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


def _grads(seed, m=4, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=(m,) + p.shape), jnp.float32), PARAMS)


def test_clip_matches_optax_on_the_mean():
  for scale in [0.01, 10.0]:
    g = _grads(0, scale=scale)
    clip = bcopt.clip_by_global_norm(1.0)
    clipped, _ = clip.update(g, clip.init(PARAMS))
    ref, _ = optax.clip_by_global_norm(1.0).update(jax.tree.map(lambda x: x.mean(0), g), None)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.mean(0), clipped), ref, rtol=1e-6)
    # every microbatch scaled by the same factor
    ratios = jax.tree.leaves(jax.tree.map(lambda c, x: c / x, clipped, g))
    assert np.allclose(np.concatenate([r.ravel() for r in ratios]), ratios[0].ravel()[0], rtol=1e-6)
    chex.assert_shape(clipped["w"], (4, 3, 2))


def test_apply_if_finite_skips_and_keeps_state():
  inner = optax.chain(bcopt.clip_by_global_norm(1.0), bcopt.adamw_bc(1e-2))
  tx = bcopt.apply_if_finite(inner, max_consecutive_errors=2)
  state = tx.init(PARAMS)
  u, state = jax.jit(tx.update)(_grads(1), state, PARAMS)
  good_inner = state.inner_state
  bad = _grads(2)
  bad["w"] = bad["w"].at[3, 0, 1].set(jnp.inf)
  step = jax.jit(tx.update)
  for k in (1, 2):
    u, state = step(bad, state, PARAMS)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(state.inner_state, good_inner)
    assert int(state.notfinite_count) == k and not bool(state.last_finite)
  # a third consecutive bad step exceeds max_consecutive_errors: applied (optax semantics)
  u, state = step(bad, state, PARAMS)
  assert int(state.total_notfinite) == 3
  assert int(state.inner_state[1][0].count) == 2
  assert not np.all(np.isfinite(np.asarray(state.inner_state[1][0].nu["w"])))
  # (as in optax, giving up lets the bad gradient into the state)
  u, state = step(_grads(3), state, PARAMS)
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)


def test_apply_if_finite_equals_inner_on_finite_input():
  inner = bcopt.adamw_bc(1e-2, cross_fit="symmetric")
  tx = bcopt.apply_if_finite(inner, 3)
  s, r = tx.init(PARAMS), inner.init(PARAMS)
  # apply_if_finite runs `inner` compiled (inside lax.cond), so compare with
  # the compiled inner update: at step 1 with groups of 2, an opposite-sign
  # pair puts V/p^2 at exactly 1 (the clamp), where op-by-op and compiled
  # rounding (FMA contraction, fusion) may land on either side of it.
  inner_update = jax.jit(inner.update)
  for seed in range(3):
    u, s = tx.update(_grads(seed), s, PARAMS)
    v, r = inner_update(_grads(seed), r, PARAMS)
    chex.assert_trees_all_close(u, v, rtol=1e-5, atol=1e-10)


def test_multi_transform_of_microbatched_transforms():
  """optax.multi_transform works when every inner transform is microbatched."""
  labels = {"w": "bc", "b": "plain"}
  tx = optax.multi_transform(
      {"bc": bcopt.adamw_bc(1e-2), "plain": bcopt.adamw_bc(1e-2, cross_fit=None, inverse_correction=None)},
      labels)
  ref_bc, ref_plain = bcopt.adamw_bc(1e-2), bcopt.adamw_bc(1e-2, cross_fit=None, inverse_correction=None)
  g = _grads(5)
  u, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  u_w, _ = ref_bc.update({"w": g["w"]}, ref_bc.init({"w": PARAMS["w"]}), {"w": PARAMS["w"]})
  u_b, _ = ref_plain.update({"b": g["b"]}, ref_plain.init({"b": PARAMS["b"]}), {"b": PARAMS["b"]})
  chex.assert_trees_all_close(u, {"w": u_w["w"], "b": u_b["b"]}, rtol=1e-6)


def test_clip_chain_equals_the_update_of_the_clipped_gradients():
  """The clipping fuses into the next transform (per slice on CPU, see
  fusion.per_microbatch); values are those of the inner update of the
  clipped gradients computed on their own and stored (the clip alone is
  checked against optax above), for fully unrolled (M <= 64) and chunked
  loops, to float rounding (fused, XLA may contract the scaling into FMAs)."""
  params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
  for m, name in [(2, "adamw_bc"), (8, "adamw_bc"), (8, "shampoo_bc"), (32, "sophia_bc"), (65, "adamw_bc")]:
    rng = np.random.default_rng(m)
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(m,) + p.shape), jnp.float32), params)
    inner = getattr(bcopt, name)(1e-2)
    tx = optax.chain(bcopt.clip_by_global_norm(0.1), inner)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    clip = bcopt.clip_by_global_norm(0.1)
    clipped = jax.tree.map(np.asarray, jax.jit(clip.update)(g, clip.init(params))[0])
    assert float(clipped["w"][0, 0, 0] / g["w"][0, 0, 0]) < 0.5  # clipped
    v, _ = jax.jit(inner.update)(clipped, inner.init(params), params)
    chex.assert_trees_all_close(u, v, rtol=1e-5, atol=1e-8, custom_message=f"M={m}, {name}")


def test_clip_chain_does_not_store_the_clipped_gradients():
  """On CPU the scaled microbatch gradients (M x params) are not written out
  before Adam-BC's LOO update (they were: 6-7x the update's cost at M >= 8)."""
  params = {"w": jnp.ones((64, 64))}
  m = 8
  g = {"w": jax.random.normal(jax.random.key(0), (m, 64, 64))}
  tx = optax.chain(bcopt.clip_by_global_norm(1.0), bcopt.adamw_bc(1e-2))
  compiled = jax.jit(tx.update).lower(g, tx.init(params), params).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < m * 64 * 64 * 4
