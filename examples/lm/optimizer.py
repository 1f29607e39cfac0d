"""The optimizers of the example: one table and the chain built from it.

``OPTIMIZERS`` maps each ``--optimizer`` name to an ``Optimizer``: a factory
called as ``factory(learning_rate, weight_decay=..., mask=...,
axis_name=..., **kwargs)`` that returns a transform of microbatched
gradients, its keyword arguments, and its periodic step kind (Sophia's
curvature refresh, Shampoo's root step), compiled apart from its other
steps.
The ``_bc`` entries use the paper's reference settings (with each family's
headline scheme); the plain entries are the same transforms
with the bias corrections off. ``--cross-fit``/``--inverse-correction``
override those two keyword arguments of any entry that has them, and
``--hparam NAME=VALUE`` any other (parsed as the table's value's type).

An optax optimizer that takes mean gradients joins the table through
``mean_gradient``, which feeds it the microbatch mean (across devices too);
one more entry in the table below is all it takes (the flag's choices are
the table's names), e.g.::

    "lion": Optimizer(mean_gradient(optax.lion), dict(b1=0.9, b2=0.99)),

``make(cfg)`` chains ``bcopt.clip_by_global_norm``, the
optimizer and the ``--average`` transforms (``bcopt.ema``/``bcopt.bema``,
in that order, last so they see the parameters after each update);
``averaged_params(cfg, opt_state)`` reads the averages back out.

``monitor(cfg)`` is the run's bias monitor (docs/monitor.md): from a step's
microbatch gradients and the state before it, the gradient noise scale and,
for bcopt entries, the coupling and Jensen shares (Sophia also the win
rate), without changing the state.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import bcopt

if TYPE_CHECKING:
  from examples.lm.config import Config


class Optimizer(NamedTuple):
  """One ``--optimizer`` choice."""

  factory: Callable[..., optax.GradientTransformation]   # see module doc
  kwargs: dict[str, Any]   # passed to the factory (overridable switches)
  curvature: bool = False  # takes ``curvature=`` (GNB) on refresh steps
  root_step: bool = False  # takes ``root_step=`` (Shampoo-BC): root and
  #                          other steps compile apart, so the other steps
  #                          hold no root-step scratch memory


def mean_gradient(factory: Callable[..., optax.GradientTransformation]
                  ) -> Callable[..., optax.GradientTransformation]:
  """A table factory for an optax optimizer that takes mean gradients.

  Args:
    factory: called as ``factory(learning_rate, weight_decay=..., mask=...,
      **kwargs)``, as ``optax.adamw`` or ``optax.lion`` are (wrap others in
      a function with these arguments).

  Returns:
    A factory with the table's arguments whose transform averages the
    microbatched gradients (``bcopt.microbatch_mean``, over ``axis_name``
    too) before ``factory``'s transform.
  """
  def make(learning_rate, *, weight_decay, mask, axis_name=None, **kwargs):
    to_mean = optax.stateless(
        lambda grads, params: bcopt.microbatch_mean(grads, axis_name))
    return optax.chain(to_mean, factory(
        learning_rate, weight_decay=weight_decay, mask=mask, **kwargs))
  return make


def adopt(learning_rate, *, weight_decay, mask, **kwargs):
  """``optax.contrib.adopt`` with decoupled weight decay (AdamW's place)."""
  return optax.chain(optax.contrib.scale_by_adopt(**kwargs),
                     optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def muon(learning_rate, *, weight_decay, mask, **kwargs):
  """``optax.contrib.muon`` on the block matrices; the (tied) embedding,
  biases and norm scales take its AdamW, as Muon's authors do.
  ``consistent_rms=0.2`` scales Muon's update to AdamW's RMS, so one
  learning rate serves both parts (and the table's AdamW rates)."""
  def dimension_numbers(params):
    return {name: jax.tree.map(
        lambda x, name=name: optax.contrib.MuonDimensionNumbers()
        if name != "embed" and x.ndim == 2 else None, tree)
            for name, tree in params.items()}
  return optax.contrib.muon(
      learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
      muon_weight_dimension_numbers=dimension_numbers, consistent_rms=0.2,
      **kwargs)


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(bcopt.adamw_bc, dict(
        b1=0.9, b2=0.95, eps=1e-8, cross_fit=None, inverse_correction=None)),
    "adamw_bc": Optimizer(bcopt.adamw_bc, dict(
        b1=0.9, b2=0.95, eps=1e-8, cross_fit="loo",
        inverse_correction="jackknife")),
    "sophia": Optimizer(bcopt.sophia_bc, dict(
        b1=0.965, b2=0.99, rho=0.05, eps=1e-12, clip=1.0, cross_fit=None,
        inverse_correction=None), curvature=True),
    "sophia_bc": Optimizer(bcopt.sophia_bc, dict(
        b1=0.965, b2=0.99, rho=0.05, eps=1e-12, clip=1.0,
        cross_fit="twofold", inverse_correction="jackknife"), curvature=True),
    # Grafted to Adam's per-tile norm, so Shampoo shares AdamW's learning rate.
    "shampoo": Optimizer(bcopt.shampoo_bc, dict(
        b1=0.9, b2=0.95, damping=1e-6, precondition_every=10, graft="adam",
        cross_fit=None, inverse_correction=None), root_step=True),
    "shampoo_bc": Optimizer(bcopt.shampoo_bc, dict(
        b1=0.9, b2=0.95, damping=1e-6, precondition_every=10, graft="adam",
        cross_fit="twofold", inverse_correction="jackknife"), root_step=True),
    # The SOAP authors' recipe (betas 0.95, factors' decay 0.95, a basis
    # refresh every 10 steps); Adam's update, so AdamW's learning rates.
    "soap": Optimizer(bcopt.soap_bc, dict(
        b1=0.95, b2=0.95, eps=1e-8, shampoo_b2=0.95, precondition_every=10,
        cross_fit=None, inverse_correction=None)),
    "soap_bc": Optimizer(bcopt.soap_bc, dict(
        b1=0.95, b2=0.95, eps=1e-8, shampoo_b2=0.95, precondition_every=10,
        cross_fit="loo", inverse_correction="jackknife")),
    # Baselines on the mean gradient: ADOPT (v_{t-1} in the denominator,
    # the cheap cure for the coupling of g_t and v_t) with its authors'
    # defaults, and Muon (Newton-Schulz polar factor of the momentum), with
    # and without its adaptive (nuclear-norm) scaling.
    "adopt": Optimizer(mean_gradient(adopt), dict(b1=0.9, b2=0.9999,
                                                  eps=1e-6)),
    "muon": Optimizer(mean_gradient(muon), dict(beta=0.95, adaptive=False)),
    "muon_adaptive": Optimizer(mean_gradient(muon), dict(beta=0.95,
                                                         adaptive=True)),
}
AVERAGES = ("ema", "bema")   # --average: "none" or a comma-separated list
# Index of the first averaging state in make's chain state (clip, optimizer,
# then the averages in AVERAGES order).
AVERAGE_INDEX = 2
SWITCHES = ("cross_fit", "inverse_correction")   # overridable by their flags


def _parse_hparam(name: str, value: str, default: Any) -> Any:
  """``value`` as the type of the table's ``default`` (bool, int, float;
  ``none`` for an optional one)."""
  if value.lower() == "none" and default is None:
    return None
  if isinstance(default, bool):
    if value.lower() not in ("true", "false"):
      raise ValueError(f"--hparam {name}={value}: expected true or false")
    return value.lower() == "true"
  try:
    return type(default)(value) if isinstance(default, (int, float)) else (
        value)
  except ValueError:
    raise ValueError(f"--hparam {name}={value}: expected a "
                     f"{type(default).__name__}") from None


def optimizer_kwargs(cfg: Config) -> dict[str, Any]:
  """The table's keyword arguments with the --hparam, --cross-fit and
  --inverse-correction overrides.

  Raises:
    ValueError: an --hparam that is not NAME=VALUE with NAME one of the
      entry's keyword arguments (other than the two switches), or a value
      not of its type.
  """
  kwargs = dict(OPTIMIZERS[cfg.optimizer].kwargs)
  for item in cfg.hparam:
    name, sep, value = item.partition("=")
    if not sep or name not in kwargs or name in SWITCHES:
      raise ValueError(
          f"--hparam {item!r}: expected NAME=VALUE with NAME in "
          f"{sorted(set(kwargs) - set(SWITCHES))} (--optimizer "
          f"{cfg.optimizer}; the switches have their own flags)")
    kwargs[name] = _parse_hparam(name, value, kwargs[name])
  for name in SWITCHES:
    value = getattr(cfg, name)
    if value is not None:
      kwargs[name] = None if value == "none" else value
  return kwargs


def takes_curvature(cfg: Config) -> bool:
  """Whether the optimizer refreshes GNB curvature (Sophia)."""
  return OPTIMIZERS[cfg.optimizer].curvature


def has_periodic_step(cfg: Config) -> bool:
  """Whether the optimizer has a periodic step kind compiled apart (reads
  no flag, so building the programs depends on --optimizer alone)."""
  entry = OPTIMIZERS[cfg.optimizer]
  return entry.curvature or entry.root_step


def periodic_every(cfg: Config) -> int | None:
  """Steps between the optimizer's periodic steps (1, k+1, 2k+1, ...):
  Sophia's curvature refreshes (``--curvature-every``), Shampoo's root
  steps (its ``precondition_every``); None when all steps are alike."""
  entry = OPTIMIZERS[cfg.optimizer]
  if entry.curvature:
    return cfg.curvature_every
  if entry.root_step:
    return entry.kwargs["precondition_every"]
  return None


def step_kwargs(cfg: Config, periodic: bool) -> dict[str, Any]:
  """Static keyword arguments of ``tx.update`` for a step kind (Shampoo's
  ``root_step``; Sophia's curvature is an array, passed by the step)."""
  return {"root_step": periodic} if OPTIMIZERS[cfg.optimizer].root_step else {}


def learning_rate(cfg: Config) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to ``lr * lr_floor`` or flat."""
  warmup = min(cfg.warmup, cfg.steps)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.lr_floor)
  if warmup == 0:
    return optax.constant_schedule(cfg.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup),
       optax.constant_schedule(cfg.lr)], [warmup])


def decay_mask(params):
  """Weight decay on matrices only (not on biases, norms' scales)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def averager(cfg: Config, name: str) -> optax.GradientTransformation:
  """``bcopt.ema`` or ``bcopt.bema`` with the --average-* hyperparameters."""
  kwargs = dict(ema_power=cfg.average_ema_power, lag=cfg.average_lag,
                burn_in=cfg.average_burn_in, update_every=cfg.average_every)
  if name == "bema":
    kwargs["bias_power"] = cfg.average_bias_power
  return getattr(bcopt, name)(**kwargs)


def clipped(cfg: Config, kwargs: dict[str, Any]
            ) -> list[optax.GradientTransformation]:
  """The clip and the optimizer built with ``kwargs``: ``make``'s first
  two transforms."""
  return [bcopt.clip_by_global_norm(cfg.clip_norm),
          OPTIMIZERS[cfg.optimizer].factory(
              learning_rate(cfg), weight_decay=cfg.weight_decay,
              mask=decay_mask, **kwargs)]


def make(cfg: Config) -> optax.GradientTransformation:
  """clip -> optimizer (-> averages), all on microbatched gradients (a
  stacked microbatch axis, sharded or not: no ``axis_name``)."""
  return optax.chain(*clipped(cfg, optimizer_kwargs(cfg)),
                     *(averager(cfg, name) for name in cfg.averages))


def averaged_params(cfg: Config, opt_state) -> dict[str, Any]:
  """``{average name: its parameters}`` held by a ``make(cfg)`` state."""
  return {name: bcopt.bema_params(opt_state[AVERAGE_INDEX + k])
          for k, name in enumerate(cfg.averages)}


def monitored_kwargs(cfg: Config) -> dict[str, Any] | None:
  """The keyword arguments the monitor builds the run's transform with
  (None: the entry takes no ``diagnostics``; the monitor then measures the
  noise scale alone). A plain entry (both switches off) takes its ``_bc``
  entry's switches, so its run reports what the corrections would change
  on its own trajectory (the plain and ``_bc`` states are alike)."""
  entry = OPTIMIZERS[cfg.optimizer]
  if "diagnostics" not in inspect.signature(entry.factory).parameters:
    return None
  kwargs = optimizer_kwargs(cfg)
  corrected = OPTIMIZERS.get(cfg.optimizer + "_bc")
  if corrected is not None and all(kwargs[k] is None for k in SWITCHES):
    kwargs |= {k: corrected.kwargs[k] for k in SWITCHES}
  return kwargs | {"diagnostics": True}


def win_rate(cfg: Config, opt_state) -> jax.Array:
  """Sophia's win rate in a ``make(cfg)`` state: the fraction of
  coordinates its update does not clip, ``|m * inv| < clip`` from the
  momentum and the cached inverse (the cross-fit folds clip their own
  ratios, so for those it is the full-batch figure)."""
  mu, inv = (optax.tree.get(opt_state[1], name) for name in ("mu", "inv"))
  clip = optimizer_kwargs(cfg)["clip"]
  unclipped = jax.tree.map(lambda m, i: jnp.sum(jnp.abs(m * i) < clip),
                           mu, inv)
  return (sum(jax.tree.leaves(unclipped))
          / sum(x.size for x in jax.tree.leaves(mu)))


def monitor(cfg: Config) -> Callable[..., dict[str, jax.Array]]:
  """The bias monitor of a run (docs/monitor.md), for evaluation steps.

  Returns:
    ``measure(grads, opt_state, params, **extra) -> {name: float32
    scalar}``: ``grads`` a step's microbatch gradients, ``opt_state`` a
    ``make(cfg)`` state before the step and ``extra`` the step's update
    arguments (a periodic step's: Sophia's curvature, Shampoo's
    ``root_step``). Names: ``noise_scale`` (``bcopt.microbatch_diagnostics``,
    in sequences), for bcopt entries ``coupling`` and ``jensen`` (the
    shares of the step under ``monitored_kwargs``), for Sophia
    ``win_rate``. Nothing is returned but the figures: the run's own step
    is taken apart, so the monitor never changes the training.
  """
  entry, kwargs = OPTIMIZERS[cfg.optimizer], monitored_kwargs(cfg)
  if kwargs is not None:
    tx = optax.chain(*clipped(cfg, kwargs))
  else:   # the noise scale alone, from the microbatch statistics
    tx = bcopt.scale_by_adam_bc(cross_fit=None, inverse_correction=None,
                                diagnostics=True)

  def measure(grads, opt_state, params, **extra):
    if kwargs is not None:   # the state with the diagnostics' place added
      wrapped = lambda x: isinstance(x, bcopt.DiagnosticsState)
      state = jax.tree.map(
          lambda t, s: bcopt.DiagnosticsState(s, None) if wrapped(t) else s,
          jax.eval_shape(tx.init, params), tuple(opt_state[:2]),
          is_leaf=wrapped)
      _, state = tx.update(grads, state, params, **extra)
    else:
      _, state = tx.update(grads, tx.init(params), params)
    figures = bcopt.microbatch_diagnostics(state, cfg.microbatch_size)
    out = {k: v["total"] for k, v in figures.items()
           if kwargs is not None or k == "noise_scale"}
    if entry.curvature:
      out["win_rate"] = win_rate(cfg, opt_state)
    return out
  return measure


def validate(cfg: Config) -> None:
  """The optimizer's own rules, checked abstractly (nothing compiles).

  Raises:
    ValueError: a switch override the optimizer does not have, --average-*
      hyperparameters bcopt rejects, or a microbatch count the optimizer
      cannot use.
  """
  for name in SWITCHES:
    if getattr(cfg, name) is not None and (
        name not in OPTIMIZERS[cfg.optimizer].kwargs):
      raise ValueError(f"--{name.replace('_', '-')}: --optimizer "
                       f"{cfg.optimizer} has no such switch")
  optimizer_kwargs(cfg)   # --hparam's names and types
  for name in cfg.averages:
    try:
      averager(cfg, name)
    except ValueError as e:
      raise ValueError(f"--average {name}: {e}") from e
  tx = make(cfg)   # traced on a one-leaf tree
  params = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  grads = {"w": jax.ShapeDtypeStruct((cfg.microbatches, 2, 2), jnp.float32)}
  extra = {"curvature": grads} if takes_curvature(cfg) else {}
  try:
    jax.eval_shape(lambda g, p, e: tx.update(g, tx.init(p), p, **e),
                   grads, params, extra)
  except ValueError as e:
    raise ValueError(f"--optimizer {cfg.optimizer} cannot use --microbatches "
                     f"{cfg.microbatches}: {e}") from e
