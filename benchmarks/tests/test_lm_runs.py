"""benchmarks/lm_runs.py: training subprocesses, reuse / resume / restart
rules, the records they leave, and the statistics against numpy."""

import functools
import json
import math
import pathlib
import subprocess

import numpy as np
import pytest

from benchmarks import harness
from benchmarks import lm_runs
from examples.lm import config
from examples.lm import train

FAKE = functools.partial(lm_runs.subprocess_runner,
                         module="benchmarks.tests.fake_train")
HEAD = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"],
                      capture_output=True, text=True).stdout.strip()


def argv(out, lr=0.01, seed=0, *extra):
  return ["--lr", str(lr), "--seed", str(seed), "--steps", "3", *extra,
          "--out", str(out)]


class Trainer:
  """An in-process stand-in for the subprocess: records its argv."""

  def __init__(self, diverge=False):
    self.calls, self.diverge = [], diverge

  def __call__(self, args):
    self.calls.append(list(args))
    if self.diverge:
      raise FloatingPointError("loss is nan at step 2")
    cfg = train.parse_args(args)
    pathlib.Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return {"final_val_loss": 2 + cfg.lr, "resumed": cfg.resume}


def test_commands_keep_the_out_placeholder_and_quote_the_rest():
  cmd = lm_runs.command(["--lr", "0.001", "--data", "a b", "--out",
                         lm_runs.OUT])
  assert cmd == ("python -m examples.lm.train --lr 0.001 --data 'a b' "
                 "--out {out}")
  assert lm_runs.argv_of(cmd, "/x y") == ["--lr", "0.001", "--data", "a b",
                                         "--out", "/x y"]
  assert lm_runs.argv_of(cmd)[-1] == "{out}"
  with pytest.raises(ValueError):
    lm_runs.argv_of("python -m benchmarks.lm_quality --quick")
  assert lm_runs.flags({"seq_len": 8, "--average-lag": 10.0}) == [
      "--seq-len", "8", "--average-lag", "10.0"]
  assert lm_runs.out_dir(["--out", "runs/x"]) == harness.ROOT / "runs" / "x"


def test_subprocess_runner_reads_the_summary_and_recognises_divergence(
    tmp_path):
  summary = FAKE(argv(tmp_path / "a", 0.25, 3))
  assert summary["final_val_loss"] == pytest.approx(2.253)
  assert summary["argv"] == argv(tmp_path / "a", 0.25, 3)
  with pytest.raises(FloatingPointError, match="^loss is nan at step 3$"):
    FAKE(argv(tmp_path / "b", 2.0))
  with pytest.raises(RuntimeError, match="something else went wrong"):
    FAKE(argv(tmp_path / "c", 0.5))


def test_run_records_reuses_and_replaces(tmp_path):
  out = tmp_path / "run"
  trainer = Trainer()
  first = lm_runs.run(argv(out), trainer)
  assert trainer.calls == [argv(out)]
  assert first["command"] == lm_runs.command(argv(out))
  bench = first["benchmark"]
  assert bench["code"] == harness.git_state()
  assert bench["code"]["commit"] == HEAD and not bench["resumed"]
  assert bench["call_wall_s"] >= 0 and bench["cpu_s"] >= 0
  assert json.loads((out / "summary.json").read_text()) == first
  assert lm_runs.run(argv(out), trainer) == first      # reused
  assert len(trainer.calls) == 1
  with pytest.raises(ValueError, match="holds another run"):
    lm_runs.run(argv(out, lr=0.02), trainer)
  (out / "stale").write_text("x")
  second = lm_runs.run(argv(out, lr=0.02), trainer, replace=True)
  assert trainer.calls[-1] == argv(out, lr=0.02)
  assert second["final_val_loss"] == 2.02 and not (out / "stale").exists()


def interrupted(out, args):
  """A run folder as an interrupted run leaves it: settings, checkpoints,
  metrics, no summary."""
  cfg = train.parse_args(args)
  (out / "checkpoints" / "2").mkdir(parents=True)
  (out / "config.json").write_text(json.dumps(config.run_config(
      cfg, config.model_config(cfg, 256))))
  (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')


def test_an_interrupted_run_resumes_with_its_own_settings(tmp_path):
  out = tmp_path / "run"
  interrupted(out, argv(out, 0.01, 0, "--checkpoint-every", "2"))
  trainer = Trainer()
  # --checkpoint-every may change on --resume: still the same run.
  summary = lm_runs.run(argv(out), trainer)
  assert trainer.calls == [argv(out) + ["--resume"]]
  assert summary["resumed"] and summary["benchmark"]["resumed"]
  assert summary["command"] == lm_runs.command(argv(out))   # no --resume
  assert (out / "checkpoints").exists()                    # kept


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
  out = tmp_path / "run"
  interrupted(out, argv(out, lr=0.03))
  trainer = Trainer()
  with pytest.raises(ValueError, match="holds another run"):
    lm_runs.run(argv(out), trainer)
  assert not trainer.calls
  lm_runs.run(argv(out), trainer, replace=True)
  assert trainer.calls == [argv(out)] and not (out / "checkpoints").exists()


def test_a_folder_without_checkpoints_or_summary_starts_afresh(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  (out / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n')
  trainer = Trainer()
  lm_runs.run(argv(out), trainer)
  assert trainer.calls == [argv(out)] and not (out / "metrics.jsonl").exists()


def test_a_diverged_run_is_reported_and_leaves_no_summary(tmp_path):
  out = tmp_path / "run"
  summary = lm_runs.run(argv(out), Trainer(diverge=True))
  assert summary["diverged"] == "loss is nan at step 2"
  assert summary["command"] == lm_runs.command(argv(out))
  assert set(summary) == {"diverged", "command", "benchmark"}
  assert not (out / "summary.json").exists()


def test_subprocess_run_end_to_end(tmp_path):
  out = tmp_path / "run"
  summary = lm_runs.run(argv(out, 0.25), FAKE)
  assert summary["final_eval_loss"] == pytest.approx(2.35)
  assert summary["benchmark"]["cpu_s"] > 0   # the child's CPU time
  assert [r["step"] for r in lm_runs.metrics(out)] == [1, 2, 3]
  assert lm_runs.metrics(tmp_path / "none") == []
  diverged = lm_runs.run(argv(tmp_path / "d", 2.0), FAKE)
  assert diverged["diverged"] == "loss is nan at step 3"


def test_mean_se_and_paired_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3))
  s = lm_runs.mean_se(x)
  np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s["se"], np.sqrt(x.var(0, ddof=1) / 5),
                             rtol=1e-12)
  assert s["n"] == 5 and math.isnan(lm_runs.mean_se([1.5])["se"])
  a = dict(enumerate(rng.normal(2.0, 0.1, 6)))
  b = dict(enumerate(rng.normal(2.0, 0.1, 6)))
  a[6] = 1.0                 # seed without a partner: not paired
  b[5] = None                # diverged: not paired
  p = lm_runs.paired(a, b)
  d = np.array([a[i] - b[i] for i in range(5)])
  assert p["n"] == 5 and p["seeds"] == [0, 1, 2, 3, 4]
  np.testing.assert_allclose(p["mean"], d.mean(), rtol=1e-12)
  np.testing.assert_allclose(p["se"], np.sqrt(np.var(d, ddof=1) / 5),
                             rtol=1e-12)
  assert p["improved"] == int(np.sum(d < 0))
  assert lm_runs.paired({0: 1.0}, {0: 2.0})["se"] is None
  assert lm_runs.paired({0: 1.0}, {1: 2.0}) is None


def test_fmt():
  assert lm_runs.fmt({"mean": -0.01234, "se": 0.005}, sign="+") == (
      "-0.0123 ± 0.0050")
  assert lm_runs.fmt({"mean": 0.01, "se": None}, sign="+",
                     one=" (1 seed)") == "+0.0100 (1 seed)"
  assert lm_runs.fmt({"mean": 40.0, "se": 12.4}, 0) == "40 ± 12"
  assert lm_runs.fmt({"mean": 1.0, "se": float("nan")}) == "1.0000"
  assert lm_runs.fmt(None) == lm_runs.fmt({"mean": None}) == "-"
