"""Train the Qwen2-style model of model.py with a bcopt optimizer.

    python -m examples.lm.train --optimizer adamw_bc --steps 1000

One pure jitted train step with donated state: per-microbatch gradients by
``jax.vmap`` (and, on Sophia's refresh steps, per-microbatch GNB curvature),
then optimizer.py's chain. ``--devices D`` runs it in ``jax.shard_map`` over
a 1-D mesh ``("data",)`` with the optimizer's ``axis_name="data"``. Batches
are a pure function of ``(seed, step)``, so ``--resume`` reproduces the
uninterrupted run exactly on CPU. Flags, outputs and interruptions:
docs/lm_example.md.

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

AXIS = "data"   # mesh axis (and bcopt axis_name) of the microbatches
Config = config_lib.Config


def parse_args(argv=None) -> Config:
  """The flags as a ``config.Config`` (argparse exits on bad syntax)."""
  return config_lib.parse(argv, prog="python -m examples.lm.train",
                          description=__doc__.split("\n")[0])


def train_step(state: dict, windows_MxBxT1: jax.Array, key: jax.Array, *,
               tx: optax.GradientTransformation, model_cfg: model_lib.Config,
               axis_name: str | None, refresh: bool) -> tuple[dict, jax.Array]:
  """One optimizer step on M microbatches of B windows of T + 1 tokens.

  Under ``shard_map`` (``axis_name`` set) each device holds its M / D
  microbatches, and the Sophia labels of global microbatch ``j`` are drawn
  with ``fold_in(fold_in(key, step), j)`` on every device count.

  Args:
    state: ``{"params", "opt_state", "step"}`` (``step``: int32 steps done).
    windows_MxBxT1: int32 token windows (this device's microbatches).
    key: the run's PRNG key.
    tx: ``optimizer.make(cfg, axis_name)``.
    model_cfg: the model.
    axis_name: the mesh axis of the microbatches, or None on one device.
    refresh: a Sophia curvature-refresh step (GNB curvature is computed and
      passed to ``tx`` as ``curvature``).

  Returns:
    ``(state, loss)``: the state after the step and the mean training loss
    of the batch before it.
  """
  logits_fn, loss_fn = model_lib.make_loss_fns(model_cfg)
  step, params = state["step"] + 1, state["params"]
  # The replicated params are cast to device-varying before differentiating:
  # the gradient of a replicated input would otherwise be summed over the
  # devices, mixing their microbatches.
  local = (params if axis_name is None
           else jax.lax.pcast(params, axis_name, to="varying"))
  loss_M, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(
      local, windows_MxBxT1)
  extra = {}
  if refresh:   # Sophia: GNB curvature of every microbatch
    m_local = windows_MxBxT1.shape[0]
    first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * m_local
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda j: jax.random.fold_in(step_key, first + j))(
        jnp.arange(m_local))
    extra["curvature"] = jax.vmap(bcopt.gnb_diag, in_axes=(None, None, 0, 0))(
        logits_fn, local, windows_MxBxT1[..., :-1], keys)
  updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
  loss = loss_M.mean()
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return {"params": optax.apply_updates(params, updates),
          "opt_state": opt_state, "step": step}, loss


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

  mesh: jax.sharding.Mesh | None     # 1-D ("data",) for --devices > 1
  replicated: jax.sharding.Sharding  # of the train state
  tx: optax.GradientTransformation   # optimizer.make(cfg, axis_name)
  init: Callable         # key -> state {"params", "opt_state", "step"}
  restart: Callable      # params -> that state at step 0 (--init-from)
  train_steps: dict      # {refresh: (state, windows, key) -> (state, loss)}
  eval_step: Callable    # (params, windows_NxMxBxT1) -> mean loss


def build(cfg: Config, model_cfg: model_lib.Config) -> Program:
  """Mesh, optimizer and jitted steps (each compiles on its first call).

  Args:
    cfg: the settings; no field in ``config.NOT_COMPILED`` is read.
    model_cfg: the model (``config.model_config(cfg, vocab_size)``).

  Returns:
    A ``Program``: the train steps (state donated; their ``key`` is the
    run's, ``jax.random.key(seed)``), the eval step, ``init``/``restart``.
  """
  mesh, axis_name = None, None
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if cfg.devices > 1:
    mesh = jax.make_mesh((cfg.devices,), (AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:cfg.devices])
    axis_name, replicated = AXIS, jax.NamedSharding(mesh, jax.P())
  tx = optimizer_lib.make(cfg, axis_name)
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

  train_steps = {}
  for refresh in (False, True) if optimizer_lib.takes_curvature(cfg) else (
      False,):
    step = functools.partial(train_step, tx=tx, model_cfg=model_cfg,
                             axis_name=axis_name, refresh=refresh)
    if mesh is not None:
      step = jax.shard_map(step, mesh=mesh,
                           in_specs=(jax.P(), jax.P(AXIS), jax.P()),
                           out_specs=(jax.P(), jax.P()))
    train_steps[refresh] = jax.jit(step, donate_argnums=0,
                                   compiler_options=options)
  return Program(
      mesh, replicated, tx, jax.jit(init, out_shardings=replicated),
      jax.jit(restart, out_shardings=replicated), train_steps,
      jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
              compiler_options=options))


def place(prog: Program, windows: np.ndarray, batch_axis: int) -> jax.Array:
  """Host windows on the devices, ``batch_axis`` (M) split over the mesh."""
  if prog.mesh is None:
    return jax.device_put(windows, prog.replicated)
  spec = [None] * windows.ndim
  spec[batch_axis] = AXIS
  return jax.make_array_from_callback(
      windows.shape, jax.NamedSharding(prog.mesh, jax.P(*spec)),
      lambda index: windows[index])


def dry_run(cfg: Config) -> dict:
  """--dry-run: prints the parameter and optimizer-state sizes, abstractly."""
  model_cfg = config_lib.model_config(
      cfg, cfg.vocab_size or data_lib.BYTE_VOCAB)
  params = nnx.to_pure_dict(model_lib.abstract_params(model_cfg))
  n = model_lib.count_params(params)
  print(f"params: {n}")
  opt_state = jax.eval_shape(optimizer_lib.make(cfg).init, params)
  print(f"optimizer state: {model_lib.count_params(opt_state)} numbers "
        f"({cfg.optimizer})")
  return {"params": n}


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
  key = jax.device_put(jax.random.key(cfg.seed), prog.replicated)
  is_main = jax.process_index() == 0
  records = plot_lib.read_metrics(out / "metrics.jsonl", start) if start else []
  if is_main:
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                               for r in records))
  t0 = time.time()
  wall = lambda: wall0 + time.time() - t0
  checkpoint = lambda step: checkpoint_lib.save(mngr, step, {
      **state, "wall_s": jax.device_put(np.float32(wall()), prog.replicated)})
  bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
             disable={"auto": None, "on": False, "off": True}[cfg.progress])
  t_last, step_last = t0, start
  try:
    with ctrl_c_flag() as pressed, open(
        out / "metrics.jsonl" if is_main else os.devnull, "a") as log:
      for step in range(start + 1, end + 1):   # the 1-based step being taken
        windows = data_lib.train_batch(corpus.train, seed=cfg.seed, step=step,
                                       noise=cfg.noise, **shape)
        refresh = (optimizer_lib.takes_curvature(cfg)
                   and (step - 1) % cfg.curvature_every == 0)
        state, loss = prog.train_steps[refresh](state, place(prog, windows, 0),
                                                key)
        loss = float(loss)
        if not math.isfinite(loss):
          raise FloatingPointError(
              f"loss is {loss} at step {step}; stopping. The last good "
              f"checkpoint (step {mngr.latest_step()}) in {out} is kept; try "
              "a lower --lr or a smaller --clip-norm")
        record = {"step": step, "train_loss": loss,
                  "lr": float(schedule(step - 1)),
                  "tokens": step * tokens_per_step, "wall_s": round(wall(), 3)}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
          record |= eval_losses(cfg, prog, state, eval_sets,
                                ("val", "test") if cfg.eval_test else ("val",))
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
      sharding=prog.replicated)
  num_params = model_lib.count_params(state["params"])
  eval_sets = {split: place(prog, data_lib.eval_batches(
      getattr(corpus, split), num_batches=cfg.eval_batches,
      microbatches=cfg.microbatches, batch_size=cfg.microbatch_size,
      seq_len=cfg.seq_len), 1) for split in ("val", "test")}
  state, records, wall_s = train_loop(cfg, prog, corpus, state, wall0, mngr,
                                      eval_sets)
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
  if cfg.distributed:
    jax.distributed.initialize()
  if cfg.dry_run:
    return dry_run(cfg)
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
