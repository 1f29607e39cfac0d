"""BEMA and EMA of the iterates against a numpy restatement of SPEC section 6."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt


def reference_run(thetas, theta_init, ema_power, bias_power, lag, multiplier,
                  burn_in, update_every):
  """SPEC section 6 in float64; ``bias_power=None`` is plain EMA.

  Args:
    thetas: the iterates theta_1..theta_T (arrays).
    theta_init: the initial parameters.
    ema_power, bias_power, lag, multiplier, burn_in, update_every: kappa,
      eta, rho, gamma, tau, phi.

  Returns:
    Lists (average_t, ema_t) for t = 1..T.
  """
  snapshot = ema = average = np.asarray(theta_init, np.float64)
  averages, emas = [], []
  for t, theta in enumerate(thetas, start=1):
    theta = np.asarray(theta, np.float64)
    if t <= burn_in:
      snapshot = ema = average = theta
    else:
      s = t - burn_in
      if s % update_every == 0:
        base = lag + multiplier * s
        beta = base ** -ema_power
        ema = (1 - beta) * ema + beta * theta
        average = ema
        if bias_power is not None:
          average = base ** -bias_power * (theta - snapshot) + ema
    averages.append(average)
    emas.append(ema)
  return averages, emas


def _updates(seed, steps, dtype=jnp.float32):
  """A noisy path drifting towards 1: (initial params, per-step updates)."""
  rng = np.random.default_rng(seed)
  params = {"a": jnp.asarray(rng.normal(size=(3,)), dtype),
            "b": jnp.asarray(rng.normal(size=(2, 2)), dtype)}
  updates = [
      jax.tree.map(
          lambda p: jnp.asarray(0.2 * (1.0 - np.asarray(p, np.float64))
                                + 0.3 * rng.normal(size=p.shape), dtype),
          params)
      for _ in range(steps)]
  return params, updates


def _run(tx, params, updates, update_fn=None):
  """Runs ``tx`` (jitted by default); returns (thetas, averages, states)."""
  state = tx.init(params)
  update_fn = update_fn or jax.jit(tx.update)
  thetas, averages, states = [], [], []
  for u in updates:
    out, state = update_fn(u, state, params)
    params = optax.apply_updates(params, out)
    thetas.append(params)
    averages.append(bcopt.bema_params(state))
    states.append(state)
  return thetas, averages, states


def _leaf(trees, key):
  return [np.asarray(t[key], np.float64) for t in trees]


CONFIGS = [
    dict(),
    dict(burn_in=3),
    dict(update_every=3),
    dict(burn_in=2, update_every=4),
    dict(ema_power=1.0, bias_power=0.5),
    dict(ema_power=0.0),
    dict(lag=0.0, multiplier=1.0),
    dict(lag=5.0, multiplier=2.5, bias_power=0.4),
    dict(lag=4.0, multiplier=0.0, burn_in=1, update_every=2),
]
DEFAULTS = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
                burn_in=0, update_every=1)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bema", "ema"])
def test_matches_numpy_restatement(config, with_bias):
  hp = {**DEFAULTS, **config}
  if not with_bias:
    hp["bias_power"] = None
    tx = bcopt.ema(**{k: v for k, v in hp.items() if k != "bias_power"})
  else:
    tx = bcopt.bema(**hp)
  params, updates = _updates(0, 13)
  with jax.disable_jit():  # many small configurations: skip compiling
    thetas, averages, states = _run(tx, params, updates, tx.update)
  for key in params:
    expected, emas = reference_run(_leaf(thetas, key), params[key], **hp)
    for t, (got, want) in enumerate(zip(_leaf(averages, key), expected), 1):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key}, step {t}")
    np.testing.assert_allclose(states[-1].ema[key], emas[-1], rtol=1e-5,
                               atol=1e-6)
  assert int(states[-1].count) == 13


def test_ema_is_bema_without_the_alpha_term():
  hp = dict(ema_power=0.7, lag=3.0, multiplier=2.0, burn_in=2, update_every=2)
  params, updates = _updates(1, 9)
  _, ema_avgs, ema_states = _run(bcopt.ema(**hp), params, updates)
  _, _, bema_states = _run(bcopt.bema(bias_power=0.3, **hp), params, updates)
  for e, b, avg in zip(ema_states, bema_states, ema_avgs):
    chex.assert_trees_all_close(e.ema, b.ema, rtol=1e-6)
    chex.assert_trees_all_close(avg, e.ema, rtol=1e-6)


def test_zero_bias_power_is_not_plain_ema():
  # alpha = (rho + gamma s)^0 = 1: the average is theta_t - theta_0 + EMA.
  params, updates = _updates(2, 6)
  thetas, avgs, _ = _run(bcopt.bema(bias_power=0.0), params, updates)
  _, ema_avgs, _ = _run(bcopt.ema(), params, updates)
  expected, _ = reference_run(_leaf(thetas, "a"), params["a"],
                              **{**DEFAULTS, "bias_power": 0.0})
  np.testing.assert_allclose(_leaf(avgs, "a")[-1], expected[-1], rtol=1e-5)
  np.testing.assert_allclose(
      _leaf(avgs, "a")[-1],
      _leaf(thetas, "a")[-1] - np.asarray(params["a"]) + _leaf(ema_avgs, "a")[-1],
      rtol=1e-5, atol=1e-6)
  assert not np.allclose(_leaf(avgs, "a")[-1], _leaf(ema_avgs, "a")[-1])


@pytest.mark.parametrize("averager", [bcopt.bema, bcopt.ema])
def test_updates_pass_through_untouched(averager):
  params, updates = _updates(3, 1)
  tx = averager()
  out, _ = tx.update(updates[0], tx.init(params), params)
  assert out is updates[0]
  sgd = optax.sgd(0.1, momentum=0.9)
  chained = optax.chain(sgd, averager(update_every=2))
  s1, s2 = sgd.init(params), chained.init(params)
  sgd_update, chained_update = jax.jit(sgd.update), jax.jit(chained.update)
  for u in _updates(4, 4)[1]:
    u1, s1 = sgd_update(u, s1, params)
    u2, s2 = chained_update(u, s2, params)
    chex.assert_trees_all_equal(u1, u2)
    chex.assert_trees_all_equal_dtypes(u1, u2)
    params = optax.apply_updates(params, u1)


def test_update_without_params_raises():
  tx = bcopt.bema()
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="needs params"):
    optax.chain(optax.sgd(0.1), bcopt.ema()).update(
        params, optax.chain(optax.sgd(0.1), bcopt.ema()).init(params))


@pytest.mark.parametrize("factory,kwargs,name", [
    (bcopt.bema, dict(ema_power=-0.5), "ema_power"),
    (bcopt.bema, dict(bias_power=-0.2), "bias_power"),
    (bcopt.bema, dict(bias_power=float("nan")), "bias_power"),
    (bcopt.bema, dict(update_every=0), "update_every"),
    (bcopt.bema, dict(update_every=2.5), "update_every"),
    (bcopt.bema, dict(burn_in=-1), "burn_in"),
    (bcopt.bema, dict(multiplier=-1.0), "multiplier"),
    (bcopt.bema, dict(lag=-1.0), "lag"),
    (bcopt.bema, dict(lag=0.5, multiplier=0.0), "lag"),
    (bcopt.ema, dict(ema_power=-1.0), "ema_power"),
    (bcopt.ema, dict(update_every=0), "update_every"),
])
def test_bad_hyperparameters_raise(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)


def _sgd_then(averager, lr=0.1):
  return optax.chain(optax.sgd(lr), averager)


def test_bema_params_finds_the_state_in_containers():
  params, updates = _updates(5, 3)
  plain = _sgd_then(bcopt.bema())
  _, expected, _ = _run(plain, params, updates)
  containers = {
      "chain": plain,
      "nested chain": optax.chain(optax.identity(),
                                  optax.chain(optax.sgd(0.1), bcopt.bema())),
      "apply_if_finite": optax.apply_if_finite(_sgd_then(bcopt.bema()), 2),
      "inject_hyperparams": optax.inject_hyperparams(
          lambda learning_rate: _sgd_then(bcopt.bema(), learning_rate))(
              learning_rate=0.1),
      "masked": optax.masked(_sgd_then(bcopt.bema()),
                             jax.tree.map(lambda _: True, params)),
  }
  for name, tx in containers.items():
    _, got, _ = _run(tx, params, updates)
    chex.assert_trees_all_close(got[-1], expected[-1], rtol=1e-6,
                                custom_message=name)
  # Its own state, and the transform's own state inside a chain state.
  state = plain.init(params)
  chex.assert_trees_all_equal(bcopt.bema_params(state[1]),
                              bcopt.bema_params(state))


def test_bema_params_under_multisteps_counts_optimizer_steps():
  params, updates = _updates(6, 6)
  k = 3
  tx = optax.MultiSteps(_sgd_then(bcopt.bema()), k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = params
  for u in updates:
    out, state = update(u, state, p)
    p = optax.apply_updates(p, out)
  inner = state.inner_opt_state[1]
  assert int(inner.count) == len(updates) // k
  # The same as bema on the mean of each k micro-step gradients.
  means = [jax.tree.map(lambda *g: sum(g) / k, *updates[i:i + k])
           for i in range(0, len(updates), k)]
  _, expected, _ = _run(_sgd_then(bcopt.bema()), params, means)
  chex.assert_trees_all_close(bcopt.bema_params(state), expected[-1],
                              rtol=1e-5)


def test_rejected_steps_leave_the_average_alone():
  params, updates = _updates(7, 3)
  stack = lambda g: jax.tree.map(lambda x: jnp.stack([x, x]), g)  # M = 2
  for tx, expand in [
      (optax.apply_if_finite(_sgd_then(bcopt.bema()), 5), lambda g: g),
      (bcopt.apply_if_finite(
          optax.chain(bcopt.adamw_bc(0.1, cross_fit=None,
                                     inverse_correction=None),
                      bcopt.bema()), 5), stack)]:
    state = tx.init(params)
    update = jax.jit(tx.update)
    p = params
    out, state = update(expand(updates[0]), state, p)
    p = optax.apply_updates(p, out)
    before = bcopt.bema_params(state)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), updates[1])
    out, state = update(expand(bad), state, p)
    chex.assert_trees_all_equal(bcopt.bema_params(state), before)
    assert int(state.inner_state[1].count) == 1
    out, state = update(expand(updates[2]), state, p)
    assert int(state.inner_state[1].count) == 2


def test_bema_params_in_multi_transform_partition():
  params = {"x": jnp.ones(2), "y": jnp.full(3, 2.0)}
  tx = optax.multi_transform(
      {"avg": _sgd_then(bcopt.bema()), "raw": optax.sgd(0.1)},
      {"x": "avg", "y": "raw"})
  state = tx.init(params)
  updates, state = tx.update(
      {"x": jnp.ones(2), "y": jnp.ones(3)}, state, params)
  avg = bcopt.bema_params(state)
  assert isinstance(avg["y"], optax.MaskedNode)
  _, expected, _ = _run(_sgd_then(bcopt.bema()), {"x": params["x"]},
                        [{"x": jnp.ones(2)}])
  chex.assert_trees_all_close(avg["x"], expected[-1]["x"])


def test_bema_params_errors():
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="no bcopt.bema or bcopt.ema state"):
    bcopt.bema_params(optax.adam(1e-3).init(params))
  both = optax.chain(optax.sgd(0.1), bcopt.ema(), bcopt.bema())
  with pytest.raises(ValueError, match=r"found 2 averaging states"):
    bcopt.bema_params(both.init(params))
  state = both.init(params)
  assert bcopt.bema_params(state[2]) is state[2].average


def test_injected_hyperparameters_match_constants():
  params, updates = _updates(8, 7)
  hp = dict(ema_power=0.6, bias_power=0.3, lag=4.0, multiplier=1.5)
  tx = optax.inject_hyperparams(bcopt.bema, static_args=(
      "burn_in", "update_every"))(**hp, burn_in=1, update_every=2)
  _, got, _ = _run(tx, params, updates, jax.jit(tx.update))
  _, want, _ = _run(bcopt.bema(**hp, burn_in=1, update_every=2), params,
                    updates)
  chex.assert_trees_all_close(got[-1], want[-1], rtol=1e-6)


def test_bf16_params():
  params, updates = _updates(9, 8, jnp.bfloat16)
  tx = bcopt.bema(update_every=2)
  thetas, avgs, states = _run(tx, params, updates, jax.jit(tx.update))
  state = states[-1]
  chex.assert_trees_all_equal_dtypes(state.average, params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      (state.snapshot, state.ema)))
  chex.assert_trees_all_equal_dtypes(avgs[-1], params)
  for key in params:
    expected, emas = reference_run(_leaf(thetas, key), params[key],
                                   **{**DEFAULTS, "update_every": 2})
    np.testing.assert_allclose(state.ema[key], emas[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(avgs[-1][key], np.float64),
                               expected[-1], rtol=2**-8, atol=1e-3)
  low = bcopt.ema(dtype=jnp.bfloat16).init(params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(low.ema))


@pytest.mark.parametrize("averager", [bcopt.bema, bcopt.ema])
def test_jit_equals_eager_without_retracing(averager):
  params, updates = _updates(10, 7)
  tx = _sgd_then(averager(burn_in=2, update_every=2))
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(u, state, p):
    return tx.update(u, state, p)

  # Burn-in, refresh and hold steps all go through the one trace.
  _, jitted, _ = _run(tx, params, updates, step)
  with jax.disable_jit():
    _, eager, _ = _run(tx, params, updates, tx.update)
  for a, b in zip(jitted, eager):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_train_step_can_donate_params_and_state():
  params, updates = _updates(11, 4)
  tx = _sgd_then(bcopt.bema(burn_in=2))  # a reset sets snapshot = EMA

  def step(p, state, u):
    out, state = tx.update(u, state, p)
    return optax.apply_updates(p, out), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  p = jax.tree.map(jnp.copy, params)
  for u in updates:
    p, state = step(p, state, u)
  chex.assert_tree_all_finite(bcopt.bema_params(state))
