"""optax's contract for optimizers, adapted to microbatched gradients.

Mirrors optax's own matrix for contributed optimizers
(``optax/contrib/_common_test.py``) and its sharding tests
(``optax/_src/sharding_test.py``), run over every public optimizer, every
cross-fit scheme and every inverse correction, and (where optax wraps its
optimizers) over bcopt's wrappers. Gradients are microbatched: every leaf
carries a leading axis of ``M`` microbatch gradients, each the true gradient
of the target plus zero-mean noise. Sophia-BC gets ``curvature=`` (the
absolute value of a Hutchinson estimate per microbatch) where optax's Sophia
gets ``obj_fn``.

1. ``update`` accepts keyword arguments it does not expect (optax chains
   forward every extra argument to every member), and a jitted step does not
   trace again on its second call.
2. ``optax.tree.map_params`` maps the state, and the optimizer converges on
   optax's parabola, Rosenbrock, matrix and mixed (tuple) targets.
3. ``optax.inject_hyperparams`` gives the plain optimizer's updates and state.
4. Updates keep the parameters' dtype (bfloat16 and float32), moments are
   float32 by default, and the state's types do not change in an update.
5. ``init`` works on ``jax.ShapeDtypeStruct`` parameters and gives the
   shapes and dtypes of the concrete ``init``.
6. On an Explicit mesh the state's sharding types (``jax.typeof``) are the
   same after ``init`` and ``update``, with and without ``jit``, for
   replicated and for sharded parameters, and updates have the parameters'
   types.

Expected values are the targets' known minima and exact identities (the
plain optimizer's values, concrete ``init``'s shapes, types before the
update), never the code under test in another configuration of itself.
Speed: compiling dominates, so each configuration compiles once per check:
one ``lax.scan`` runs all four targets side by side and covers 1 and 2, one
``jit`` holds the plain and the injected optimizer, one the two dtypes.
Noise is drawn by numpy outside the compiled code. Shampoo, whose compiles
cost seconds, gets fewer configurations in 1-3 (see ``RUN_CONFIGS``).
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt

M = 4  # microbatches per step (two groups of two for the two-fold schemes)
NOISE = 0.5  # standard deviation of each microbatch's gradient noise

FACTORIES = {"adamw_bc": bcopt.adamw_bc, "sophia_bc": bcopt.sophia_bc,
             "shampoo_bc": bcopt.shampoo_bc, "soap_bc": bcopt.soap_bc}
SCHEMES = {"adamw_bc": (None, "twofold", "symmetric", "loo"),
           "sophia_bc": (None, "twofold", "symmetric", "loo"),
           "shampoo_bc": (None, "twofold", "symmetric"),
           # SOAP's schemes are AdamW-BC's code (tests/test_soap.py):
           # one rotating the stack, one rotating group means.
           "soap_bc": ("twofold", "loo")}
DEFAULT_SCHEME = {"adamw_bc": "loo", "sophia_bc": "loo",
                  "shampoo_bc": "twofold", "soap_bc": "loo"}
# Hyperparameters of the contract runs (lr: peak of a cosine decay in the
# convergence runs, the constant rate elsewhere). Shampoo computes roots every
# 4 steps, so root and cached steps both occur.
KWARGS = {
    "adamw_bc": dict(learning_rate=0.1, weight_decay=1e-4),
    "sophia_bc": dict(learning_rate=0.1, weight_decay=1e-4, rho=0.02),
    "shampoo_bc": dict(learning_rate=0.1, weight_decay=1e-4,
                       precondition_every=4),
    "soap_bc": dict(learning_rate=0.1, weight_decay=1e-4,
                    precondition_every=4),
}
# Structural integers that set shapes or the period of the root steps: static
# under inject_hyperparams, like optax's ``ns_steps`` or ``update_proj_gap``.
STATIC_HPARAMS = ("block_size", "precondition_every", "variance_groups",
                  "max_precond_dim")


# Every scheme with the default estimator, then every other estimator with
# the family's default scheme.
SCHEME_CONFIGS = [(f, scheme, "jackknife")
                  for f in FACTORIES for scheme in SCHEMES[f]]
CONFIGS = SCHEME_CONFIGS + [(f, DEFAULT_SCHEME[f], estimator)
                            for f in FACTORIES for estimator in (None, "paper")]
DEFAULTS = [(f, DEFAULT_SCHEME[f], "jackknife") for f in FACTORIES]
# Shampoo's and SOAP's compiles cost seconds each (eigendecompositions in a
# cond), so the compiled checks give them fewer configurations: their
# estimators share the scheme code (test_shampoo.py and test_soap.py check
# their values), and their schemes share the code that reads the
# hyperparameters (for inject_hyperparams).
MATRIX = ("shampoo_bc", "soap_bc")
RUN_CONFIGS = [c for c in CONFIGS
               if c[0] not in MATRIX or c in SCHEME_CONFIGS]
INJECT_CONFIGS = [c for c in SCHEME_CONFIGS
                  if c[0] not in MATRIX or c in DEFAULTS]


def _id(config):
  return "-".join(str(c) for c in config)


def _optimizer(family, scheme, estimator, **overrides):
  kwargs = dict(KWARGS[family], cross_fit=scheme,
                inverse_correction=estimator)
  kwargs.update(overrides)
  return FACTORIES[family](**kwargs)


def _wrap(opt):
  """bcopt's wrappers around an optimizer: clipping, skipping, averaging."""
  return optax.chain(
      bcopt.apply_if_finite(
          optax.chain(bcopt.clip_by_global_norm(1e3), opt), 3),
      bcopt.bema())


# Targets: optax/contrib/_common_test.py's, with their known minima.


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return (jnp.array([-1.0, 10.0, 1.0], dtype), final,
          lambda p: jnp.sum(jnp.square(p - final)))


def _rosenbrock(dtype):
  a, b = 1.0, 100.0
  return (jnp.zeros(2, dtype), jnp.array([a, a**2], dtype),
          lambda p: jnp.square(a - p[0]) + b * jnp.square(p[1] - p[0]**2))


def _matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return (jnp.zeros((2, 2), dtype), final,
          lambda p: jnp.sum(jnp.square(p - final)))


def _mixed_tensor_target(dtype):
  final = (jnp.array([1.0, -1.0, 2.0], dtype),
           jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

  def obj_fn(params):
    return sum(jnp.sum(jnp.square(p - f)) for p, f in zip(params, final))

  return (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), final, obj_fn


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock,
           "matrix": _matrix_parabola, "mixed": _mixed_tensor_target}


def _noise(params, steps, seed=0):
  """Per step and leaf: ``M`` gradient noises (normal, standard deviation
  ``NOISE``) and ``M`` Rademacher probes, drawn by numpy (outside the compiled
  code: sampling inside it costs more compile time than the optimizer)."""
  rng = np.random.default_rng(seed)
  def draw(p, probe):
    shape = (steps, M) + jnp.shape(p)
    if probe:
      return jnp.asarray(rng.choice([-1.0, 1.0], size=shape), jnp.float32)
    return jnp.asarray(NOISE * rng.normal(size=shape), jnp.float32)
  return (jax.tree.map(lambda p: draw(p, False), params),
          jax.tree.map(lambda p: draw(p, True), params))


def _microbatched_grads(obj_fn, params, noise):
  """``M`` microbatch gradients: the true gradient plus zero-mean noise."""
  return jax.tree.map(lambda g, n: g + n.astype(g.dtype),
                      jax.grad(obj_fn)(params), noise)


def _curvature(obj_fn, params, probes):
  """Sophia's ``M`` microbatch curvature estimates: ``|z * (H z)|``, the
  absolute value of Hutchinson's estimate (bcopt.hutchinson_diag's formula)
  with the given Rademacher probes ``z``."""
  def one(z):
    _, hz = jax.jvp(jax.grad(obj_fn), (params,), (z,))
    return jax.tree.map(lambda a, b: jnp.abs(a * b), z, hz)
  return jax.vmap(one)(probes)


# 1-2. Extra arguments, no second trace, map_params, convergence.
#
# optax's test_optimizers_accept_extra_args and test_optimizers in one run
# per configuration, because compiling dominates the cost: the four targets
# are separable, so one optimizer on the tuple of their parameters is the
# four runs side by side (every bcopt transform is per-leaf except the
# global-norm clip, which the wrapped runs keep inactive).


def _run(opt, family, steps, chunks=2):
  """Optimizes the tuple of all targets; returns (params, minima, state)."""
  targets = [TARGETS[name](jnp.float32) for name in TARGETS]
  initial = tuple(t[0] for t in targets)
  final = tuple(t[1] for t in targets)

  def obj_fn(params):
    return sum(t[2](p) for t, p in zip(targets, params))

  def step(carry, xs):
    params, state = carry
    t, noise, probes = xs
    grads = _microbatched_grads(obj_fn, params, noise)
    extra = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}
    if family == "sophia_bc":  # refresh the curvature every other step
      updates, state = jax.lax.cond(
          t % 2 == 0,
          lambda: opt.update(grads, state, params, **extra,
                             curvature=_curvature(obj_fn, params, probes)),
          lambda: opt.update(grads, state, params, **extra))
    else:
      updates, state = opt.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state), None

  chex.clear_trace_counter()  # chex counts per code object, across tests

  @jax.jit
  @chex.assert_max_traces(n=1)  # the second call must not trace again
  def run(carry, xs):
    return jax.lax.scan(step, carry, xs)[0]

  state = opt.init(initial)
  # A no-op change, to verify that map_params works (as optax's test).
  mapped = optax.tree.map_params(opt, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)
  state = mapped
  carry = (initial, state)
  xs = (jnp.arange(steps),) + _noise(initial, steps)
  for chunk in range(chunks):
    carry = run(carry, jax.tree.map(
        lambda x: np.split(x, chunks)[chunk], xs))
  return carry[0], final, carry[1]


STEPS = 2000


def _check_run(config, wrap=False):
  family = config[0]
  lr = optax.cosine_decay_schedule(KWARGS[family]["learning_rate"], STEPS)
  opt = _optimizer(*config, learning_rate=lr)
  if wrap:
    opt = _wrap(opt)
  params, final, _ = _run(opt, family, STEPS)
  for name, p, f in zip(TARGETS, params, final):
    chex.assert_trees_all_close(p, f, rtol=0.0, atol=5e-2,
                                custom_message=f"target {name}")


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=_id)
def test_extra_args_one_trace_map_params_and_convergence(config):
  """The family defaults run inside bcopt's wrappers (clip, skip, average)."""
  _check_run(config, wrap=config in DEFAULTS)


# 3. inject_hyperparams.


def _inject_data(steps=2):
  """optax's inject test tree (a list of a matrix and a rank-3 array), with
  ``M`` random microbatch gradients and positive curvatures per step (leaves
  ``(steps, M) + shape``)."""
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  rng = np.random.default_rng(1)
  def draw(p):
    return jnp.asarray(rng.normal(size=(steps, M) + p.shape) + 0.5,
                       jnp.float32)
  return (params, jax.tree.map(draw, params),
          jax.tree.map(lambda p: jnp.abs(draw(p)), params))


# Dyadic hyperparameters: exact in float32, and so are their complements
# (1 - b), so Python floats and injected float32 arrays give the same values.
INJECT_KWARGS = {
    "adamw_bc": dict(learning_rate=2**-4, b1=1 - 2**-3, b2=1 - 2**-9,
                     eps=2**-20, weight_decay=2**-10),
    "sophia_bc": dict(learning_rate=2**-4, b1=1 - 2**-3, b2=1 - 2**-4,
                      rho=2**-5, eps=2**-30, clip=1.0, weight_decay=2**-10),
    "shampoo_bc": dict(learning_rate=2**-4, b1=1 - 2**-3, b2=1 - 2**-4,
                       damping=2**-10, weight_decay=2**-10,
                       precondition_every=2, fallback_b2=1 - 2**-9,
                       fallback_eps=2**-20),
    "soap_bc": dict(learning_rate=2**-4, b1=1 - 2**-3, b2=1 - 2**-4,
                    eps=2**-20, shampoo_b2=1 - 2**-4, damping=2**-10,
                    weight_decay=2**-10, precondition_every=2),
}


@pytest.mark.parametrize("config", INJECT_CONFIGS, ids=_id)
def test_inject_hyperparams_gives_the_same_updates_and_state(config):
  family, scheme, estimator = config
  factory = FACTORIES[family]
  hparams = dict(INJECT_KWARGS[family], cross_fit=scheme,
                 inverse_correction=estimator)
  static = [name for name in STATIC_HPARAMS
            if name in inspect.signature(factory).parameters]
  opt = factory(**hparams)
  opt_inject = optax.inject_hyperparams(factory, static_args=static)(**hparams)
  params, grads, curvatures = _inject_data()

  def run(tx):  # a root step, then a cached one
    def step(state, xs):
      t, g, c = xs
      if family == "sophia_bc":
        return jax.lax.cond(
            t == 0, lambda: tx.update(g, state, params, curvature=c)[::-1],
            lambda: tx.update(g, state, params)[::-1])
      return tx.update(g, state, params)[::-1]
    return jax.lax.scan(step, tx.init(params),
                        (jnp.arange(2), grads, curvatures))[::-1]

  (updates, state), (updates_inject, state_inject) = jax.jit(
      lambda: (run(opt), run(opt_inject)))()
  chex.assert_trees_all_equal(updates_inject, updates)
  chex.assert_trees_all_equal(state_inject.inner_state, state)


def test_inject_hyperparams_names_the_static_integers():
  """Shampoo's shape-setting integers cannot be traced: the error says to
  pass them in ``static_args`` (the check runs at trace time, under jit)."""
  params = {"w": jnp.zeros((3, 2))}
  opt = optax.inject_hyperparams(bcopt.shampoo_bc)(learning_rate=0.1)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(opt.init)(params)


# 4. Dtypes.


def _small_update(opt, family, params, grads):
  kwargs = {"curvature": jax.tree.map(jnp.abs, grads)} if (
      family == "sophia_bc") else {}
  return opt.update(grads, opt.init(params), params, **kwargs)


@pytest.mark.parametrize("config", DEFAULTS, ids=_id)
def test_preserve_dtype(config):
  """Updates in the parameters' dtype, moments in float32 (the documented
  default, also for bfloat16 parameters), and the state's types unchanged
  by an update (optax's test_preserve_dtype and
  test_state_shape_dtype_shard_stability)."""
  family = config[0]
  opt = _optimizer(*config)
  rng = np.random.default_rng(2)
  shapes = {"v": (3,), "w": (3, 2)}

  def case(dtype):
    params = {k: jnp.asarray(rng.normal(size=s), dtype)
              for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.normal(size=(M,) + s), dtype)
             for k, s in shapes.items()}
    return params, grads

  cases = {name: case(jnp.dtype(name)) for name in ("bfloat16", "float32")}
  results = jax.jit(lambda c: {
      d: (opt.init(p),) + _small_update(opt, family, p, g)
      for d, (p, g) in c.items()})(cases)
  for dtype, (state0, updates, state1) in results.items():
    chex.assert_trees_all_equal_dtypes(updates, cases[dtype][0])
    assert jax.tree.map(jax.typeof, state1) == jax.tree.map(
        jax.typeof, state0)
    inner = state0[0]  # the bcopt block's state, ahead of optax's
    assert inner.count.dtype == jnp.int32
    for name, field in inner._asdict().items():
      if name != "count":
        for leaf in jax.tree.leaves(field):
          assert leaf.dtype == jnp.float32, (dtype, name, leaf.dtype)


# 5. Abstract init.


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_init_with_abstract_input(config, wrap):
  opt = _optimizer(*config)
  if wrap:
    opt = _wrap(opt)
  params = {"b": jnp.zeros(8, jnp.bfloat16), "w": jnp.zeros((2, 4, 8))}
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  # The averagers' state starts as a copy of the parameters' values, so an
  # abstract init of a chain holding one is jax.eval_shape's.
  init = jax.eval_shape if wrap else lambda f, x: f(x)
  state = init(opt.init, abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(params))


# 6. Sharding types on an Explicit mesh.
#
# optax/_src/sharding_test.py's checks, with microbatched gradients, on a
# mesh of 2 x 4 devices: "model" shards parameters, "data" is there for the
# microbatch axis. One tree holds a replicated parameter and one sharded over
# "model" (on its second dimension, as optax's). The microbatch axis of the
# gradients is laid out by ``microbatch_spec``: None (unsharded) or sharded
# over "data" (tests/test_sharded.py checks the values there).

PARAM_SPECS = {"replicated": jax.P(), "sharded": jax.P(None, "model")}


@pytest.mark.parametrize("microbatch_spec", [None, "data"])
@pytest.mark.parametrize("config", DEFAULTS, ids=_id)
def test_state_sharding_types(config, microbatch_spec):
  family = config[0]
  opt = _optimizer(*config)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rng = np.random.default_rng(3)
  shape = (2, 8, 4)

  def put(shape, spec):
    return jax.device_put(jnp.asarray(rng.normal(size=shape), jnp.float32),
                          jax.NamedSharding(mesh, spec))

  with jax.set_mesh(mesh):
    params = {k: put(shape, spec) for k, spec in PARAM_SPECS.items()}
    grads = {k: put((M,) + shape, jax.P(microbatch_spec, *spec))
             for k, spec in PARAM_SPECS.items()}
    kwargs = {}
    if family == "sophia_bc":
      kwargs["curvature"] = jax.tree.map(jnp.abs, grads)

    state0 = opt.init(params)
    state1 = jax.jit(opt.init)(params)
    updates2, state2 = opt.update(grads, state0, params, **kwargs)
    updates3, state3 = jax.jit(
        lambda g, s, p, kw: opt.update(g, s, p, **kw))(
            grads, state0, params, kwargs)
    types = [jax.tree.map(jax.typeof, s)
             for s in (state0, state1, state2, state3)]
  assert "model" in jax.typeof(params["sharded"]).sharding.spec
  for t in types[1:]:
    chex.assert_trees_all_equal(t, types[0])
  for updates in (updates2, updates3):
    assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof,
                                                            params)
