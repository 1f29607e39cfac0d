"""Train the Qwen2-style model of model.py with a bcopt optimizer.

    python -m examples.lm.train --optimizer adamw_bc --steps 1000

One pure jitted train step with donated state: per-microbatch gradients by
``jax.vmap`` or, with ``--microbatch-mode scan``, one microbatch after another
(and, on Sophia's refresh steps, per-microbatch GNB curvature), then
optimizer.py's chain. An optimizer with a periodic step kind (Sophia's
curvature refresh, Shampoo's root step) has two compiled steps, so the other
steps hold none of the periodic step's inputs or scratch memory. The step is jitted on a ``("data", "fsdp")`` mesh
(``--mesh``): the microbatch axis of the batch and of the stacked gradients is
sharded over ``data``, the parameters and optimizer state over ``fsdp``, and
XLA's partitioner inserts the collectives. Batches are a pure function of
``(seed, step)``, so ``--resume`` reproduces the uninterrupted run exactly on
CPU; every process feeds only its own shards of them. Flags, outputs and
interruptions: docs/lm_example.md; meshes and processes: docs/scale_out.md.

API: ``main(argv) -> summary dict`` (None after ``--stop-at``);
``parse_args(argv) -> config.Config``; ``build(cfg, model_cfg) -> Program``
(the jitted steps ``{refresh: step(state, windows_MxBxT1, key) -> (state,
loss)}`` with ``state = {"params", "opt_state", "step"}``, the eval step and
``init(key)``), without running the loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bcopt
from examples.lm import checkpoint as checkpoint_lib
from examples.lm import config as config_lib
from examples.lm import data as data_lib
from examples.lm import model as model_lib
from examples.lm import optimizer as optimizer_lib
from examples.lm import plot as plot_lib

DATA, FSDP = config_lib.MESH_AXES   # mesh axes: microbatches, shards
Config = config_lib.Config


def parse_args(argv=None) -> Config:
  """The flags as a ``config.Config`` (argparse exits on bad syntax)."""
  return config_lib.parse(argv, prog="python -m examples.lm.train",
                          description=__doc__.split("\n")[0])


def per_microbatch(fn: Callable, xs, *, mode: str, data: int):
  """``jax.vmap(fn)`` over the leading M axis of ``xs``, all at once or not.

  ``mode="scan"`` runs ``jax.lax.map`` over each data shard's M / D
  microbatches (step k computes the k-th microbatch of every shard at once),
  so one microbatch per device is live. The M axis is split as
  ``(D, M / D)``, which keeps every shard's microbatches on its device, and
  merged back in the same order: the scan never slices a sharded axis.
  """
  if mode == "vmap":
    return jax.vmap(fn)(xs)
  split = lambda x: jnp.swapaxes(x.reshape(data, -1, *x.shape[1:]), 0, 1)
  merge = lambda y: jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])
  return jax.tree.map(merge, jax.lax.map(jax.vmap(fn),
                                         jax.tree.map(split, xs)))


def microbatch_terms(state: dict, windows_MxBxT1: jax.Array, key: jax.Array,
                     *, model_cfg: model_lib.Config, mesh: jax.sharding.Mesh,
                     mode: str, grad_dtype: str, refresh: bool,
                     curvature: bool = False) -> tuple[dict, dict, jax.Array]:
  """The microbatch gradients of a step (and its other update inputs).

  Inside a step jitted on ``mesh``: the M axis of the windows and of the
  stacked gradients is sharded over ``data``, each microbatch's B windows
  over ``fsdp``, the gradients' parameter dimensions like the parameters.
  Sophia's labels of microbatch ``j`` are drawn with
  ``fold_in(fold_in(key, step), j)``, on every mesh. Arguments: see
  ``train_step``.

  Returns:
    ``(grads, extra, loss)``: the stacked gradients, ``{"curvature": ...}``
    on Sophia's refresh steps (else empty) and the mean training loss.
  """
  logits_fn, loss_fn = model_lib.make_loss_fns(model_cfg)
  params = state["params"]
  step_key = jax.random.fold_in(key, state["step"] + 1)
  stacked = jax.tree.map(   # of per-microbatch trees: M over data
      lambda s: jax.NamedSharding(mesh, jax.P(DATA, *s)),
      model_lib.partition_specs(model_cfg),
      is_leaf=lambda s: isinstance(s, jax.P))
  windows_MxBxT1 = jax.lax.with_sharding_constraint(
      windows_MxBxT1, jax.NamedSharding(mesh, jax.P(DATA, FSDP)))

  def microbatch(windows_BxT1, j):
    loss, grads = jax.value_and_grad(loss_fn)(params, windows_BxT1)
    out = {"loss": loss, "grads": jax.tree.map(
        lambda g: g.astype(grad_dtype), grads)}
    if refresh and curvature:   # Sophia: GNB curvature of the microbatch
      out["curvature"] = bcopt.gnb_diag(logits_fn, params, windows_BxT1[:, :-1],
                                        jax.random.fold_in(step_key, j))
    return out

  m = windows_MxBxT1.shape[0]
  out = per_microbatch(lambda xs: microbatch(*xs),
                       (windows_MxBxT1, jnp.arange(m)), mode=mode,
                       data=mesh.shape[DATA])
  extra = {k: jax.lax.with_sharding_constraint(out[k], stacked)
           for k in ("grads", "curvature") if k in out}
  return extra.pop("grads"), extra, out["loss"].mean()


def train_step(state: dict, windows_MxBxT1: jax.Array, key: jax.Array, *,
               tx: optax.GradientTransformation, update_kwargs: dict | None = None,
               **terms) -> tuple[dict, jax.Array]:
  """One optimizer step on M microbatches of B windows of T + 1 tokens.

  Args:
    state: ``{"params", "opt_state", "step"}`` (``step``: int32 steps done).
    windows_MxBxT1: int32 token windows.
    key: the run's PRNG key.
    tx: ``optimizer.make(cfg)``.
    update_kwargs: static keyword arguments of ``tx.update`` for this step
      kind (``optimizer.step_kwargs``: Shampoo's ``root_step``).
    **terms: ``microbatch_terms``' keyword arguments: ``model_cfg``,
      ``mesh``, ``mode`` (``"vmap"`` or ``"scan"``, see ``per_microbatch``),
      ``grad_dtype`` (of the stacked gradients), ``refresh`` (the
      optimizer's periodic step, ``optimizer.periodic_every``: Sophia's
      curvature refresh, Shampoo's root step) and ``curvature`` (the
      optimizer takes GNB curvature, computed on refresh steps).

  Returns:
    ``(state, loss)``: the state after the step and the mean training loss
    of the batch before it.
  """
  grads, extra, loss = microbatch_terms(state, windows_MxBxT1, key, **terms)
  params = state["params"]
  updates, opt_state = tx.update(grads, state["opt_state"], params, **extra,
                                 **(update_kwargs or {}))
  return {"params": optax.apply_updates(params, updates),
          "opt_state": opt_state, "step": state["step"] + 1}, loss


def monitor_step(state: dict, windows_MxBxT1: jax.Array, key: jax.Array, *,
                 measure: Callable, update_kwargs: dict | None = None,
                 **terms) -> dict[str, jax.Array]:
  """The bias monitor's figures (``optimizer.monitor``) of the step that
  ``train_step`` would take from ``state`` on these windows, as a periodic
  step; the state is not changed. Arguments: see ``train_step``."""
  grads, extra, _ = microbatch_terms(state, windows_MxBxT1, key, **terms)
  return measure(grads, state["opt_state"], state["params"], **extra,
                 **(update_kwargs or {}))


def eval_step(params, windows_NxMxBxT1: jax.Array, *,
              model_cfg: model_lib.Config) -> jax.Array:
  """Mean loss of ``params`` over N batches of M microbatches.

  Args:
    params: a parameter dict.
    windows_NxMxBxT1: int32 token windows, evaluated one batch at a time.
    model_cfg: the model.

  Returns:
    The mean next-token cross-entropy (a float32 scalar).
  """
  _, loss_fn = model_lib.make_loss_fns(model_cfg)
  loss_N = jax.lax.map(
      lambda w: jax.vmap(loss_fn, in_axes=(None, 0))(params, w).mean(),
      windows_NxMxBxT1)
  return loss_N.mean()


class Program(NamedTuple):
  """The jitted functions of a run (``build``)."""

  mesh: jax.sharding.Mesh            # ("data", "fsdp") of --mesh
  replicated: jax.sharding.Sharding  # of scalars (step, key, wall time)
  shardings: dict        # of the train state {"params", "opt_state", "step"}
  tx: optax.GradientTransformation   # optimizer.make(cfg)
  init: Callable         # key -> state {"params", "opt_state", "step"}
  restart: Callable      # params -> that state at step 0 (--init-from)
  train_steps: dict      # {periodic step?: (state, windows, key) -> (state,
  #                        loss)}; True only with optimizer.periodic_every
  eval_step: Callable    # (params, windows_NxMxBxT1) -> mean loss
  monitor: Callable      # (state, windows, key) -> {figure: scalar}, the
  #                        bias monitor of the step (optimizer.monitor)


def state_shardings(tx: optax.GradientTransformation, params,
                    param_shardings, replicated: jax.sharding.Sharding
                    ) -> dict:
  """Shardings of the train state: optimizer state leaves like parameters.

  A leaf of the optimizer state whose path ends with a parameter's path and
  has its shape (moments, averages) takes that parameter's sharding; any
  other leaf (counts, Shampoo's factors) is replicated.
  """
  by_path = {path: (x.shape, sharding) for (path, x), sharding in zip(
      jax.tree.leaves_with_path(params), jax.tree.leaves(param_shardings))}

  def like_param(path, x):
    for k in range(len(path)):
      shape, sharding = by_path.get(path[k:], (None, None))
      if shape == x.shape:
        return sharding
    return replicated

  return {"params": param_shardings,
          "opt_state": jax.tree.map_with_path(
              like_param, jax.eval_shape(tx.init, params)),
          "step": replicated}


def build(cfg: Config, model_cfg: model_lib.Config) -> Program:
  """Mesh, optimizer and jitted steps (each compiles on its first call).

  Args:
    cfg: the settings; no field in ``config.NOT_COMPILED`` is read.
    model_cfg: the model (``config.model_config(cfg, vocab_size)``).

  Returns:
    A ``Program``: the train steps (state donated; their ``key`` is the
    run's, ``jax.random.key(seed)``), the eval step, ``init``/``restart``.
  """
  shape = cfg.mesh_shape
  mesh = jax.make_mesh(
      (shape[DATA], shape[FSDP]), (DATA, FSDP),
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
      devices=jax.devices()[:shape[DATA] * shape[FSDP]])
  replicated = jax.NamedSharding(mesh, jax.P())
  tx = optimizer_lib.make(cfg)
  params = nnx.to_pure_dict(model_lib.abstract_params(model_cfg))
  shardings = state_shardings(tx, params, jax.tree.map(
      lambda s: jax.NamedSharding(mesh, s),
      model_lib.partition_specs(model_cfg),
      is_leaf=lambda s: isinstance(s, jax.P)), replicated)
  # --fast-compile: less LLVM optimisation and XLA CPU's simpler (legacy)
  # fusion emitters; a one-layer model's steps compile about 2x faster.
  options = ({"xla_backend_optimization_level": 0,
              "xla_llvm_disable_expensive_passes": True,
              "xla_cpu_use_fusion_emitters": False}
             if cfg.fast_compile else None)

  def restart(params):
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.int32(0)}

  def init(key):
    model = model_lib.Transformer(model_cfg, rngs=nnx.Rngs(key))
    return restart(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  periodic = optimizer_lib.has_periodic_step(cfg)
  terms = lambda refresh: dict(
      model_cfg=model_cfg, mesh=mesh, mode=cfg.microbatch_mode,
      grad_dtype=cfg.grad_dtype, refresh=refresh,
      curvature=optimizer_lib.takes_curvature(cfg),
      update_kwargs=optimizer_lib.step_kwargs(cfg, refresh))
  train_steps = {refresh: jax.jit(
      functools.partial(train_step, tx=tx, **terms(refresh)),
      out_shardings=(shardings, replicated), donate_argnums=0,
      compiler_options=options) for refresh in (False, True)[:1 + periodic]}
  # The monitor measures a periodic step (Sophia's shares need curvature).
  monitor = jax.jit(functools.partial(
      monitor_step, measure=optimizer_lib.monitor(cfg), **terms(periodic)),
                    out_shardings=replicated, compiler_options=options)
  return Program(
      mesh, replicated, shardings, tx,
      jax.jit(init, out_shardings=shardings),
      jax.jit(restart, out_shardings=shardings), train_steps,
      jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
              out_shardings=replicated, compiler_options=options), monitor)


def place(prog: Program, windows: np.ndarray, batch_axis: int) -> jax.Array:
  """Host windows on the mesh: ``batch_axis`` (M) over data, B over fsdp.

  Every process holds the same host windows (a pure function of ``(seed,
  step)``) and hands over only the shards of its own devices.
  """
  spec = [None] * windows.ndim
  spec[batch_axis:batch_axis + 2] = DATA, FSDP
  return jax.make_array_from_callback(
      windows.shape, jax.NamedSharding(prog.mesh, jax.P(*spec)),
      lambda index: windows[index])


def replicate(prog: Program, value) -> jax.Array:
  """A host value (the same on every process) on every device of the mesh."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, prog.replicated,
                                      lambda index: value[index])


def abstract_inputs(cfg: Config, prog: Program, model_cfg: model_lib.Config
                    ) -> tuple:
  """``(state, windows_MxBxT1, key)`` of the train steps, as sharded
  ``jax.ShapeDtypeStruct``s (nothing is allocated)."""
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                    sharding=s)
  key = jax.eval_shape(jax.random.key, 0)
  state = jax.tree.map(with_sharding, jax.eval_shape(prog.init, key),
                       prog.shardings)
  windows = jax.ShapeDtypeStruct(
      (cfg.microbatches, cfg.microbatch_size, cfg.seq_len + 1), jnp.int32,
      sharding=jax.NamedSharding(prog.mesh, jax.P(DATA, FSDP)))
  return state, windows, with_sharding(key, prog.replicated)


def step_memory(cfg: Config, model_cfg: model_lib.Config) -> dict:
  """Per-device bytes of each compiled train step (``{refresh: sizes}``).

  The steps are compiled for abstract inputs: ``argument``, ``output``,
  ``alias`` (outputs in donated arguments), ``temp`` (scratch) and
  ``peak`` = argument + output - alias + temp, an upper bound of what is
  live at once.
  """
  prog = build(cfg, model_cfg)
  inputs = abstract_inputs(cfg, prog, model_cfg)
  sizes = {}
  for refresh, step in prog.train_steps.items():
    m = step.lower(*inputs).compile().memory_analysis()
    b = {k: int(getattr(m, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
    sizes[refresh] = b | {"peak": b["argument"] + b["output"] - b["alias"]
                          + b["temp"]}
  return sizes


def dry_run(cfg: Config) -> dict:
  """--dry-run: sizes of the parameters, the optimizer state and the train
  step's per-device memory, all abstract (nothing is allocated)."""
  model_cfg = config_lib.model_config(
      cfg, cfg.vocab_size or data_lib.BYTE_VOCAB)
  params = nnx.to_pure_dict(model_lib.abstract_params(model_cfg))
  n = model_lib.count_params(params)
  print(f"params: {n}")
  opt_state = jax.eval_shape(optimizer_lib.make(cfg).init, params)
  print(f"optimizer state: {model_lib.count_params(opt_state)} numbers "
        f"({cfg.optimizer})")
  config_lib.validate(cfg)
  memory = step_memory(cfg, model_cfg)
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  for refresh, b in memory.items():
    kind = ("curvature refresh" if optimizer_lib.takes_curvature(cfg)
            else "root step")
    print(f"train step{f' ({kind})' if refresh else ''}, per "
          f"device on --mesh {cfg.mesh_name} "
          f"({cfg.microbatch_mode}, {cfg.grad_dtype} gradients): "
          + ", ".join(f"{k} {mib(v)}" for k, v in b.items()))
  return {"params": n, "memory": {("refresh" if refresh else "step"): b
                                  for refresh, b in memory.items()}}


def load_corpus(cfg: Config) -> data_lib.Corpus:
  """The corpus of --data or the Shakespeare plays of --*-plays."""
  corpus = data_lib.load_corpus(
      cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
      train_plays=cfg.train_plays, val_plays=cfg.val_plays,
      test_plays=cfg.test_plays)
  if cfg.vocab_size is not None and cfg.vocab_size < corpus.vocab_size:
    raise ValueError(f"--vocab-size {cfg.vocab_size} is smaller than the "
                     f"corpus's {corpus.vocab_size}")
  return corpus


def eval_losses(cfg: Config, prog: Program, state: dict, eval_sets: dict,
                splits) -> dict:
  """``{split}_loss`` (and ``{split}_loss_{average}``) of each split."""
  params = {"": state["params"],
            **optimizer_lib.averaged_params(cfg, state["opt_state"])}
  losses = {}
  for split in splits:
    for name, p in params.items():
      losses[f"{split}_loss" + (f"_{name}" if name else "")] = float(
          prog.eval_step(p, eval_sets[split]))
    if len(cfg.averages) == 1:
      losses[f"{split}_loss_avg"] = losses[f"{split}_loss_{cfg.averages[0]}"]
  return losses


MONITOR = ("noise_scale", "coupling", "jensen", "win_rate")  # its figures


def finite_or_none(x) -> float | None:
  """A float for JSON; None for inf or nan (an undefined noise scale)."""
  x = float(x)
  return x if math.isfinite(x) else None


def monitor_averages(records: list[dict]) -> dict[str, float]:
  """The monitor's figures averaged over a run's evaluations (undefined
  ones left out)."""
  values = {k: [r[k] for r in records if r.get(k) is not None]
            for k in MONITOR}
  return {k: float(np.mean(v)) for k, v in values.items() if v}


@contextlib.contextmanager
def ctrl_c_flag():
  """Yields a list that the first Ctrl-C makes non-empty (a second raises)."""
  pressed = []
  if threading.current_thread() is not threading.main_thread():
    yield pressed
    return

  def handler(signum, frame):
    del signum, frame
    if pressed:
      raise KeyboardInterrupt
    pressed.append(True)

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield pressed
  finally:
    signal.signal(signal.SIGINT, previous)


def train_loop(cfg: Config, prog: Program, corpus: data_lib.Corpus,
               state: dict, wall0: float, mngr, eval_sets: dict
               ) -> tuple[dict, list[dict], float]:
  """Steps from the state's step to --stop-at or --steps; logs, checkpoints.

  Returns:
    ``(state, records, wall_s)``: the last state, every metrics record of
    the run (earlier ones too when resumed) and the run's wall seconds.
  """
  from tqdm import tqdm   # pylint: disable=g-import-not-at-top
  out, start = pathlib.Path(cfg.out), int(state["step"])
  end = cfg.stop_at if cfg.stop_at is not None else cfg.steps
  shape = dict(microbatches=cfg.microbatches, batch_size=cfg.microbatch_size,
               seq_len=cfg.seq_len)
  tokens_per_step = cfg.microbatches * cfg.microbatch_size * cfg.seq_len
  schedule = optimizer_lib.learning_rate(cfg)
  every = optimizer_lib.periodic_every(cfg)   # of the periodic step kind
  key = jax.random.wrap_key_data(replicate(
      prog, jax.random.key_data(jax.random.key(cfg.seed))))
  is_main = jax.process_index() == 0
  records = (plot_lib.read_metrics(out / "metrics.jsonl", start)
             if start and is_main else [])
  if is_main:
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                               for r in records))
  t0 = time.time()
  wall = lambda: wall0 + time.time() - t0
  checkpoint = lambda step: checkpoint_lib.save(mngr, step, {
      **state, "wall_s": replicate(prog, np.float32(wall()))})
  bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
             disable={"auto": None, "on": False, "off": True}[cfg.progress])
  t_last, step_last = t0, start
  try:
    with ctrl_c_flag() as pressed, open(
        out / "metrics.jsonl" if is_main else os.devnull, "a") as log:
      for step in range(start + 1, end + 1):   # the 1-based step being taken
        windows = data_lib.train_batch(corpus.train, seed=cfg.seed, step=step,
                                       noise=cfg.noise, **shape)
        refresh = every is not None and (step - 1) % every == 0
        windows = place(prog, windows, 0)
        evaluate = (cfg.eval_every and step % cfg.eval_every == 0) or (
            step == cfg.steps)
        figures = ({k: finite_or_none(v) for k, v in prog.monitor(
            state, windows, key).items()} if evaluate else {})
        state, loss = prog.train_steps[refresh](state, windows, key)
        loss = float(loss)
        if not math.isfinite(loss):
          raise FloatingPointError(
              f"loss is {loss} at step {step}; stopping. The last good "
              f"checkpoint (step {mngr.latest_step()}) in {out} is kept; try "
              "a lower --lr or a smaller --clip-norm")
        record = {"step": step, "train_loss": loss,
                  "lr": float(schedule(step - 1)),
                  "tokens": step * tokens_per_step, "wall_s": round(wall(), 3)}
        if evaluate:
          record |= eval_losses(cfg, prog, state, eval_sets,
                                ("val", "test") if cfg.eval_test else ("val",))
          record |= figures
          bar.write(f"step {step}: " + ", ".join(
              f"{k} {v:.4f}" for k, v in record.items()
              if "_loss" in k and not k.endswith("_avg")))
        log.write(json.dumps(record) + "\n")
        log.flush()
        records.append(record)
        if time.time() - t_last > 1.0 or step == end:
          tok_s = (step - step_last) * tokens_per_step / (time.time() - t_last)
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
          t_last, step_last = time.time(), step
        bar.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and (
            step != end):
          checkpoint(step)
        if pressed:
          checkpoint(step)
          bar.write(f"interrupted: checkpoint of step {step} saved in {out}; "
                    "continue with --resume")
          raise KeyboardInterrupt
      checkpoint(end)
  finally:
    bar.close()
    mngr.wait_until_finished()
    if is_main and records:
      plot_lib.plot(out, records)
  return state, records, wall()


def run(cfg: Config, argv: list[str], corpus: data_lib.Corpus,
        model_cfg: model_lib.Config, mngr) -> dict | None:
  """Trains with checkpoints in ``mngr``; the summary (None if stopped)."""
  run_config = config_lib.run_config(cfg, model_cfg)
  checkpoint_lib.prepare(cfg.out, run_config, mngr, resume=cfg.resume)
  prog = build(cfg, model_cfg)
  state, wall0, init_from = checkpoint_lib.start(
      cfg, mngr, model_cfg, init=prog.init, restart=prog.restart,
      shardings=prog.shardings)
  num_params = model_lib.count_params(state["params"])
  eval_sets = {split: place(prog, data_lib.eval_batches(
      getattr(corpus, split), num_batches=cfg.eval_batches,
      microbatches=cfg.microbatches, batch_size=cfg.microbatch_size,
      seq_len=cfg.seq_len), 1) for split in ("val", "test")}
  with jax.set_mesh(prog.mesh):
    state, records, wall_s = train_loop(cfg, prog, corpus, state, wall0,
                                        mngr, eval_sets)
  if cfg.stop_at is not None and cfg.stop_at < cfg.steps:
    print(f"stopped after step {cfg.stop_at} (--stop-at); checkpoint saved "
          f"in {cfg.out}; continue with --resume")
    return None
  # The last record holds the held-out losses of the final parameters.
  final = {k: v for k, v in records[-1].items()
           if k.startswith(("val_loss", "test_loss"))}
  if not cfg.eval_test:
    final |= eval_losses(cfg, prog, state, eval_sets, ("test",))
  summary = {f"final_{name}_{k[len(split) + 1:]}": v   # eval: the test plays
             for split, name in (("val", "val"), ("test", "eval"))
             for k, v in sorted(final.items()) if k.startswith(f"{split}_")}
  summary |= {
      "params": num_params,
      "tokens": cfg.steps * cfg.microbatches * cfg.microbatch_size
                * cfg.seq_len,
      "wall_s": round(wall_s, 3), "data": corpus.source,
      "init_from": init_from, "config": run_config,
      "monitor": monitor_averages(records),
      "command": " ".join(["python -m examples.lm.train"]
                          + [shlex.quote(a) for a in argv])}
  if jax.process_index() == 0:
    (pathlib.Path(cfg.out) / "summary.json").write_text(
        json.dumps(summary, indent=1) + "\n")
  print(f"final validation loss {summary['final_val_loss']:.4f}, test loss "
        f"{summary['final_eval_loss']:.4f}; outputs in {cfg.out}")
  return summary


def main(argv=None) -> dict | None:
  """Runs the command; returns the summary (None after --stop-at).

  Raises:
    ValueError: bad settings (before anything compiles) or a --resume or
      --init-from that does not fit this run.
    FileNotFoundError: missing data or --init-from checkpoints.
    FloatingPointError: a NaN or infinite training loss.
    KeyboardInterrupt: Ctrl-C, after saving a checkpoint.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  cfg = parse_args(argv)
  config_lib.validate_processes(cfg)
  if cfg.dry_run:   # on this process's (possibly simulated) devices only
    return dry_run(cfg)
  if cfg.coordinator is not None:
    # CPU processes exchange collectives through gloo (accelerators use
    # their own; the setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cfg.coordinator, cfg.num_processes,
                               cfg.process_id)
  elif cfg.distributed:
    jax.distributed.initialize()
  config_lib.validate(cfg)
  corpus = load_corpus(cfg)
  model_cfg = config_lib.model_config(cfg, cfg.vocab_size or corpus.vocab_size)
  with contextlib.closing(checkpoint_lib.manager(cfg.out)) as mngr:
    return run(cfg, argv, corpus, model_cfg, mngr)


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit(130)
