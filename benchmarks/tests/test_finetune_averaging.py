"""Logic of benchmarks/finetune_averaging.py (no training): the commands,
the aggregation against plain numpy loops, and the RESULTS.md section swap."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from examples.lm import data as data_lib
from examples.lm import train

_PATH = pathlib.Path(__file__).parents[2] / "benchmarks" / \
    "finetune_averaging.py"
_spec = importlib.util.spec_from_file_location("finetune_averaging", _PATH)
fa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fa)


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
  fine0 = vars(train.parse_args(fa.finetune_argv(size, tmp_path, 0, 3e-4)))
  differ = {k for k in fine0 if fine0[k] != vars(none)[k]}
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
  assert fa.command(["--out", "a b"]) == "python -m examples.lm.train " \
      "--out 'a b'"


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


def test_curves_reject_runs_evaluated_at_different_steps():
  rng = np.random.default_rng(1)
  runs = _fake_runs(rng, 1, [5, 10]) + _fake_runs(rng, 1, [5, 15])
  with pytest.raises(ValueError, match="different steps"):
    fa.curves(runs, {"test_loss": 2.0})


def test_results_section_is_swapped_in_place():
  text = ("# Results\n\nintro\n\n" + fa.BEGIN + "\nold\n" + fa.END
          + "\n\n## LM quality\n\nother helper's text\n")
  new = fa.replace_section(text, "fresh table\n")
  assert new == ("# Results\n\nintro\n\n" + fa.BEGIN + "\nfresh table\n"
                 + fa.END + "\n\n## LM quality\n\nother helper's text\n")
  assert fa.replace_section(new, "fresh table") == new
  appended = fa.replace_section("# Results\n\nsomething\n", "x")
  assert appended == ("# Results\n\nsomething\n\n" + fa.BEGIN + "\nx\n"
                      + fa.END + "\n")
  with pytest.raises(ValueError, match="unbalanced"):
    fa.replace_section("a " + fa.BEGIN + " b", "x")


def test_displacement_reads_the_averages_of_the_checkpoints(tmp_path):
  import jax.numpy as jnp
  rng = np.random.default_rng(2)
  theta0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
  d = {k: rng.normal(size=v.shape) for k, v in theta0.items()}
  other = {k: rng.normal(size=v.shape) for k, v in theta0.items()}
  flat = lambda t: np.concatenate([t["a"].ravel(), t["b"]])
  dd, oo = flat(d), flat(other)
  other = {k: v - (oo @ dd) / (dd @ dd) * d[k] for k, v in other.items()}
  theta = {k: theta0[k] + d[k] for k in d}
  ema = {k: theta[k] - 0.1 * d[k] for k in d}              # lags
  bema = {k: theta[k] + 0.25 * d[k] + other[k] for k in d}  # beyond
  f32 = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  states = {"pre": {"params": f32(theta0)},
            "fine": {"params": f32(theta), "opt_state": [
                {"x": jnp.zeros(1)}, {"y": jnp.zeros(1)},
                {"average": f32(ema)}, {"average": f32(bema)}]}}
  for name, state in states.items():
    train.save_checkpoint(train.checkpoint_manager(tmp_path / name), 5, state)
  got = fa.displacement(str(tmp_path / "fine"), str(tmp_path / "pre"))
  cast = lambda t: {k: np.float64(np.float32(v)) for k, v in t.items()}
  d32 = flat(cast(theta)) - flat(cast(theta0))
  assert got["displacement_norm"] == pytest.approx(np.linalg.norm(d32),
                                                   rel=1e-6)
  assert got["ema_along_displacement"] == pytest.approx(-0.1, abs=1e-5)
  assert got["bema_along_displacement"] == pytest.approx(0.25, abs=1e-5)
  assert got["bema_distance"] == pytest.approx(
      np.linalg.norm(0.25 * dd + flat(other)), rel=1e-5)
