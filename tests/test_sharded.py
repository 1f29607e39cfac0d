"""A stacked microbatch axis sharded over devices under jit (docs/scale_out.md).

Every transform is run twice on the same inputs: unsharded on one device
(the reference), and under ``jit`` on a ``data=4, fsdp=2`` mesh of simulated
CPU devices with the microbatch axis of the gradients sharded over
``"data"``, for Explicit and Auto axis types and three parameter layouts:

* ``replicated``: parameters and state on every device;
* ``fsdp``: the first dimension of ``w`` (and of its state) over ``"fsdp"``;
* ``same``: that dimension over ``"data"`` itself (ZeRO-style).

The results must agree to float rounding, the state must keep its sharding
types (optax's ``sharding_test.py``: ``jax.tree.map(jax.typeof, state)``
before and after, with and without jit), and the compiled update must not
gather the microbatch axis: no all-gather with replicated parameters, and no
more scratch memory per device than the same update under ``shard_map``
with ``axis_name`` (each family on 4 devices, Sophia also on 8).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import bcopt

M = 8  # microbatches: two per member of "data"
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6),
          "b": jnp.linspace(0.5, 1.0, 6)}
LAYOUTS = {"replicated": P(), "fsdp": P("fsdp"), "same": P("data")}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def _grads(seed=0, shift=0.3):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {name: shift + jax.random.normal(k, (M,) + p.shape)
          for (name, p), k in zip(sorted(PARAMS.items()), keys)}


def _sophia(cross_fit):
  """Two steps: a curvature refresh, then a cached step."""
  tx = bcopt.sophia_bc(1e-2, cross_fit=cross_fit)

  def run(grads, state, params):
    curvature = jax.tree.map(jnp.square, grads)
    u1, state = tx.update(grads, state, params, curvature=curvature)
    u2, state = tx.update(jax.tree.map(lambda g: 0.5 * g, grads), state,
                          params)
    return (u1, u2), state
  return tx.init, run


def _two_steps(tx):
  def run(grads, state, params):
    u1, state = tx.update(grads, state, params)
    u2, state = tx.update(jax.tree.map(lambda g: -0.5 * g, grads), state,
                          params)
    return (u1, u2), state
  return tx.init, run


def _stateless(fn):
  return lambda params: (), lambda grads, state, params: (fn(grads), state)


def _rmsprop_cross_fit(grads):
  nu = jax.tree.map(lambda p: jnp.full_like(p, 0.1), PARAMS)
  return bcopt.cross_fit(
      grads, numerator_fn=lambda g: g,
      denominator_fn=lambda s: jax.tree.map(
          lambda v, x: jnp.sqrt(0.9 * v + 0.1 * x**2) + 1e-8, nu, s))


def _diag_estimates(grads):
  """gnb_diag and hutchinson_diag vmapped over microbatches of inputs."""
  del grads
  x = jax.random.normal(jax.random.key(3), (M, 5, 8))
  keys = jax.random.split(jax.random.key(4), M)
  logits = lambda p, xb: jnp.tanh(xb @ p["w"]) + p["b"]
  loss = lambda p, xb: jnp.mean(logits(p, xb) ** 2)
  gnb = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))(
      logits, PARAMS, x, keys)
  hutch = jax.vmap(bcopt.hutchinson_diag, in_axes=(None, None, 0, 0))(
      loss, PARAMS, x, keys)
  return gnb, hutch


def _averaged(average):
  """AdamW-BC followed by an iterate average (the average goes last)."""
  return _two_steps(optax.chain(bcopt.adamw_bc(1e-2), average))


PROGRAMS = {
    "adam_loo": lambda: _two_steps(bcopt.adamw_bc(1e-2)),
    "adam_twofold_paper": lambda: _two_steps(bcopt.adamw_bc(
        1e-2, cross_fit="twofold", inverse_correction="paper")),
    "adam_symmetric": lambda: _two_steps(bcopt.adamw_bc(
        1e-2, cross_fit="symmetric")),
    "adam_standard": lambda: _two_steps(bcopt.adamw_bc(
        1e-2, cross_fit=None)),
    "adam_diagnostics": lambda: _two_steps(bcopt.adamw_bc(
        1e-2, cross_fit="twofold", diagnostics=True)),
    "sophia_loo": lambda: _sophia("loo"),
    "sophia_twofold": lambda: _sophia("twofold"),
    "shampoo_twofold": lambda: _two_steps(bcopt.shampoo_bc(
        1e-2, precondition_every=2)),
    "shampoo_blocked_graft": lambda: _two_steps(bcopt.shampoo_bc(
        1e-2, cross_fit="symmetric", block_size=4, graft="adam",
        precondition_every=1)),
    # Tiles of 4 x 3: every eigenvalue of the factors stays simple (a
    # repeated one's eigenvectors would depend on the rounding).
    "soap_loo": lambda: _two_steps(bcopt.soap_bc(
        1e-2, block_size=4, precondition_every=1)),
    "soap_twofold": lambda: _two_steps(bcopt.soap_bc(
        1e-2, cross_fit="twofold", block_size=4, variance_groups=2)),
    "clip_chain": lambda: _two_steps(optax.chain(
        bcopt.clip_by_global_norm(0.5), bcopt.adamw_bc(1e-2))),
    "apply_if_finite": lambda: _two_steps(
        bcopt.apply_if_finite(bcopt.adamw_bc(1e-2), 2)),
    "ema": lambda: _averaged(bcopt.ema(lag=1.0)),
    "bema": lambda: _averaged(bcopt.bema(lag=1.0)),
    "cross_fit": lambda: _stateless(_rmsprop_cross_fit),
    "microbatch_mean": lambda: _stateless(bcopt.microbatch_mean),
    "curvature_estimates": lambda: _stateless(_diag_estimates),
}


def _mesh(axis_type):
  return jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(AXIS_TYPES[axis_type],) * 2)


def _param_spec(layout, x):
  """``w``-shaped arrays (8, 6) follow the layout; everything else is
  replicated."""
  return LAYOUTS[layout] if jnp.shape(x) == PARAMS["w"].shape else P()


def _put(tree, mesh, spec_fn):
  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, spec_fn(x))), tree)


def _shard_inputs(mesh, layout, grads, params):
  def grad_spec(g):
    inner = _param_spec(layout, g[0])
    return P("data", *inner) if "data" not in tuple(inner) else P("data")
  return _put(grads, mesh, grad_spec), _put(
      params, mesh, functools.partial(_param_spec, layout))


CORE = ("adam_loo", "sophia_loo", "shampoo_twofold")
# (axis type, layout) -> the programs run there: every program where the
# layouts are hardest, one per family elsewhere (compiling for 8 devices
# dominates this file's time).
CASES = {("explicit", "fsdp"): tuple(PROGRAMS),
         ("explicit", "replicated"): tuple(PROGRAMS),
         ("auto", "same"): tuple(PROGRAMS),
         ("auto", "replicated"): CORE,
         ("auto", "fsdp"): CORE,
         ("explicit", "same"): CORE}


def _programs(names):
  """The programs ``names`` as one init and one run function (one
  compilation)."""
  programs = {name: PROGRAMS[name]() for name in names}
  init = lambda params: {n: p[0](params) for n, p in programs.items()}
  run = lambda grads, states, params: {
      n: p[1](grads, states[n], params) for n, p in programs.items()}
  return init, run


@functools.cache
def _reference():
  init, run = _programs(tuple(PROGRAMS))
  return jax.device_get(jax.jit(run)(_grads(), init(PARAMS), PARAMS))


@pytest.mark.parametrize("axis_type,layout", sorted(CASES))
def test_sharded_equals_unsharded(axis_type, layout):
  mesh = _mesh(axis_type)
  names = CASES[axis_type, layout]
  init, run = _programs(names)
  with jax.set_mesh(mesh):
    grads, params = _shard_inputs(mesh, layout, _grads(), PARAMS)
    states = jax.jit(init)(params)
    outs = jax.jit(run)(grads, states, params)
  expected = _reference()
  for name in names:
    # Shampoo's inverse roots amplify the rounding of small eigenvalues,
    # SOAP's bases that of close ones.
    rtol = 5e-4 if name.startswith(("shampoo", "soap")) else 2e-5
    chex.assert_trees_all_close(
        jax.device_get(outs[name]), expected[name], rtol=rtol, atol=1e-6,
        custom_message=name)
    if axis_type == "explicit":  # sharding types stable across the update
      chex.assert_trees_all_equal(
          jax.tree.map(jax.typeof, outs[name][1]),
          jax.tree.map(jax.typeof, states[name]), custom_message=name)


@pytest.mark.parametrize("name", ["adam_loo", "sophia_loo", "shampoo_twofold"])
def test_state_sharding_types_stable_without_jit(name):
  mesh = _mesh("explicit")
  init, run = PROGRAMS[name]()
  with jax.set_mesh(mesh):
    grads, params = _shard_inputs(mesh, "fsdp", _grads(), PARAMS)
    state = init(params)
    _, new_state = run(grads, state, params)
  chex.assert_trees_all_equal(jax.tree.map(jax.typeof, new_state),
                              jax.tree.map(jax.typeof, state))
  assert jax.typeof(new_state[0].mu["w"]).sharding.spec == P("fsdp", None)


# --- No gather, and no more memory than shard_map ---------------------------

MEMORY_SHAPE = (256, 128)  # 128 KiB per float32 parameter copy
FAMILIES = {
    "adam": (lambda a: bcopt.adamw_bc(1e-3, axis_name=a), False),
    "sophia": (lambda a: bcopt.sophia_bc(1e-3, axis_name=a), True),
    "shampoo": (lambda a: bcopt.shampoo_bc(1e-3, axis_name=a), False),
}


# Sophia at D = M: one microbatch per device, where a reduction computed
# twice (the step's and the cached inverse's) kept a duplicate collective and
# its buffer (benchmarks.sharded_memory at D = 8, before the two shared it).
MEMORY_CASES = [(family, 4) for family in sorted(FAMILIES)] + [("sophia", 8)]


def _compiled(family, mode, devices):
  """The compiled update on ``devices`` devices of "data": GSPMD on a
  stacked axis (``mode`` an axis type) or ``shard_map`` with ``axis_name``.
  Sophia's curvature is computed in the program from the gradients."""
  make, curvature = FAMILIES[family]
  params = {"w": jnp.ones(MEMORY_SHAPE)}
  grads = {"w": jnp.ones((M,) + MEMORY_SHAPE)}
  kw = lambda g: ({"curvature": jax.tree.map(jnp.square, g)} if curvature
                  else {})
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices],
                       axis_types=(AXIS_TYPES.get(mode, AxisType.Auto),))
  with jax.set_mesh(mesh):
    grads = _put(grads, mesh, lambda g: P("data"))
    if mode == "shard_map":
      tx = make("data")
      step = jax.shard_map(lambda g, s: tx.update(g, s, params, **kw(g)),
                           mesh=mesh, in_specs=(P("data"), P()),
                           out_specs=P())
    else:
      tx = make(None)
      step = lambda g, s: tx.update(g, s, params, **kw(g))
    return jax.jit(step).lower(grads, tx.init(params)).compile()


@pytest.mark.parametrize("family,devices", MEMORY_CASES)
def test_no_gather_and_memory_at_most_shard_map(family, devices):
  limit = _compiled(family, "shard_map",
                    devices).memory_analysis().temp_size_in_bytes
  for mode in AXIS_TYPES:
    compiled = _compiled(family, mode, devices)
    assert "all-gather" not in compiled.as_text(), (family, mode)
    temp = compiled.memory_analysis().temp_size_in_bytes
    # Scalars may differ (collectives pack them differently): 1 KiB, against
    # 128 KiB per copy of the parameter.
    assert temp <= limit + 1024, (family, devices, mode, temp, limit)
