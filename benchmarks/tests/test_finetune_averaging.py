"""benchmarks/finetune_averaging.py without training: the commands, the
aggregation against plain loops, the reads of checkpoints, and the report of
the committed results."""

import contextlib
import dataclasses
import json
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import finetune_averaging as fa
from benchmarks import harness
from benchmarks import lm_runs
from examples.lm import checkpoint
from examples.lm import config
from examples.lm import data as data_lib
from examples.lm import optimizer
from examples.lm import train


@pytest.mark.parametrize("label", sorted(fa.SIZES))
def test_commands_parse_and_hold_out_the_evaluation_plays(label, tmp_path):
  size = fa.SIZES[label]
  pre = train.parse_args(fa.pretrain_argv(size, tmp_path))
  fine = train.parse_args(fa.finetune_argv(size, tmp_path, 1, 3e-4))
  none = train.parse_args(fa.finetune_argv(size, tmp_path, 0, 3e-4, "none"))
  pick = train.parse_args(fa.finetune_argv(size, tmp_path, 7, 1e-4, "none",
                                           curves=False))
  assert fine.init_from == pre.out == str(tmp_path / "pretrain")
  assert fine.average == "ema,bema" and none.average == "none"
  assert fine.seed == 1 and fine.out != none.out and fine.lr == 3e-4
  assert pick.eval_every == 0 and pick.lr == 1e-4 and pick.average == "none"
  assert len({fine.out, none.out, pick.out}) == 3
  # Same evaluation windows in both phases (eval_batches evenly spaced
  # windows depend only on their number).
  windows = lambda a: a.eval_batches * a.microbatches * a.microbatch_size
  assert windows(pre) == windows(fine) == size["eval_windows"]
  held = set(data_lib.select_plays(fine.val_plays)) | set(
      data_lib.select_plays(fine.test_plays))
  trained = set(data_lib.select_plays(pre.train_plays, exclude=held)) | set(
      data_lib.select_plays(fine.train_plays, exclude=held))
  assert not held & trained
  assert set(data_lib.select_plays(pre.train_plays)) == set(
      data_lib.select_plays("comedies,histories"))   # nothing held out there
  plays = data_lib.shakespeare_plays()
  assert {plays[n].parent.name for n in held | set(fa.FINETUNE_PLAYS)} == {
      "tragedies"}
  # Seed 0's run differs from the none check only in its averages.
  fine0 = dataclasses.asdict(train.parse_args(
      fa.finetune_argv(size, tmp_path, 0, 3e-4)))
  differ = {k for k, v in dataclasses.asdict(none).items() if fine0[k] != v}
  assert differ == {"average", "out"}
  # Sensitivity variants: validation only, each override reaches its flag.
  outs = set()
  for tag, overrides in fa.sensitivity_variants(size).values():
    v = train.parse_args(fa.finetune_argv(size, tmp_path, 100, 3e-4,
                                          overrides=overrides, tag=tag,
                                          validation_only=True))
    assert not v.eval_test and v.eval_every == 2 * size["eval_every"]
    expect = {**fa.AVERAGING, **overrides}
    assert [v.average_ema_power, v.average_bias_power, v.average_lag,
            v.average_burn_in, v.average_every] == [
                expect["--average-" + k] for k in
                ("ema-power", "bias-power", "lag", "burn-in", "every")]
    assert 0 <= v.average_burn_in < v.steps
    outs.add(v.out)
  assert len(outs) == len(fa.sensitivity_variants(size))


def committed(name="finetune_averaging"):
  return json.loads((harness.RESULTS_DIR / f"{name}.json").read_text())


def all_commands(payload):
  yield payload["runs"]["pretrain"]["command"]
  for k, r in payload["runs"].items():
    yield r["command"]
  yield from (r["command"] for r in payload["lr_selection"]["runs"].values())
  yield from (v["command"] for v in payload["sensitivity"]["variants"]
              .values())
  yield from (c for rs in payload["selected"]["runs"].values() for c in rs)


@pytest.mark.parametrize("name", ["finetune_averaging",
                                  "finetune_averaging_quick"])
def test_the_recorded_commands_are_the_scripts_commands(name):
  """The committed runs are what the script would run now (so a re-run
  reuses their folders)."""
  payload = committed(name)
  size = fa.SIZES["quick" if payload["quick"] else "full"]
  runs = harness.ROOT / "runs" / (
      "finetune_averaging" + ("_quick" if payload["quick"] else ""))
  lr, runs = payload["lr"], runs.relative_to(harness.ROOT)
  expected = {lm_runs.command(fa.pretrain_argv(size, runs))}
  expected |= {lm_runs.command(fa.finetune_argv(size, runs, fa.SELECTION_SEED,
                                                x, "none", curves=False))
               for x in fa.LR_CANDIDATES}
  for seed in size["seeds"]:
    expected |= {lm_runs.command(fa.finetune_argv(size, runs, seed, lr)),
                 lm_runs.command(fa.finetune_argv(size, runs, seed, lr,
                                                  "none"))}
  for tag, overrides in fa.sensitivity_variants(size).values():
    expected |= {lm_runs.command(fa.finetune_argv(
        size, runs, fa.SELECTION_SEED, lr, overrides=overrides, tag=tag,
        validation_only=True))}
    expected |= {lm_runs.command(fa.finetune_argv(
        size, runs, seed, lr, overrides=overrides, tag=tag))
                 for seed in size["seeds"]}
  recorded = set(all_commands(payload))
  assert recorded <= expected and len(recorded) >= 13


def test_the_committed_section_is_the_report_of_the_committed_results():
  text = harness.RESULTS_MD.read_text()
  section = fa.markdown(committed())
  assert harness.replace_section(text, "finetune_averaging", section) == text
  assert "Reproduce: `python -m benchmarks.finetune_averaging`" in section
  assert fa.markdown(committed("finetune_averaging_quick")).startswith(
      "## Fine-tuning with iterate averaging")


def test_report_only_writes_the_png_and_leaves_quick_out_of_results_md(
    tmp_path):
  results = tmp_path / "q.json"
  results.write_text(json.dumps(committed("finetune_averaging_quick")))
  before = harness.RESULTS_MD.read_text()
  fa.main(["--quick", "--report-only", "--results", str(results)])
  assert (tmp_path / "q.png").stat().st_size > 0
  assert harness.RESULTS_MD.read_text() == before
  args = fa.parse_args([])
  assert args.results == harness.RESULTS_DIR / "finetune_averaging.json"
  assert str(args.runs_dir) == "runs/finetune_averaging"


def test_select_variant_per_average():
  val = {"defaults": {"ema": {"final": [1.73]}, "bema": {"final": [1.76]}},
         "every": {"ema": {"final": [1.72]}, "bema": {"final": [1.71]}},
         "bias": {"ema": {"final": [1.74]}, "bema": {"final": [1.70]}}}
  assert fa.select_variant(val, "ema") == "every"
  assert fa.select_variant(val, "bema") == "bias"


def test_select_lr_takes_the_lowest_final_validation_loss():
  losses = {1e-4: 1.9, 3e-4: 1.7, 1e-3: 1.8}
  records = {lr: {"summary": {"final_val_loss": v, "final_eval_loss": 0.0}}
             for lr, v in losses.items()}
  assert fa.select_lr(records) == 3e-4
  assert fa.SELECTION_SEED not in fa.SEEDS


def _fake_runs(rng, seeds, steps):
  runs = []
  for _ in range(seeds):
    evals = []
    for s in steps:
      e = {"step": s}
      for split in ("val", "test"):
        for m in fa.METHODS:
          e[fa.method_key(split, m)] = float(rng.uniform(1.5, 2.0))
      evals.append(e)
    runs.append({"evals": evals})
  return runs


def test_summary_matches_plain_loops():
  rng = np.random.default_rng(0)
  steps = [5, 10, 15, 20]
  runs = _fake_runs(rng, 3, steps)
  start = {"test_loss": 2.5, "val_loss": 2.6}
  out = fa.summarize(fa.curves(runs, start, "test"))
  assert out["steps"] == [0] + steps

  def se(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values)
                     / (len(values) - 1) / len(values))

  key = {"none": "test_loss", "ema": "test_loss_ema",
         "bema": "test_loss_bema"}
  for m in fa.METHODS:
    finals = [r["evals"][-1][key[m]] for r in runs]
    means = [sum(e[key[m]] for e in r["evals"]) / len(steps) for r in runs]
    st = out["stats"][m]
    assert st["final"]["mean"] == pytest.approx(sum(finals) / 3, rel=1e-12)
    assert st["final"]["se"] == pytest.approx(se(finals), rel=1e-12)
    assert st["mean_over_steps"]["mean"] == pytest.approx(sum(means) / 3,
                                                          rel=1e-12)
    assert out["curve"][m]["mean"][0] == 2.5      # the pretrained start
    for i, r in enumerate(runs):                  # lowest loss, first step
      best = min(e[key[m]] for e in r["evals"])
      assert out["per_seed"][m]["best"][i] == best
      assert out["per_seed"][m]["best_step"][i] == next(
          e["step"] for e in r["evals"] if e[key[m]] == best)
  diffs = [r["evals"][-1]["test_loss_bema"] - r["evals"][-1]["test_loss_ema"]
           for r in runs]
  d = out["paired"]["bema-ema"]["final"]
  assert d["mean"] == pytest.approx(sum(diffs) / 3, rel=1e-12)
  assert d["se"] == pytest.approx(se(diffs), rel=1e-12)
  assert out["paired"]["bema-none"]["curve"]["mean"][0] == 0.0
  assert fa.verdict({"mean": -0.3, "se": 0.1}).startswith("lower (more")
  assert fa.verdict({"mean": 0.1, "se": 0.1}).startswith("higher (less")
  assert fa.verdict({"mean": 0.1, "se": None}) == "higher (one seed)"


def test_curves_reject_runs_evaluated_at_different_steps():
  rng = np.random.default_rng(1)
  runs = _fake_runs(rng, 1, [5, 10]) + _fake_runs(rng, 1, [5, 15])
  with pytest.raises(ValueError, match="different steps"):
    fa.curves(runs, {"test_loss": 2.0})


def save_run(out, average, params, averages=None):
  """A run folder as the example leaves it: config.json and a checkpoint
  whose parameters are ``params`` and whose averages are ``averages``."""
  cfg = train.parse_args(["--average", average, "--model", "num_layers=1",
                          "--model", "d_model=8", "--model", "num_heads=2",
                          "--model", "num_kv_heads=1", "--model", "d_ff=8",
                          "--out", str(out)])
  model_cfg = config.model_config(cfg, 256)
  opt_state = list(optimizer.make(cfg).init(params))
  for k, avg in enumerate(averages or ()):
    i = optimizer.AVERAGE_INDEX + k
    opt_state[i] = opt_state[i]._replace(average=avg)
  run_config = config.run_config(cfg, model_cfg)
  with contextlib.closing(checkpoint.manager(out)) as mngr:
    checkpoint.prepare(out, run_config, mngr, resume=False)
    checkpoint.save(mngr, 5, {"params": params, "opt_state": tuple(opt_state),
                              "step": jnp.int32(5), "wall_s": np.float32(1)})
  return model_cfg


def test_displacement_and_raw_agreement_read_the_checkpoints(tmp_path):
  rng = np.random.default_rng(2)
  cfg = train.parse_args(["--model", "num_layers=1", "--model", "d_model=8",
                          "--model", "num_heads=2", "--model",
                          "num_kv_heads=1", "--model", "d_ff=8"])
  params = train.build(cfg, config.model_config(cfg, 256)).init(
      jax.random.key(0))["params"]
  like = lambda scale: jax.tree.map(
      lambda x: scale * rng.normal(size=x.shape).astype(np.float32), params)
  theta0, d, other = like(0.1), like(0.1), like(0.1)
  flat = lambda t: np.concatenate([np.asarray(x, np.float64).ravel()
                                   for x in jax.tree.leaves(t)])
  dd, oo = flat(d), flat(other)
  other = jax.tree.map(lambda o, x: o - (oo @ dd) / (dd @ dd) * x, other, d)
  theta = jax.tree.map(np.add, theta0, d)
  ema = jax.tree.map(lambda t, x: t - 0.1 * x, theta, d)             # lags
  bema = jax.tree.map(lambda t, x, o: t + 0.25 * x + o, theta, d, other)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  save_run(tmp_path / "pre", "none", f32(theta0))
  save_run(tmp_path / "fine", "ema,bema", f32(theta), [f32(ema), f32(bema)])
  got = fa.displacement(str(tmp_path / "fine"), str(tmp_path / "pre"))
  d32 = flat(f32(theta)) - flat(f32(theta0))
  assert got["displacement_norm"] == pytest.approx(np.linalg.norm(d32),
                                                   rel=1e-6)
  assert got["ema_along_displacement"] == pytest.approx(-0.1, abs=1e-4)
  assert got["bema_along_displacement"] == pytest.approx(0.25, abs=1e-4)
  assert got["bema_distance"] == pytest.approx(
      np.linalg.norm(0.25 * dd + flat(other)), rel=1e-4)
  # The raw trajectories: the same parameters, or theta0 against theta.
  record = lambda out, shift: {
      "out": str(out), "train_loss": [2.0, 1.5 + shift],
      "evals": [{"val_loss": 1.9, "test_loss": 1.8 + shift}]}
  same = fa.raw_agreement(record(tmp_path / "fine", 0),
                          record(tmp_path / "fine", 0))
  assert same["final_params_bitwise_equal"] and same[
      "train_loss_bitwise_equal"]
  assert same["final_params_max_abs_diff"] == 0.0
  apart = fa.raw_agreement(record(tmp_path / "fine", 0),
                           record(tmp_path / "pre", 1e-3))
  assert not apart["final_params_bitwise_equal"]
  assert apart["final_params_max_abs_diff"] == pytest.approx(
      np.abs(d32).max(), rel=1e-6)
  assert apart["train_loss_max_abs_diff"] == pytest.approx(1e-3)
  assert apart["heldout_loss_max_abs_diff"] == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["finetune_averaging",
                                  "finetune_averaging_quick"])
def test_the_old_command_names_its_commit_and_new_command(name):
  rep = committed(name)["replaced"]
  assert rep["command"].split()[1] == rep["script"]
  subprocess.run(["git", "-C", str(harness.ROOT), "cat-file", "-e",
                  f"{rep['command_reproduces_at_commit']}:{rep['script']}"],
                 check=True)
  args = fa.parse_args(harness.command_argv(rep["equivalent_command"],
                                            fa.MODULE))
  assert args.quick == committed(name)["quick"]
