"""Tests of examples/lm/optimizer.py: the schedule, the switches, the chain.

That each optimizer trains, and that ``mean_gradient`` entries go through the
train step, is tested on the train step (test_lm_train.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt
from examples.lm import config as config_lib
from examples.lm import optimizer as optimizer_lib


def settings(**changes):
  return dataclasses.replace(config_lib.Config(), **changes)


@pytest.mark.parametrize("schedule,warmup", [("cosine", 20), ("cosine", 0),
                                             ("constant", 20),
                                             ("constant", 0)])
def test_learning_rate_schedule(schedule, warmup):
  cfg = settings(lr=3e-3, steps=200, warmup=warmup, lr_floor=0.1,
                 schedule=schedule)
  rate = optimizer_lib.learning_rate(cfg)

  def expected(t):   # linear warm-up from 0, then cosine to the floor or flat
    if t < warmup:
      return 3e-3 * t / warmup
    if schedule == "constant":
      return 3e-3
    progress = (t - warmup) / (200 - warmup)
    return 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * progress))

  for t in (0, 1, 10, 19, 20, 21, 100, 199, 200):
    np.testing.assert_allclose(float(rate(t)), expected(t), rtol=1e-5,
                               atol=1e-9)


def test_switch_overrides():
  assert optimizer_lib.optimizer_kwargs(settings(optimizer="adamw_bc")) == dict(
      b1=0.9, b2=0.95, eps=1e-8, cross_fit="loo",
      inverse_correction="jackknife")
  got = optimizer_lib.optimizer_kwargs(settings(
      optimizer="sophia_bc", cross_fit="none", inverse_correction="paper"))
  assert (got["cross_fit"], got["inverse_correction"], got["rho"]) == (
      None, "paper", 0.05)
  assert [name for name in sorted(optimizer_lib.OPTIMIZERS)
          if optimizer_lib.takes_curvature(settings(optimizer=name))] == [
              "sophia", "sophia_bc"]


def test_hparam_overrides_parse_as_the_tables_types():
  got = optimizer_lib.optimizer_kwargs(settings(
      optimizer="sophia_bc", hparam=("rho=0.02", "clip=2", "rho=0.03")))
  assert (got["rho"], got["clip"]) == (0.03, 2.0)   # the last one wins
  assert type(got["clip"]) is float
  got = optimizer_lib.optimizer_kwargs(settings(
      optimizer="muon", hparam=("adaptive=True", "beta=0.9")))
  assert (got["adaptive"], got["beta"]) == (True, 0.9)
  got = optimizer_lib.optimizer_kwargs(settings(
      optimizer="shampoo", hparam=("precondition_every=5",)))
  assert got["precondition_every"] == 5
  for bad, match in [("rho", "NAME=VALUE"), ("beta=0.9", "NAME=VALUE"),
                     ("cross_fit=loo", "switches"), ("rho=high", "float"),
                     ("clip=yes", "float")]:
    with pytest.raises(ValueError, match=match):
      optimizer_lib.validate(settings(optimizer="sophia_bc", hparam=(bad,)))
  with pytest.raises(ValueError, match="true or false"):
    optimizer_lib.optimizer_kwargs(settings(optimizer="muon",
                                            hparam=("adaptive=1",)))


def test_win_rate_counts_the_unclipped_coordinates():
  cfg = settings(optimizer="sophia_bc", hparam=("clip=0.5",))
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
  state = optimizer_lib.make(cfg).init(params)
  rng = np.random.default_rng(0)
  mu = {k: rng.normal(size=p.shape) for k, p in params.items()}
  inv = {k: rng.uniform(0, 2, size=p.shape) for k, p in params.items()}
  sophia = state[1][0]._replace(
      mu=jax.tree.map(jnp.asarray, mu), inv=jax.tree.map(jnp.asarray, inv))
  state = (state[0], (sophia, *state[1][1:]), *state[2:])
  ratios = np.concatenate([np.abs(mu[k] * inv[k]).ravel() for k in mu])
  np.testing.assert_allclose(optimizer_lib.win_rate(cfg, state),
                             np.mean(ratios < 0.5), rtol=1e-6)


def test_monitor_takes_the_bc_switches_for_a_plain_entry():
  assert optimizer_lib.monitored_kwargs(settings(optimizer="sophia")) == (
      optimizer_lib.OPTIMIZERS["sophia_bc"].kwargs | {"diagnostics": True})
  got = optimizer_lib.monitored_kwargs(settings(optimizer="adamw_bc",
                                                cross_fit="twofold"))
  assert (got["cross_fit"], got["inverse_correction"]) == ("twofold",
                                                           "jackknife")
  got = optimizer_lib.monitored_kwargs(settings(
      optimizer="adamw", inverse_correction="jackknife"))   # not plain
  assert (got["cross_fit"], got["inverse_correction"]) == (None, "jackknife")
  assert optimizer_lib.monitored_kwargs(settings(optimizer="adopt")) is None


def test_chain_clips_decays_matrices_and_ends_with_the_averages():
  cfg = settings(optimizer="adamw", average="ema,bema", lr=0.1, warmup=0,
                 schedule="constant", weight_decay=0.5, clip_norm=1.0,
                 average_ema_power=0.0)   # the EMA is the iterate
  tx = optimizer_lib.make(cfg)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  state = tx.init(params)
  assert isinstance(state[optimizer_lib.AVERAGE_INDEX], bcopt.EMAState)
  assert isinstance(state[optimizer_lib.AVERAGE_INDEX + 1], bcopt.BEMAState)
  # Two identical microbatches with mean-gradient norm 100: clipped to norm
  # 1, Adam's first step is lr * sign(g); the decay adds lr * wd * w.
  grads = {"w": jnp.full((2, 2, 2), 50.0), "b": jnp.zeros((2, 2))}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * (1.0 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0, atol=1e-12)
  averages = optimizer_lib.averaged_params(cfg, state)
  assert list(averages) == ["ema", "bema"]
  jax.tree.map(np.testing.assert_array_equal, averages["ema"],
               optax.apply_updates(params, updates))
