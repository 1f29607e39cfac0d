"""Tests of examples/lm/checkpoint.py: save and restore, ``--init-from``
against the abstract parameters, reading a run back, and its errors.

States are made eagerly (``tx.init`` of random parameters, no compiled
step), with the averages set to known values so the read-back is exact.
"""

import contextlib
import dataclasses
import json

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import bcopt
from examples.lm import checkpoint as checkpoint_lib
from examples.lm import config as config_lib
from examples.lm import model as model_lib
from examples.lm import optimizer as optimizer_lib
from examples.lm import train

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def run_settings(tiny, out, *extra):
  cfg = train.parse_args(tiny.flags(out, "sophia_bc", *extra))
  return cfg, config_lib.model_config(cfg, 256)


def random_params(model_cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype)),
      nnx.to_pure_dict(model_lib.abstract_params(model_cfg)))


def prepare(out, cfg, model_cfg):
  with contextlib.closing(checkpoint_lib.manager(out)) as mngr:
    checkpoint_lib.prepare(out, config_lib.run_config(cfg, model_cfg), mngr,
                           resume=False)


def save(out, step, state):
  with contextlib.closing(checkpoint_lib.manager(out)) as mngr:
    checkpoint_lib.save(mngr, step, state)


def plus(tree, c):
  return jax.tree.map(lambda x: x + c, tree)


def state_of(cfg, params, step=5):
  """A checkpoint state whose EMA is params + 1 and BEMA params + 2."""
  opt_state = list(optimizer_lib.make(cfg).init(params))
  for k, name in enumerate(cfg.averages):
    i = optimizer_lib.AVERAGE_INDEX + k
    opt_state[i] = opt_state[i]._replace(
        average=plus(params, {"ema": 1.0, "bema": 2.0}[name]))
  return {"params": params, "opt_state": tuple(opt_state),
          "step": jax.device_put(np.int32(step)),
          "wall_s": jax.device_put(np.float32(1.5))}


def test_save_and_restore_round_trip(tiny, tmp_path):
  cfg, model_cfg = run_settings(tiny, tmp_path, "--average", "ema,bema")
  states = {step: state_of(cfg, random_params(model_cfg, step), step)
            for step in range(1, 6)}
  with contextlib.closing(checkpoint_lib.manager(tmp_path)) as mngr:
    for step, state in states.items():
      checkpoint_lib.save(mngr, step, state)
    checkpoint_lib.save(mngr, 5, states[1])     # the step exists: kept as is
    assert mngr.all_steps() == [3, 4, 5]        # the last three
    restored = checkpoint_lib.restore(mngr, states[1])
  chex.assert_trees_all_equal(restored, states[5])
  chex.assert_trees_all_equal_dtypes(restored, states[5])
  assert isinstance(restored["opt_state"][1][0], bcopt.ScaleBySophiaBCState)
  assert isinstance(restored["opt_state"][3], bcopt.BEMAState)


def test_init_from_restores_only_the_params(tiny, tmp_path):
  cfg, model_cfg = run_settings(tiny, tmp_path)
  params = random_params(model_cfg)
  prepare(tmp_path, cfg, model_cfg)
  save(tmp_path, 7, state_of(cfg, params, 7))
  # Another optimizer here: only the parameters are read.
  loaded, step = checkpoint_lib.load_params(tmp_path, model_cfg, DEVICE)
  assert step == 7
  chex.assert_trees_all_equal(loaded, params)
  assert all(x.sharding == DEVICE for x in jax.tree.leaves(loaded))


def test_init_from_errors(tiny, tmp_path):
  cfg, model_cfg = run_settings(tiny, tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint_lib.load_params(tmp_path / "missing", model_cfg, DEVICE)
  prepare(tmp_path / "run", cfg, model_cfg)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoint_lib.load_params(tmp_path / "run", model_cfg, DEVICE)
  save(tmp_path / "run", 2, state_of(cfg, random_params(model_cfg)))
  wider = dataclasses.replace(model_cfg, d_ff=96, num_heads=4)
  with pytest.raises(ValueError, match=r"its model differs in d_ff \(64 "
                     r"there, 96 here\), num_heads \(2 there, 4 here\)"):
    checkpoint_lib.load_params(tmp_path / "run", wider, DEVICE)
  (tmp_path / "run" / "config.json").unlink()   # the shapes tell it now
  with pytest.raises(ValueError, match=(
      r"\(step 2\): parameters do not match the model: \['layers'\]\['0'\]"
      r"\['mlp'\]\['down_proj'\]\['kernel'\] is float32\[64, 32\] there, "
      r"float32\[96, 32\] here; .*\['gate_proj'\]")):
    checkpoint_lib.load_params(tmp_path / "run",
                               dataclasses.replace(model_cfg, d_ff=96), DEVICE)
  deeper = dataclasses.replace(model_cfg, num_layers=2)
  with pytest.raises(ValueError, match="do not match the model: .*children"):
    checkpoint_lib.load_params(tmp_path / "run", deeper, DEVICE)


def test_restore_run_reads_the_settings_state_and_averages(tiny, tmp_path):
  cfg, model_cfg = run_settings(tiny, tmp_path, "--average", "ema,bema")
  params = random_params(model_cfg)
  prepare(tmp_path, cfg, model_cfg)
  save(tmp_path, 4, state_of(cfg, params, 4))
  got_cfg, got_model_cfg, state = checkpoint_lib.restore_run(tmp_path)
  assert (got_cfg, got_model_cfg) == (cfg, model_cfg)
  assert int(state["step"]) == 4 and float(state["wall_s"]) == 1.5
  chex.assert_trees_all_equal(state["params"], params)
  averages = optimizer_lib.averaged_params(got_cfg, state["opt_state"])
  assert list(averages) == ["ema", "bema"]
  chex.assert_trees_all_equal(averages["ema"], plus(params, 1.0))
  chex.assert_trees_all_equal(averages["bema"], plus(params, 2.0))


def test_prepare_checks_new_runs_and_resumes(tiny, tmp_path):
  cfg, model_cfg = run_settings(tiny, tmp_path)
  run_config = config_lib.run_config(cfg, model_cfg)
  prepare(tmp_path, cfg, model_cfg)
  assert json.loads((tmp_path / "config.json").read_text()) == run_config
  save(tmp_path, 1, state_of(cfg, random_params(model_cfg), 1))
  moved = config_lib.run_config(dataclasses.replace(cfg, stop_at=3, devices=2),
                                model_cfg)
  changed = config_lib.run_config(dataclasses.replace(cfg, lr=0.5), model_cfg)
  with contextlib.closing(checkpoint_lib.manager(tmp_path)) as mngr:
    with pytest.raises(ValueError, match="already holds checkpoints"):
      checkpoint_lib.prepare(tmp_path, run_config, mngr, resume=False)
    checkpoint_lib.prepare(tmp_path, moved, mngr, resume=True)
    assert json.loads((tmp_path / "config.json").read_text()) == moved
    with pytest.raises(ValueError, match=r"different settings for \['lr'\]"):
      checkpoint_lib.prepare(tmp_path, changed, mngr, resume=True)


def test_resume_replaces_config_json_whole(tiny, tmp_path):
  """On --resume every process reads config.json while process 0 rewrites
  it: a reader that opened the old file still reads all of it (a rewrite in
  place would truncate it under the reader), and no temporary is left."""
  cfg, model_cfg = run_settings(tiny, tmp_path)
  prepare(tmp_path, cfg, model_cfg)
  old = (tmp_path / "config.json").read_text()
  moved = config_lib.run_config(dataclasses.replace(cfg, stop_at=3),
                                model_cfg)
  with open(tmp_path / "config.json") as reader, contextlib.closing(
      checkpoint_lib.manager(tmp_path)) as mngr:
    checkpoint_lib.prepare(tmp_path, moved, mngr, resume=True)
    assert reader.read() == old
  assert json.loads((tmp_path / "config.json").read_text()) == moved
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints",
                                                         "config.json"]
