"""Tests of examples/lm/train.py: the steps, then the loop's behaviours.

Step tests call ``train.build``'s jitted steps directly on a one-layer model:
every optimizer lowers the loss (Sophia's curvature-refresh step included),
the AdamW step is optax's AdamW on the mean gradient (so is an optax
optimizer added through ``optimizer.mean_gradient``), the eval step is the
mean cross-entropy, and ``build`` reads no setting marked not compiled.

Loop tests run ``train.main`` in-process for what only the loop does: its
outputs, exact resume, several devices equal one, a NaN stop, iterate
averages, ``--init-from``, Ctrl-C and the dry run. The pytest process has 8
simulated CPU devices (conftest.py at the root).

Runs that differ only in settings of ``config.NOT_COMPILED`` (e.g.
``--stop-at``, ``--resume``, ``--checkpoint-every``) share ``train.build``'s
programs through a memo in this module (``build_once``), as a process that
trains several times could; each run still goes through the whole loop.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bcopt
from examples.lm import checkpoint as checkpoint_lib
from examples.lm import config as config_lib
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import optimizer as optimizer_lib
from examples.lm import train

KEY = jax.random.key(0)
STEPS = 8   # of the tiny run (conftest.py)
REAL_BUILD = train.build   # shared_builds replaces train.build in loop tests
BUILDS = {}   # settings that reach the programs -> train.Program


def build_once(cfg, model_cfg):
  """``train.build``, once per value of the settings that reach programs."""
  defaults = config_lib.Config()
  key = (dataclasses.replace(cfg, **{
      name: getattr(defaults, name) for name in config_lib.NOT_COMPILED}),
         model_cfg)
  if key not in BUILDS:
    BUILDS[key] = REAL_BUILD(cfg, model_cfg)
  return BUILDS[key]


# ----------------------------------------------------------------------------
# The steps


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
  """(cfg, model_cfg, initial params in numpy, {step: windows_MxBxT1})."""
  cfg = train.parse_args(tiny.flags(tmp_path_factory.mktemp("unused")))
  assert cfg.steps == STEPS
  model_cfg = config_lib.model_config(cfg, data_lib.BYTE_VOCAB)
  params = build_once(cfg, model_cfg).init(KEY)["params"]
  tokens = data_lib.encode(pathlib.Path(tiny.corpus_path).read_text())
  windows = {step: data_lib.train_batch(
      tokens, seed=0, step=step, microbatches=4, batch_size=2, seq_len=32)
             for step in range(1, STEPS + 1)}
  return cfg, model_cfg, jax.tree.map(np.array, params), windows


@pytest.fixture(scope="module")
def programs(inputs):
  """``programs(optimizer)``: ``build_once`` of the tiny run's settings.

  ``optax_adamw`` is ``optax.adamw`` joined to the table through
  ``optimizer.mean_gradient``, as a new optax optimizer would be.
  """
  cfg, model_cfg, _, _ = inputs
  table = {**optimizer_lib.OPTIMIZERS, "optax_adamw": optimizer_lib.Optimizer(
      optimizer_lib.mean_gradient(optax.adamw),
      dict(b1=0.9, b2=0.95, eps=1e-8))}

  def get(optimizer):
    with pytest.MonkeyPatch.context() as m:
      m.setattr(optimizer_lib, "OPTIMIZERS", table)
      return build_once(dataclasses.replace(cfg, optimizer=optimizer),
                        model_cfg)

  return get


def fresh(params_np):
  """New device arrays (the train steps donate their state)."""
  return jax.tree.map(jnp.asarray, params_np)


def sophia_h(opt_state):
  """Sophia's curvature EMA ``h``, copied to the host."""
  (state,) = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, bcopt.ScaleBySophiaBCState))
              if isinstance(s, bcopt.ScaleBySophiaBCState)]
  return jax.tree.map(np.array, state.h)


# Optimizers whose first steps are short by design, so that 8 steps at
# AdamW's learning rate lower the loss by 0.4 nats rather than 1. SOAP: its
# first bases come from the first gradient, in which the next gradients are
# nearly diagonal, and Adam there is close to the polar factor U V^T, of
# norm sqrt(min(d1, d2)) against Adam's sqrt(d1 d2) (docs/soap_bc.md).
# ADOPT: its first step only initialises the second moment, and its
# momentum is not bias-corrected: its 7 moving steps add up to
# sum_k (1 - 0.9^k) = 1.8 of AdamW's (about 0.5 nats here).
SHORT_START = ("adopt", "soap", "soap_bc")


@pytest.mark.parametrize("optimizer", sorted(optimizer_lib.OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(inputs, programs, optimizer):
  _, _, params, windows = inputs
  prog = programs(optimizer)
  entry = optimizer_lib.OPTIMIZERS[optimizer]
  curvature, periodic = entry.curvature, entry.curvature or entry.root_step
  assert sorted(prog.train_steps) == ([False, True] if periodic else [False])
  every = 3 if curvature else entry.kwargs.get("precondition_every")
  state, losses = prog.restart(fresh(params)), []
  for step in range(1, STEPS + 1):
    refresh = periodic and (step - 1) % every == 0    # Sophia: 1, 4, 7
    h_before = sophia_h(state["opt_state"]) if curvature else None
    state, loss = prog.train_steps[refresh](state, windows[step], KEY)
    losses.append(float(loss))
    if curvature:   # the curvature EMA moves on refresh steps only
      moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), h_before,
                           sophia_h(state["opt_state"]))
      assert set(jax.tree.leaves(moved)) == {refresh}, step
  assert int(state["step"]) == STEPS and all(map(math.isfinite, losses))
  assert losses[0] > math.log(256) - 0.3              # starts near uniform
  drop = 0.4 if optimizer in SHORT_START else 1.0
  assert np.mean(losses[-2:]) < losses[0] - drop


def numpy_reference():
  """tests/reference.py: the library tests' numpy restatement of SPEC."""
  path = pathlib.Path(__file__).parents[2] / "tests" / "reference.py"
  spec = importlib.util.spec_from_file_location("spec_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_monitor_measures_the_step_against_numpy(inputs, programs):
  """The plain AdamW run's monitor on its second step: the noise scale of
  the microbatch gradients and the shares of AdamW-BC's switches (LOO,
  jackknife) on that step, restated in float64 numpy (SPEC 3 and 9) from
  per-microbatch gradients computed here, clipped as the chain clips."""
  cfg, model_cfg, params, windows = inputs
  prog = programs("adamw")
  _, loss_fn = model_lib.make_loss_fns(model_cfg)
  b1, b2, eps = (optimizer_lib.OPTIMIZERS["adamw"].kwargs[k]
                 for k in ("b1", "b2", "eps"))

  grad_fn = jax.jit(jax.grad(loss_fn))   # one microbatch at a time

  def clipped_grads(params, windows_MxBxT1):   # M x parameters
    g = np.stack([np.concatenate([np.asarray(x, np.float64).ravel() for x in
                                  jax.tree.leaves(grad_fn(params, w))])
                  for w in windows_MxBxT1])
    return g * min(1.0, cfg.clip_norm / np.linalg.norm(g.mean(0)))

  state = prog.restart(fresh(params))
  gbar1 = clipped_grads(state["params"], windows[1]).mean(0)
  state, _ = prog.train_steps[False](state, windows[1], KEY)
  g = clipped_grads(state["params"], windows[2])
  m, b = g.shape[0], cfg.microbatch_size
  trace = ((g - g.mean(0)) ** 2).sum() / (m - 1)
  noise = b * trace / ((g.mean(0) ** 2).sum() - trace / m)
  mu, nu = (1 - b1) * gbar1, (1 - b2) * gbar1 ** 2
  update = lambda scheme, estimator: numpy_reference().cross_fit_update(
      lambda a: (b1 * mu + (1 - b1) * a) / (1 - b1 ** 2),
      lambda s: np.sqrt((b2 * nu + (1 - b2) * s ** 2) / (1 - b2 ** 2)) + eps,
      g, g, scheme, estimator)
  u, u_plain, u_std = (update("loo", "jackknife"), update("loo", None),
                       update(None, None))
  norm = np.linalg.norm
  got = prog.monitor(state, windows[2], KEY)
  assert sorted(got) == ["coupling", "jensen", "noise_scale"]
  np.testing.assert_allclose(got["noise_scale"], noise, rtol=1e-3)
  np.testing.assert_allclose(
      got["coupling"], norm(u_plain - u_std) / norm(u_std), rtol=1e-3)
  np.testing.assert_allclose(
      got["jensen"], norm(u - u_plain) / norm(u_plain), rtol=1e-3)
  assert int(state["step"]) == 1   # the state is the caller's, unchanged


@pytest.mark.parametrize("optimizer,names", [
    ("sophia_bc", ["coupling", "jensen", "noise_scale", "win_rate"]),
    ("shampoo", ["coupling", "jensen", "noise_scale"]),
    ("muon", ["noise_scale"])])
def test_monitor_of_each_kind(inputs, programs, optimizer, names):
  """Sophia and Shampoo are measured as periodic steps (curvature, roots):
  their shares are positive; an optax entry gets the noise scale alone,
  the same for any optimizer on the same gradients."""
  _, _, params, windows = inputs
  got = programs(optimizer).monitor(
      programs(optimizer).restart(fresh(params)), windows[1], KEY)
  assert sorted(got) == names
  assert all(float(got[k]) > 0 for k in names if k != "win_rate")
  adamw = programs("adamw").monitor(
      programs("adamw").restart(fresh(params)), windows[1], KEY)
  np.testing.assert_allclose(got["noise_scale"], adamw["noise_scale"],
                             rtol=1e-5)


@pytest.fixture(scope="module")
def optax_adamw_run(inputs):
  """Params and losses of 3 steps of clip + optax.adamw on the mean loss."""
  _, model_cfg, params, windows = inputs
  _, loss_fn = model_lib.make_loss_fns(model_cfg)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 0, STEPS,
                                                end_value=1e-3)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))

  @jax.jit(compiler_options={"xla_backend_optimization_level": 0})
  def step(params, opt_state, windows_MxBxT1):
    windows_NxT1 = windows_MxBxT1.reshape(-1, windows_MxBxT1.shape[-1])
    loss, grads = jax.value_and_grad(loss_fn)(params, windows_NxT1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = fresh(params)
  opt_state, losses = tx.init(params), []
  for k in range(1, 4):
    params, opt_state, loss = step(params, opt_state, windows[k])
    losses.append(float(loss))
  return params, losses


@pytest.mark.parametrize("optimizer", ["adamw", "optax_adamw"])
def test_adamw_step_is_optax_adamw_on_the_mean_gradient(inputs, programs,
                                                        optax_adamw_run,
                                                        optimizer):
  _, _, params, windows = inputs
  prog = programs(optimizer)
  state, losses = prog.restart(fresh(params)), []
  for step in range(1, 4):
    state, loss = prog.train_steps[False](state, windows[step], KEY)
    losses.append(float(loss))
  expected, expected_losses = optax_adamw_run
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
  # Float rounding differs (mean of microbatch gradients vs gradient of the
  # mean); Adam's m / sqrt(v) magnifies it where gradients are tiny, so the
  # tolerance is 1e-3 of one step of size lr = 1e-2.
  chex.assert_trees_all_close(state["params"], expected, rtol=1e-4, atol=1e-5)


def test_shampoo_root_and_other_steps_compile_apart(inputs, programs):
  """Shampoo's root step and its other steps are two programs (root_step
  True / False) that train like the library's one lax.cond program, and
  the other steps hold less scratch memory than the root step.

  Plain Shampoo: with twofold and the jackknife the first root step's
  candidate roots depend on the rounding of each program (a rank-deficient
  factor's null space is a repeated eigenvalue, and the per-eigenvalue
  variance is not invariant to the basis eigh picks in it)."""
  cfg, model_cfg, params, windows = inputs
  prog = programs("shampoo")
  cond_step = jax.jit(functools.partial(
      train.train_step, tx=prog.tx, model_cfg=model_cfg, mesh=prog.mesh,
      mode=cfg.microbatch_mode, grad_dtype=cfg.grad_dtype, refresh=False))
  apart, cond = prog.restart(fresh(params)), prog.restart(fresh(params))
  for step in (1, 2, 3):   # a root step (precondition_every 10), then two
    apart, loss_apart = prog.train_steps[step == 1](apart, windows[step], KEY)
    cond, loss_cond = cond_step(cond, windows[step], KEY)
    # The first loss comes before any update; the later ones see the
    # parameters' differences below (1.3e-6 relative seen at step 3).
    np.testing.assert_allclose(loss_apart, loss_cond,
                               rtol=1e-6 if step == 1 else 1e-5)
  # The first roots of rank-deficient factors scale the momentum's
  # null-space rounding by damping^(-1/2) = 1000: parameters agree to 1e-4.
  chex.assert_trees_all_close(apart["params"], cond["params"], rtol=1e-3,
                              atol=1e-4)
  sizes = train.step_memory(dataclasses.replace(cfg, optimizer="shampoo"),
                            model_cfg)
  assert sizes[False]["temp"] < sizes[True]["temp"], sizes


def test_sophia_steps_on_devices_match_one_device(inputs, programs):
  """One microbatch per device: the curvature keys span the devices.

  Refresh steps only (as with ``--curvature-every 1``): the step without
  curvature has no keys and is the AdamW-like path the loop tests cover.
  """
  cfg, model_cfg, params, windows = inputs
  one = programs("sophia_bc").train_steps[True]
  many = build_once(dataclasses.replace(cfg, optimizer="sophia_bc",
                                        devices=4), model_cfg)
  assert many.mesh.shape == {"data": 4, "fsdp": 1}
  state_one = programs("sophia_bc").restart(fresh(params))
  state_many = many.restart(fresh(params))
  for step in (1, 2, 3):
    state_one, loss_one = one(state_one, windows[step], KEY)
    state_many, loss_many = many.train_steps[True](
        state_many, train.place(many, windows[step], 0), KEY)
    np.testing.assert_allclose(float(loss_many), float(loss_one), rtol=2e-5)
    if step == 1:   # the GNB curvature of the same parameters and labels
      chex.assert_trees_all_close(sophia_h(state_many["opt_state"]),
                                  sophia_h(state_one["opt_state"]),
                                  rtol=1e-4, atol=1e-9)


def test_eval_step_is_the_mean_cross_entropy(inputs, programs):
  _, model_cfg, params, windows = inputs
  prog = programs("adamw")
  windows_NxMxBxT1 = np.stack([windows[1], windows[2]])
  got = float(prog.eval_step(fresh(params), windows_NxMxBxT1))
  logits_fn, _ = model_lib.make_loss_fns(model_cfg)
  flat = windows_NxMxBxT1.reshape(-1, 33)
  logits = np.asarray(jax.jit(logits_fn)(fresh(params), flat[:, :-1]),
                      np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, flat[:, 1:, None], -1)
  np.testing.assert_allclose(got, nll.mean(), rtol=1e-5)


class ReadRecorder:
  """A Config stand-in that records which fields are read."""

  def __init__(self, cfg):
    self._cfg, self.read = cfg, set()

  def __getattr__(self, name):
    self.read.add(name)
    return getattr(self._cfg, name)


def test_build_reads_no_field_marked_not_compiled(inputs):
  cfg, model_cfg, params, windows = inputs
  cfg = dataclasses.replace(cfg, optimizer="sophia_bc", average="ema,bema",
                            cross_fit="symmetric", devices=2)
  recorder = ReadRecorder(cfg)
  prog = REAL_BUILD(recorder, model_cfg)
  state = jax.eval_shape(prog.restart, params)
  for step in prog.train_steps.values():
    jax.eval_shape(step, state, windows[1], KEY)
  jax.eval_shape(prog.eval_step, params, windows[1][None])
  assert recorder.read & config_lib.NOT_COMPILED == set()
  assert {"optimizer", "cross_fit", "averages", "mesh_shape", "lr",
          "fast_compile", "microbatch_mode", "grad_dtype"} <= recorder.read


# ----------------------------------------------------------------------------
# The loop (train.main)


@pytest.fixture
def shared_builds(monkeypatch):
  """``train.build`` memoized on the settings that reach the programs."""
  monkeypatch.setattr(train, "build", build_once)


def metrics(out):
  return [json.loads(line)
          for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest_step(out):
  with contextlib.closing(checkpoint_lib.manager(out)) as mngr:
    return mngr.latest_step()


def without_wall_time(records):
  return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


# Iterate averages whose read-outs are exact: EMA power 0 makes the EMA the
# iterate; burn-in 4 makes both averages the iterate up to step 4, then BEMA
# = alpha (theta_t - theta_4) + theta_t.
AVERAGES = ("--average", "bema,ema", "--average-ema-power", "0",
            "--average-burn-in", "4", "--eval-test")


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
  """Uninterrupted one-device AdamW-BC runs (LOO + jackknife), on first use.

  ``runs("plain")`` has no averages, ``runs("averaged")`` has AVERAGES.
  """
  extra = {"plain": (), "averaged": AVERAGES}
  cache = {}

  def get(name):
    if name not in cache:
      out = tmp_path_factory.mktemp(name)
      cache[name] = out, train.main(tiny.flags(out, "adamw_bc", *extra[name]))
    return cache[name]

  return get


@pytest.mark.usefixtures("shared_builds")
def test_outputs(runs):
  out, summary = runs("plain")
  assert sorted(p.name for p in out.iterdir()) == [
      "checkpoints", "config.json", "loss.png", "metrics.jsonl",
      "summary.json"]
  assert list(summary) == ["final_val_loss", "final_eval_loss", "params",
                           "tokens", "wall_s", "data", "init_from", "config",
                           "monitor", "command"]
  assert json.loads((out / "summary.json").read_text()) == summary
  assert json.loads((out / "config.json").read_text()) == summary["config"]
  records = metrics(out)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert [r["step"] for r in records if "val_loss" in r] == [4, STEPS]
  assert not any("test_loss" in r for r in records)    # no --eval-test
  monitored = [r for r in records if "noise_scale" in r]   # at evaluations
  assert [r["step"] for r in monitored] == [4, STEPS]
  assert summary["monitor"] == {k: pytest.approx(np.mean(
      [r[k] for r in monitored])) for k in ("noise_scale", "coupling",
                                            "jensen")}
  assert summary["final_val_loss"] == records[-1]["val_loss"]
  assert summary["tokens"] == records[-1]["tokens"] == STEPS * 4 * 2 * 32
  assert summary["params"] == model_lib.count_params(
      model_lib.abstract_params(config_lib.model_config(
          config_lib.from_dict(summary["config"]["args"]), 256)))
  assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
  assert latest_step(out) == STEPS
  assert summary["command"].startswith("python -m examples.lm.train ")


@pytest.mark.usefixtures("shared_builds")
def test_averages_read_out_without_changing_training(runs):
  plain_out, plain = runs("plain")
  out, summary = runs("averaged")
  got, ref = metrics(out), metrics(plain_out)
  # Equal to float rounding: the extra averaging ops change XLA's fusion of
  # the step and the last bits of the parameters (1e-7 of the loss from
  # step 3 on here; benchmarks/finetune_averaging.py measures it).
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6)
  same([r["train_loss"] for r in got], [r["train_loss"] for r in ref])
  assert [r["step"] for r in got if "val_loss" in r] == [
      r["step"] for r in ref if "val_loss" in r]
  same([r["val_loss"] for r in got if "val_loss" in r],
       [r["val_loss"] for r in ref if "val_loss" in r])
  same(summary["final_eval_loss"], plain["final_eval_loss"])
  assert summary["config"]["args"]["average"] == "ema,bema"   # chain order
  step4, step8 = [r for r in got if "val_loss" in r]
  assert step8["step"] == STEPS and "val_loss_avg" not in step8
  for split in ("val", "test"):
    loss = step4[f"{split}_loss"]
    assert step4[f"{split}_loss_ema"] == step4[f"{split}_loss_bema"] == loss
    assert step8[f"{split}_loss_ema"] == step8[f"{split}_loss"]
    assert step8[f"{split}_loss_bema"] != step8[f"{split}_loss"]
  assert summary["final_eval_loss"] == step8["test_loss"]
  assert summary["final_eval_loss_bema"] == step8["test_loss_bema"]


@pytest.mark.usefixtures("shared_builds")
def test_the_monitor_does_not_change_training(runs, tiny, tmp_path):
  """Monitored at steps 4 and 8 or at step 8 alone: the same run, bit for
  bit (the monitor is a program of its own, run beside the train step)."""
  out, _ = runs("plain")
  train.main(tiny.flags(tmp_path, "adamw_bc", "--eval-every", "0"))
  assert [r["train_loss"] for r in metrics(tmp_path)] == [
      r["train_loss"] for r in metrics(out)]
  assert [r["step"] for r in metrics(tmp_path) if "jensen" in r] == [STEPS]


@pytest.mark.usefixtures("shared_builds")
def test_stop_and_resume_reproduce_the_uninterrupted_run(runs, tiny,
                                                         tmp_path):
  full_out, full = runs("averaged")
  args = tiny.flags(tmp_path, "adamw_bc", *AVERAGES)
  stopped = train.main(args + ["--stop-at", "3", "--checkpoint-every", "0"])
  assert stopped is None
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
  resumed = train.main(args + ["--resume"])
  assert without_wall_time(metrics(tmp_path)) == without_wall_time(
      metrics(full_out))                                   # bitwise
  final = lambda summary: {k: v for k, v in summary.items()
                           if k.startswith("final_")}
  assert final(resumed) == final(full) and len(final(full)) == 6


# One microbatch per device: LOO's folds, the jackknife and the averages
# span devices.
@pytest.mark.usefixtures("shared_builds")
def test_devices_match_one_device(runs, tiny, tmp_path):
  one_out, one = runs("averaged")
  many = train.main(tiny.flags(tmp_path, "adamw_bc", *AVERAGES,
                               "--devices", "4"))
  np.testing.assert_allclose([r["train_loss"] for r in metrics(tmp_path)],
                             [r["train_loss"] for r in metrics(one_out)],
                             rtol=2e-5)
  for key in ("final_eval_loss", "final_eval_loss_bema"):
    np.testing.assert_allclose(many[key], one[key], rtol=2e-5)


@pytest.mark.usefixtures("shared_builds")
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
  args = tiny.flags(tmp_path, "adamw_bc", "--lr", "1e30", "--clip-norm",
                    "1e30", "--checkpoint-every", "1")
  with pytest.raises(FloatingPointError, match="loss is .* at step 2"):
    train.main(args)
  assert latest_step(tmp_path) == 1
  assert [r["step"] for r in metrics(tmp_path)] == [1]


@pytest.mark.usefixtures("shared_builds")
def test_init_from_loads_the_parameters_with_a_fresh_optimizer(
    runs, tiny, tmp_path):
  src, done = runs("averaged")
  # Learning rate 0: the parameters stay the loaded ones, so the held-out
  # losses are the source run's final ones, and BEMA (snapshot and EMA made
  # from the loaded parameters) equals them too.
  summary = train.main(tiny.flags(tmp_path, "adamw") + [
      "--init-from", str(src), "--steps", "2", "--lr", "0",
      "--schedule", "constant", "--average", "bema"])
  assert summary["init_from"] == {"dir": str(src), "step": STEPS}
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
  for key in ("final_val_loss", "final_eval_loss"):
    assert summary[key] == done[key]
    assert summary[key + "_bema"] == done[key]
  assert metrics(tmp_path)[0]["train_loss"] < math.log(256) - 1.0


@pytest.mark.usefixtures("shared_builds")
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(
    runs, tiny, tmp_path, monkeypatch):
  """SIGINT during step 5 ends the run after that step with a checkpoint."""
  full_out, full = runs("averaged")
  args = tiny.flags(tmp_path, "adamw_bc", *AVERAGES, "--checkpoint-every", "0")
  real_batch = data_lib.train_batch

  def batch_then_interrupt(*a, **kw):
    if kw["step"] == 5:
      signal.raise_signal(signal.SIGINT)     # as if Ctrl-C were pressed now
    return real_batch(*a, **kw)

  with monkeypatch.context() as m:
    m.setattr(data_lib, "train_batch", batch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
      train.main(args)
  assert latest_step(tmp_path) == 5
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  resumed = train.main(args + ["--resume"])
  assert without_wall_time(metrics(tmp_path)) == without_wall_time(
      metrics(full_out))
  assert resumed["final_eval_loss"] == full["final_eval_loss"]


def test_dry_run_prints_the_qwen_count(capsys, tmp_path, monkeypatch):
  # Only the sizes: compiling the 0.5B step's memory is test_lm_mesh's job
  # on the tiny run.
  monkeypatch.setattr(train, "step_memory", lambda cfg, model_cfg: {})
  summary = train.main(["--dry-run", "--preset", "qwen2.5-0.5b",
                        "--vocab-size", "151936", "--optimizer", "adamw",
                        "--out", str(tmp_path / "run")])
  assert "params: 494032768" in capsys.readouterr().out.splitlines()
  assert summary == {"params": 494032768, "memory": {}}
  assert not (tmp_path / "run").exists()
