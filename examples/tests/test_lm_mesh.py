"""Tests of the example on meshes and processes (docs/scale_out.md).

``--mesh data=2,fsdp=2`` trains like ``--mesh data=4``, ``--microbatch-mode
scan`` like ``vmap``, and two processes of two devices each (a local
coordinator, gloo collectives on CPU) like one process of four devices,
through a ``--stop-at``/``--resume``: every logged loss to 1e-5. The state
is sharded as documented, bfloat16 gradients train, and ``--dry-run`` prints
the compiled step's memory. Runs use the tiny run of conftest.py; the pytest
process has 8 simulated CPU devices (conftest.py at the root), the
subprocesses 2 each.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from examples.lm import config as config_lib
from examples.lm import data as data_lib
from examples.lm import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-5


def losses(out: pathlib.Path) -> list[dict]:
  """Every logged loss of a run, per step (``*_loss*`` keys)."""
  return [{k: v for k, v in r.items() if "_loss" in k} for r in map(
      json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def assert_same_losses(got: pathlib.Path, want: pathlib.Path,
                       rtol: float = LOSS_RTOL):
  a, b = losses(got), losses(want)
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  np.testing.assert_allclose([r[k] for r in a for k in sorted(r)],
                             [r[k] for r in b for k in sorted(r)], rtol=rtol)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
  """``run(*flags)``: the out folder of a tiny AdamW-BC run, once per flags.

  Every run logs validation and test losses at steps 4 and 8.
  """
  cache = {}

  def get(*extra):
    if extra not in cache:
      out = tmp_path_factory.mktemp("run")
      train.main(tiny.flags(out, "adamw_bc", "--eval-test", *extra))
      cache[extra] = out
    return cache[extra]

  return get


def test_fsdp_trains_like_data_parallel(run):
  assert_same_losses(run("--mesh", "data=2,fsdp=2"), run("--mesh", "data=4"))


def test_scan_trains_like_vmap(run):
  assert_same_losses(run("--mesh", "data=2", "--microbatch-mode", "scan"),
                     run("--mesh", "data=4"))


def test_bfloat16_gradients_train(run):
  got, want = losses(run("--grad-dtype", "bfloat16")), losses(
      run("--mesh", "data=4"))
  assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"],
                                               rel=1e-6)   # before any update
  assert got[-1]["train_loss"] != want[-1]["train_loss"]
  np.testing.assert_allclose([r["train_loss"] for r in got],
                             [r["train_loss"] for r in want], rtol=2e-2)


def test_state_is_sharded_over_fsdp(tiny, tmp_path):
  cfg = train.parse_args(tiny.flags(tmp_path, "adamw_bc", "--mesh",
                                    "data=2,fsdp=2", "--average", "bema"))
  prog = train.build(cfg, config_lib.model_config(cfg, data_lib.BYTE_VOCAB))
  state = prog.init(jax.random.key(0))
  spec = lambda x: tuple(x.sharding.spec)
  params = state["params"]
  assert spec(params["embed"]["embedding"]) == ("fsdp", None)
  assert spec(params["layers"][0]["mlp"]["down_proj"]["kernel"]) == (
      None, "fsdp")
  assert spec(params["norm"]["scale"]) == ()
  # Every optimizer-state leaf shaped like a parameter (Adam's moments,
  # BEMA's snapshot and EMA) is sharded like it; the rest is replicated.
  by_shape = {}
  for x in jax.tree.leaves(params):
    by_shape.setdefault(x.shape, set()).add(spec(x))
  sharded = [x for x in jax.tree.leaves(state["opt_state"])
             if spec(x) != ()]
  assert len(sharded) >= 3 * 6   # mu, nu, snapshot, EMA of 6 matrices
  for x in jax.tree.leaves(state["opt_state"]):
    assert spec(x) in by_shape.get(x.shape, set()) | {()}
  # A step keeps every type and sharding (the state is donated).
  before = jax.tree.map(lambda x: (jax.typeof(x), x.sharding), state)
  tokens = data_lib.encode(pathlib.Path(tiny.corpus_path).read_text())
  windows = data_lib.train_batch(tokens, seed=0, step=1, microbatches=4,
                                 batch_size=2, seq_len=32)
  state, _ = prog.train_steps[False](state, train.place(prog, windows, 0),
                                     jax.random.key(0))
  assert jax.tree.map(lambda x: (jax.typeof(x), x.sharding), state) == before


def test_dry_run_prints_the_step_memory(tiny, tmp_path, capsys):
  def dry(*extra):
    summary = train.main(tiny.flags(tmp_path, "adamw_bc", "--dry-run",
                                    *extra))
    return summary["memory"]["step"], capsys.readouterr().out

  vmap, _ = dry("--mesh", "data=2")
  scan, text = dry("--mesh", "data=2", "--microbatch-mode", "scan",
                   "--grad-dtype", "bfloat16")
  assert ("train step, per device on --mesh data=2,fsdp=1 (scan, bfloat16 "
          "gradients): argument ") in text
  for name in ("output", "alias", "temp", "peak"):
    assert f", {name} " in text
  assert not (tmp_path / "checkpoints").exists()
  for sizes in (vmap, scan):   # the state is donated: outputs reuse it
    assert sizes["argument"] >= sizes["alias"] > 0.99 * sizes["output"]
    assert sizes["peak"] == (sizes["argument"] + sizes["output"]
                             - sizes["alias"] + sizes["temp"])
  assert scan["temp"] < vmap["temp"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def processes(flags: list[str], count: int = 2) -> float:
  """Runs ``train.py FLAGS`` as ``count`` processes of 2 CPU devices each
  on a local coordinator; returns the wall seconds."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  port, t0 = free_port(), time.time()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "examples.lm.train", *flags, "--coordinator",
       f"localhost:{port}", "--num-processes", str(count), "--process-id",
       str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(count)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]

  def excerpt(text):
    # A process that fails alone leaves the others waiting until the
    # distributed shutdown barrier times out, and every log then ends in
    # that timeout: the cause is near the start of one of them.
    text = "\n".join(line for line in text.splitlines()
                     if "[Gloo]" not in line)
    return text if len(text) < 3000 else f"{text[:1500]}\n...\n{text[-1500:]}"

  assert [p.returncode for p in procs] == [0] * count, "\n".join(
      f"process {i}:\n{excerpt(text)}" for i, text in enumerate(outputs))
  return time.time() - t0


def test_two_processes_train_like_one(run, tiny, tmp_path):
  """2 processes x 2 devices == 1 x 4, with a stop and a resume."""
  flags = tiny.flags(tmp_path, "adamw_bc", "--eval-test", "--mesh", "data=4",
                     "--checkpoint-every", "0")
  wall = processes(flags + ["--stop-at", "4"])
  assert [r["step"] for r in map(json.loads, (
      tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
  wall += processes(flags + ["--resume"])
  print(f"two processes, stop and resume: {wall:.1f} s")
  one = run("--mesh", "data=4")
  assert_same_losses(tmp_path, one)
  got, want = (json.loads((out / "summary.json").read_text())
               for out in (tmp_path, one))
  for key in ("final_val_loss", "final_eval_loss"):
    np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "checkpoints", "config.json", "loss.png", "metrics.jsonl",
      "summary.json"]
