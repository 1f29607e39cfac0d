"""bcopt's optimizer states checkpoint with orbax as they are (arrays only)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import bcopt


def noisy_path(seed, steps):
  """Initial params and per-step updates of a noisy path towards 1."""
  rng = np.random.default_rng(seed)
  params = {"a": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  updates = [jax.tree.map(
      lambda p: jnp.asarray(0.2 * (1.0 - np.asarray(p, np.float64))
                            + 0.3 * rng.normal(size=p.shape), jnp.float32),
      params) for _ in range(steps)]
  return params, updates


def test_bema_state_orbax_round_trip(tmp_path):
  params, updates = noisy_path(12, 4)
  params = {**params, "h": jnp.ones(2, jnp.bfloat16)}
  updates = [{**u, "h": jnp.full(2, 0.1, jnp.bfloat16)} for u in updates]
  tx = optax.chain(optax.adam(0.1), bcopt.bema(update_every=2))
  state = tx.init(params)
  p = params
  update = jax.jit(tx.update)
  for u in updates[:3]:
    out, state = update(u, state, p)
    p = optax.apply_updates(p, out)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / "state", abstract)
  assert isinstance(restored[1], bcopt.BEMAState)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  out_a, state_a = update(updates[3], state, p)
  out_b, state_b = update(updates[3], restored, p)
  chex.assert_trees_all_equal(bcopt.bema_params(state_a),
                              bcopt.bema_params(state_b))
  chex.assert_trees_all_equal(out_a, out_b)
