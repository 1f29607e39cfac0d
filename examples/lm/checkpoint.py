"""Orbax checkpoints of a run: save, resume, ``--init-from``, read back.

A checkpoint is one item, ``{"params", "opt_state", "step", "wall_s"}``
(the train state of ``train.py`` plus the run's wall time so far), saved with
``ocp.args.StandardSave`` under ``RUN/checkpoints/STEP``; the last three are
kept. ``prepare`` checks a run folder and writes its ``config.json``;
``start`` makes a run's first state (new, ``--init-from`` or ``--resume``);
``restore`` continues a run against its own state;
``load_params`` (``--init-from``) restores only the ``params`` of another
run's latest checkpoint, against the abstract parameters of this run's
model; ``restore_run`` reads any run's latest checkpoint back with the
structure of its ``config.json`` (for benchmarks and notebooks).

Fine-tuning: ``--init-from DIR`` starts from the parameters of the latest
checkpoint of an earlier run in ``DIR`` (same model shapes), with a fresh
optimizer (and averages) at step 0, e.g.::

    python -m examples.lm.train --train-plays comedies,histories \\
        --out runs/pre
    python -m examples.lm.train --init-from runs/pre --train-plays hamlet \\
        --val-plays king-lear --test-plays macbeth --average ema,bema \\
        --schedule constant --lr 1e-3 --out runs/ft
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from examples.lm import config as config_lib
from examples.lm import model as model_lib
from examples.lm import optimizer as optimizer_lib

KEEP = 3   # checkpoints kept per run


def manager(out: pathlib.Path | str) -> ocp.CheckpointManager:
  """The manager of ``out/checkpoints`` (created if missing)."""
  return ocp.CheckpointManager(
      (pathlib.Path(out) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: dict) -> None:
  """Saves ``state`` as ``step`` (once) and waits until it is written."""
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def prepare(out: pathlib.Path | str, run_config: dict,
            mngr: ocp.CheckpointManager, *, resume: bool) -> None:
  """Checks ``out`` for a new run or a ``--resume``; writes config.json.

  Args:
    out: the run's ``--out``.
    run_config: its ``config.run_config``.
    mngr: ``manager(out)``.
    resume: whether the run continues the checkpoints in ``out``.

  Raises:
    ValueError: ``--resume`` with settings that may not change
      (``config.changed_on_resume``), or a new run in an ``out`` that
      already holds checkpoints.
  """
  out = pathlib.Path(out)
  if resume and (out / "config.json").exists():
    diffs = config_lib.changed_on_resume(
        json.loads((out / "config.json").read_text()), run_config)
    if diffs:
      raise ValueError(f"--resume: the run in {out} used different settings "
                       f"for {diffs}; resume with the same flags")
  elif not resume and mngr.latest_step() is not None:
    raise ValueError(f"{out / 'checkpoints'} already holds checkpoints; pass "
                     "--resume to continue them or choose another --out")
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    # Atomically: on --resume the other processes may be reading the old
    # file right now, and a truncated one would fail them alone (process 0
    # then waits for them in its first collective until the distributed
    # shutdown barrier times out).
    tmp = out / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(run_config, indent=1) + "\n")
    os.replace(tmp, out / "config.json")


def restore(mngr: ocp.CheckpointManager, like: dict) -> dict:
  """The latest checkpoint, restored like ``like`` (structure, shardings)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return mngr.restore(mngr.latest_step(),
                      args=ocp.args.StandardRestore(abstract))


def start(cfg: config_lib.Config, mngr: ocp.CheckpointManager,
          model_cfg: model_lib.Config, *, init, restart,
          shardings: dict) -> tuple[dict, float, dict | None]:
  """A run's first state: new, from ``--init-from``, or resumed.

  Args:
    cfg: the run's settings.
    mngr: ``manager(cfg.out)``.
    model_cfg: the run's model.
    init: ``key -> state``, a new state (``train.Program.init``).
    restart: ``params -> state`` at step 0 (``train.Program.restart``).
    shardings: where the state lives (``train.Program.shardings``).

  Returns:
    ``(state, wall_s, init_from)``: the train state, the wall seconds of
    the run so far and the summary's ``init_from`` (``{"dir", "step"}``;
    step None when resumed; None without ``--init-from``).
  """
  resuming = cfg.resume and mngr.latest_step() is not None
  if cfg.init_from is not None and not resuming:
    params, step = load_params(cfg.init_from, model_cfg, shardings["params"])
    print(f"initialised from the parameters of step {step} in "
          f"{cfg.init_from}")
    return restart(params), 0.0, {"dir": cfg.init_from, "step": step}
  init_from = None if cfg.init_from is None else {"dir": cfg.init_from,
                                                  "step": None}
  state = init(jax.random.key(cfg.seed))
  if not resuming:
    return state, 0.0, init_from
  state = restore(mngr, {**state, "wall_s": jax.ShapeDtypeStruct(
      (), np.float32, sharding=shardings["step"])})
  print(f"resumed from step {int(state['step'])} in "
        f"{pathlib.Path(cfg.out) / 'checkpoints'}")
  return state, float(state.pop("wall_s")), init_from


def _with_sharding(abstract, sharding):
  """``abstract`` with one sharding, or a tree of them, on its leaves."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, sharding)


def _check_same_model(run_dir: pathlib.Path,
                      model_cfg: model_lib.Config) -> None:
  """--init-from: ``model_cfg`` against the model in ``run_dir/config.json``.

  Raises:
    ValueError: naming each field that differs, e.g. ``d_ff (64 there, 96
      here)``.
  """
  path = run_dir / "config.json"
  if not path.exists():
    return
  old = json.loads(path.read_text())["model"]
  new = dataclasses.asdict(model_cfg)
  diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diffs:
    raise ValueError(
        f"--init-from {run_dir}: its model differs in "
        + ", ".join(f"{k} ({old.get(k)} there, {new.get(k)} here)"
                    for k in diffs) + "; use the same --preset/--model")


def load_params(run_dir: pathlib.Path | str, model_cfg: model_lib.Config,
                sharding) -> tuple[dict, int]:
  """``--init-from``: the parameters of a run's latest checkpoint.

  Restores only the ``params`` of the checkpoint (a partial restore), as
  arrays placed with ``sharding``, against the abstract parameters of
  ``model_cfg``; the optimizer state there is not read.

  Args:
    run_dir: the ``--out`` of the earlier run.
    model_cfg: this run's model.
    sharding: where the parameters go (one sharding or a tree of them).

  Returns:
    ``(params, step)``: a parameter dict and the checkpoint's step.

  Raises:
    FileNotFoundError: no checkpoints in ``run_dir``.
    ValueError: the run's model differs from ``model_cfg`` (the fields are
      named), or its parameters do not match the model's names or shapes.
  """
  src = pathlib.Path(run_dir)
  if not (src / "checkpoints").is_dir():
    raise FileNotFoundError(f"--init-from {src}: no checkpoints/ folder; "
                            "give the --out of an earlier run")
  _check_same_model(src, model_cfg)
  target = {"params": _with_sharding(
      nnx.to_pure_dict(model_lib.abstract_params(model_cfg)), sharding)}
  with contextlib.closing(ocp.CheckpointManager(
      (src / "checkpoints").absolute(),
      item_handlers=ocp.PyTreeCheckpointHandler())) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"--init-from {src}: no checkpoints in "
                              f"{src / 'checkpoints'}")
    problems = _mismatches(target["params"],
                           mngr.item_metadata(step).tree["params"])
    if problems:
      raise ValueError(f"--init-from {src} (step {step}): parameters do not "
                       "match the model: " + "; ".join(problems[:5]))
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return restored["params"], step


def _mismatches(abstract, saved) -> list[str]:
  """How saved parameter metadata differ from the abstract parameters."""
  def str_keys(tree):   # orbax stores dict keys as strings (layer 0 -> "0")
    if not isinstance(tree, dict):
      return tree
    return {str(k): str_keys(v) for k, v in tree.items()}

  def compare(path, want, got):
    if (tuple(got.shape), got.dtype) == (want.shape, want.dtype):
      return []
    return [f"{jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)} "
            f"there, {want.dtype}{list(want.shape)} here"]

  try:
    return jax.tree.leaves(jax.tree.map_with_path(compare, str_keys(abstract),
                                                  saved))
  except ValueError as e:   # other parameter names
    return [str(e)]


def restore_run(run_dir: pathlib.Path | str
                ) -> tuple[config_lib.Config, model_lib.Config, dict]:
  """A run's settings and latest checkpoint, with the state's structure.

  The optimizer state comes back as the optimizer's own types (e.g.
  ``bcopt.BEMAState``), so ``optimizer.averaged_params(cfg, opt_state)``
  reads its ``--average`` parameters.

  Args:
    run_dir: the run's ``--out`` (with ``config.json`` and checkpoints).

  Returns:
    ``(cfg, model_cfg, state)``: the run's ``config.Config``, its
    ``model.Config`` and ``{"params", "opt_state", "step", "wall_s"}`` of
    the latest checkpoint, on the first device.

  Raises:
    FileNotFoundError: no ``config.json`` or no checkpoints.
  """
  src = pathlib.Path(run_dir)
  saved = json.loads((src / "config.json").read_text())
  cfg = config_lib.from_dict(saved["args"])
  model_cfg = model_lib.Config(**saved["model"])
  params = nnx.to_pure_dict(model_lib.abstract_params(model_cfg))
  like = {"params": params,
          "opt_state": jax.eval_shape(optimizer_lib.make(cfg).init, params),
          "step": jax.ShapeDtypeStruct((), np.int32),
          "wall_s": jax.ShapeDtypeStruct((), np.float32)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with contextlib.closing(manager(src)) as mngr:
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"{src}: no checkpoints in "
                              f"{src / 'checkpoints'}")
    return cfg, model_cfg, restore(mngr, _with_sharding(like, device))
