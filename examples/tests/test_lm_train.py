"""Short runs of examples/lm/train.py: every optimizer learns, exact resume,
several devices equal one, iterate averages, --init-from, fail-fast errors,
dry run.

Runs go through ``train.main`` in-process on a one-layer model and a
repetitive corpus; the pytest process has 8 simulated CPU devices
(conftest.py).
"""

import json
import math

import numpy as np
import pytest

from examples.lm import train

STEPS = 8


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "verse.txt"
  path.write_text("To be, or not to be, that is the question:\n"
                  "Whether 'tis nobler in the mind to suffer\n" * 100)
  return str(path)


def flags(corpus_path, out, optimizer, *extra):
  return ["--optimizer", optimizer, "--data", corpus_path, "--out", str(out),
          "--model", "num_layers=1", "--model", "d_model=32",
          "--model", "num_heads=2", "--model", "num_kv_heads=1",
          "--model", "d_ff=64", "--microbatches", "4",
          "--microbatch-size", "2", "--seq-len", "32", "--eval-batches", "1",
          "--steps", str(STEPS), "--warmup", "0", "--lr", "1e-2",
          "--eval-every", "4", "--curvature-every", "3", "--progress", "off",
          "--fast-compile", *extra]


# Sophia-BC also averages (BEMA), so the resume test covers that state too.
EXTRA = {"sophia_bc": ("--average", "bema")}


def metrics(out):
  return [json.loads(line) for line in (out / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def runs(corpus_path, tmp_path_factory):
  """One uninterrupted single-device run per optimizer, made on first use."""
  cache = {}

  def get(optimizer):
    if optimizer not in cache:
      out = tmp_path_factory.mktemp(optimizer)
      summary = train.main(flags(corpus_path, out, optimizer,
                                 *EXTRA.get(optimizer, ())))
      cache[optimizer] = (out, summary)
    return cache[optimizer]

  return get


@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(runs, optimizer):
  out, summary = runs(optimizer)
  losses = [r["train_loss"] for r in metrics(out)]
  assert len(losses) == STEPS and all(map(math.isfinite, losses))
  assert losses[0] > math.log(256) - 0.3            # starts near uniform
  assert np.mean(losses[-2:]) < losses[0] - 1.0
  assert summary["final_val_loss"] < losses[0] - 1.0
  assert summary["final_eval_loss"] < losses[0] - 1.0
  assert (out / "loss.png").stat().st_size > 0
  assert summary["tokens"] == STEPS * 4 * 2 * 32
  assert summary["config"]["args"]["optimizer"] == optimizer
  assert summary["command"].startswith("python -m examples.lm.train")
  if optimizer in EXTRA:
    assert math.isfinite(summary["final_val_loss_avg"])
    assert summary["final_eval_loss_avg"] == summary["final_eval_loss_bema"]
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert all(r["val_loss_avg"] == r["val_loss_bema"] for r in evals)


def test_stop_and_resume_reproduce_the_uninterrupted_run(runs, corpus_path,
                                                         tmp_path):
  full_out, full = runs("sophia_bc")
  args = flags(corpus_path, tmp_path, "sophia_bc", *EXTRA["sophia_bc"])
  assert train.main(args + ["--stop-at", "4", "--checkpoint-every", "0"]) is None
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
  resumed = train.main(args + ["--resume"])
  strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
  assert strip(metrics(tmp_path)) == strip(metrics(full_out))   # bitwise
  for key in ("final_val_loss", "final_eval_loss", "final_val_loss_avg"):
    assert resumed[key] == full[key]


# One microbatch per device: the two-fold groups, the curvature keys and the
# BEMA state all span devices.
@pytest.mark.parametrize("optimizer,devices", [("sophia_bc", 4)])
def test_devices_match_one_device(runs, corpus_path, tmp_path, optimizer,
                                  devices):
  one_out, one = runs(optimizer)
  many = train.main(flags(corpus_path, tmp_path, optimizer,
                          *EXTRA.get(optimizer, ()), "--devices", str(devices)))
  np.testing.assert_allclose([r["train_loss"] for r in metrics(tmp_path)],
                             [r["train_loss"] for r in metrics(one_out)],
                             rtol=2e-5)
  np.testing.assert_allclose(many["final_eval_loss"], one["final_eval_loss"],
                             rtol=2e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus_path,
                                                           tmp_path):
  args = flags(corpus_path, tmp_path, "adamw", "--lr", "1e30",
               "--clip-norm", "1e30", "--checkpoint-every", "1")
  with pytest.raises(FloatingPointError, match="loss is .* at step 2"):
    train.main(args)
  assert train.checkpoint_manager(tmp_path).latest_step() == 1


def test_averages_read_out_without_changing_training(runs, corpus_path,
                                                    tmp_path):
  none_out, none = runs("adamw")
  # EMA power 0: the EMA is the iterate; burn-in 4: both averages are the
  # iterate up to step 4, then BEMA = alpha (theta_t - theta_4) + theta_t.
  summary = train.main(flags(
      corpus_path, tmp_path, "adamw", "--average", "bema,ema",
      "--average-ema-power", "0", "--average-burn-in", "4", "--eval-test"))
  got, ref = metrics(tmp_path), metrics(none_out)
  # Bitwise with --fast-compile; under full XLA optimisation the extra
  # averaging ops change the fusion of the step and the last bits of the
  # parameters (benchmarks/finetune_averaging.py measures it).
  assert [r["train_loss"] for r in got] == [r["train_loss"] for r in ref]
  assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in ref]
  assert summary["final_eval_loss"] == none["final_eval_loss"]
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


def test_init_from_loads_the_parameters_with_a_fresh_optimizer(
    runs, corpus_path, tmp_path):
  src, done = runs("adamw")
  # Learning rate 0: the parameters stay the loaded ones, so the held-out
  # losses are the source run's final ones, and BEMA (snapshot and EMA made
  # from the loaded parameters) equals them too.
  summary = train.main(flags(corpus_path, tmp_path, "adamw_bc") + [
      "--init-from", str(src), "--steps", "2", "--lr", "0",
      "--schedule", "constant", "--average", "bema"])
  assert summary["init_from"] == {"dir": str(src), "step": STEPS}
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
  for key in ("final_val_loss", "final_eval_loss"):
    assert summary[key] == done[key]
    assert summary[key + "_bema"] == done[key]
  assert metrics(tmp_path)[0]["train_loss"] < math.log(256) - 1.0


def test_init_from_errors(runs, corpus_path, tmp_path):
  src, _ = runs("adamw")
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    train.main(flags(corpus_path, tmp_path / "a", "adamw",
                     "--init-from", str(tmp_path / "missing")))
  with pytest.raises(ValueError, match=r"d_ff \(64 there, 96 here\)"):
    train.main(flags(corpus_path, tmp_path / "b", "adamw", "--init-from",
                     str(src), "--model", "d_ff=96"))


@pytest.mark.parametrize("extra,match", [
    (["--average", "bema", "--average-every", "0"], "update_every"),
    (["--average", "ema", "--average-lag", "-5"], "lag"),
    (["--optimizer", "adamw_bc", "--microbatches", "1"], "cannot use"),
    (["--optimizer", "sophia_bc", "--microbatches", "2"], "cannot use"),
    (["--optimizer", "shampoo_bc", "--cross-fit", "loo"], "loo"),
    (["--devices", "3"], "must divide"),
    (["--stop-at", "99"], "--stop-at"),
    (["--model", "num_kv_heads=3"], "multiple of num_kv_heads"),
])
def test_bad_settings_fail_before_compiling(corpus_path, tmp_path, extra,
                                            match):
  with pytest.raises(ValueError, match=match):
    train.main(flags(corpus_path, tmp_path, "adamw") + extra)


def test_unknown_optimizer_or_preset_exits_with_usage(capsys):
  for bad, match in ((["--optimizer", "lion"], "invalid choice"),
                     (["--preset", "huge"], "invalid choice"),
                     (["--average", "ema,swa"], "comma-separated list")):
    with pytest.raises(SystemExit):
      train.main(bad)
    assert match in capsys.readouterr().err


def test_dry_run_prints_the_qwen_count(capsys):
  train.main(["--dry-run", "--preset", "qwen2.5-0.5b",
              "--vocab-size", "151936", "--optimizer", "adamw"])
  assert "params: 494032768" in capsys.readouterr().out.splitlines()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(
    runs, corpus_path, tmp_path, monkeypatch):
  """SIGINT during step 3 ends the run after that step with a checkpoint."""
  import signal
  from examples.lm import data as data_lib
  full_out, full = runs("adamw")
  args = flags(corpus_path, tmp_path, "adamw", "--checkpoint-every", "0")
  real_batch = data_lib.train_batch

  def batch_then_interrupt(*a, **kw):
    if kw["step"] == 3:
      signal.raise_signal(signal.SIGINT)     # as if Ctrl-C were pressed now
    return real_batch(*a, **kw)

  assert train.threading_is_main(), "the handler needs the main thread"
  with monkeypatch.context() as m:
    m.setattr(data_lib, "train_batch", batch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
      train.main(args)
  assert train.checkpoint_manager(tmp_path).latest_step() == 3
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  resumed = train.main(args + ["--resume"])
  assert resumed["final_eval_loss"] == full["final_eval_loss"]


def test_program_memo_keeps_only_the_most_recent_programs(corpus_path,
                                                          tmp_path,
                                                          monkeypatch):
  import collections
  monkeypatch.setattr(train, "_PROGRAMS", collections.OrderedDict())

  def build(lr):
    args = train.parse_args(flags(corpus_path, tmp_path, "adamw", "--lr",
                                  str(lr)))
    return train.build(args, train.model_config(args, 256))

  rates = [1e-3 * (k + 1) for k in range(train.MAX_PROGRAMS + 1)]
  programs = [build(lr) for lr in rates]
  assert len(train._PROGRAMS) == train.MAX_PROGRAMS
  assert build(rates[-1]) is programs[-1]        # a hit: reused
  assert build(rates[1]) is programs[1]          # the oldest kept one
  assert build(rates[0]) is not programs[0]      # evicted: built anew
  assert len(train._PROGRAMS) == train.MAX_PROGRAMS
  assert build(rates[1]) is programs[1]          # refreshed by its last use
