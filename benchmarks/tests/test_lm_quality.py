"""The logic of benchmarks/lm_quality.py, with a fake trainer (no training)."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_quality as lq  # pylint: disable=g-import-not-at-top

from examples.lm import train  # pylint: disable=g-import-not-at-top

SETTING = lq.Setting(steps=7)
ARM_OFFSET = {"std": 0.0, "bc": -0.03, "cf": -0.02, "inv": 0.01, "paper": 0.0}


def arm_of(args) -> str:
  """Inverts lm_quality.arm_flags through train.py's own parser."""
  if not args.optimizer.endswith("_bc"):
    return "std"
  return {(None, None): "bc", (None, "none"): "cf", ("none", None): "inv",
          }.get((args.cross_fit, args.inverse_correction), "paper")


class FakeTrainer:
  """train.main stand-in: a loss bowl in log(lr) around ``best_lr``."""

  def __init__(self, best_lr=3e-3, diverge_above=math.inf):
    self.best_lr, self.diverge_above, self.calls = best_lr, diverge_above, []

  def __call__(self, argv):
    args = train.parse_args(argv)
    self.calls.append(argv)
    if args.lr > self.diverge_above:
      raise FloatingPointError("loss is nan")
    loss = (2.0 + math.log(args.lr / self.best_lr) ** 2
            + ARM_OFFSET[arm_of(args)] + 0.001 * args.seed + args.noise)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": loss + 1 / s,
                    **({"val_loss": loss + 1 / s} if s % 3 == 0 or s == 7
                       else {})}) + "\n" for s in range(1, 8)))
    return {"final_val_loss": loss, "final_eval_loss": loss + 0.1,
            "tokens": 7 * 2048, "wall_s": 1.0}


def run_with(trainer, results, runs_dir):
  return lambda cell: lq.run_cell(cell, SETTING, results, runs_dir,
                                  runner=trainer)


def test_paired_difference_matches_numpy():
  rng = np.random.default_rng(0)
  a = dict(enumerate(rng.normal(2.0, 0.1, 6)))
  b = dict(enumerate(rng.normal(2.0, 0.1, 6)))
  a[6] = 1.0                 # seed without a partner: not paired
  b[5] = None                # diverged: not paired
  p = lq.paired(a, b)
  d = np.array([a[s] - b[s] for s in range(5)])
  assert p["n"] == 5 and p["seeds"] == [0, 1, 2, 3, 4]
  np.testing.assert_allclose(p["mean"], d.mean(), rtol=1e-12)
  np.testing.assert_allclose(p["se"], np.sqrt(np.var(d, ddof=1) / 5),
                             rtol=1e-12)
  assert p["improved"] == int(np.sum(d < 0))
  assert lq.paired({0: 1.0}, {0: 2.0})["se"] is None
  assert lq.paired({0: 1.0}, {1: 2.0}) is None


@pytest.mark.parametrize("arm", lq.MAIN_ARMS + lq.ABLATIONS)
@pytest.mark.parametrize("family", lq.FAMILIES)
def test_command_template_parses_to_the_cell(family, arm):
  cell = lq.Cell(family, arm, 1.5e-3, 2, noise=0.2)
  command = cell.command(SETTING)
  assert command.startswith("python -m examples.lm.train ")
  assert command.count("{out}") == 1
  args = train.parse_args(lq.command_argv(command, "/tmp/x"))
  assert arm_of(args) == arm and args.optimizer.split("_")[0] == family
  assert (args.lr, args.seed, args.noise, args.out) == (1.5e-3, 2, 0.2, "/tmp/x")
  assert (args.steps, args.microbatches, args.preset) == (7, 8, "tiny")
  if arm == "paper":
    assert args.inverse_correction == "paper"
    assert args.cross_fit == ("loo" if family == "adamw" else "twofold")
  factory, kwargs = train.optimizer_kwargs(args)
  del factory
  on = (kwargs["cross_fit"] is not None, kwargs["inverse_correction"] is not None)
  assert on == {"std": (False, False), "bc": (True, True), "cf": (True, False),
                "inv": (False, True), "paper": (True, True)}[arm]


def test_cells_in_the_results_file_are_skipped(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer()
  run = run_with(trainer, results, tmp_path / "runs")
  first = run(lq.Cell("adamw", "bc", 3e-3, 1))
  assert len(trainer.calls) == 1 and first["final_val_loss"] is not None
  again = run(lq.Cell("adamw", "bc", 3e-3, 1))
  assert len(trainer.calls) == 1 and again == first
  run(lq.Cell("adamw", "bc", 3e-3, 2))          # another seed runs
  run(lq.Cell("adamw", "bc", 3e-3, 1, noise=0.2))   # another data set runs
  assert len(trainer.calls) == 3
  other = lq.Setting(steps=8)                   # other settings are other cells
  assert lq.find(lq.load_runs(results), lq.Cell("adamw", "bc", 3e-3, 1),
                 other) is None
  runs = lq.load_runs(results)
  assert len(runs) == 3
  assert {r["data"] for r in runs} == {"shakespeare", "shakespeare-noise0.2"}
  curves = json.loads(lq.curves_path(results).read_text())
  val = curves[first_name(runs[0])]["val"]
  assert [s for s, _ in val] == [3, 6, 7]
  np.testing.assert_allclose([v for _, v in val], [
      runs[0]["final_val_loss"] + 1 / s for s in (3, 6, 7)], atol=1e-5)


def first_name(record):
  return lq.Cell(record["family"], record["variant"], record["lr"],
                 record["seed"], 0.0 if record["data"] == "shakespeare"
                 else 0.2).name


def test_diverged_runs_are_recorded_and_lose(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer(best_lr=6e-3, diverge_above=7e-3)
  run = run_with(trainer, results, tmp_path / "runs")
  best, grid = lq.choose_lr("adamw", "std", SETTING, run)
  assert best == 6e-3 and max(grid) == 1.2e-2
  bad = lq.find(lq.load_runs(results), lq.Cell("adamw", "std", 1.2e-2, 0),
                SETTING)
  assert bad["status"] == "diverged" and bad["final_eval_loss"] is None


@pytest.mark.parametrize("best_lr,expected", [(3e-3, 3e-3), (0.7e-3, 7.5e-4),
                                              (1e-1, 2.4e-2)])
def test_lr_search_brackets_the_optimum(tmp_path, best_lr, expected):
  trainer = FakeTrainer(best_lr=best_lr)
  run = run_with(trainer, tmp_path / "r.json", tmp_path / "runs")
  best, grid = lq.choose_lr("adamw", "bc", SETTING, run)
  assert best == expected
  assert len(grid) >= 3
  if best_lr < 0.05:         # within the extension budget: strictly inside
    assert grid[0] < best < grid[-1]
  else:                      # budget exhausted: the edge, reported as such
    assert best == grid[-1] and len(grid) == 3 + lq.MAX_EXTEND


def test_family_grid_and_report(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer(best_lr=3e-3)
  run = run_with(trainer, results, tmp_path / "runs")
  lq.run_family("adamw", SETTING, 3, run, noise=True)
  runs = lq.load_runs(results)
  # 3 grid values x 2 arms + 2 more seeds x 2 arms + 3 ablations x 3 seeds
  # + 2 noisy arms x 3 seeds.
  assert len(runs) == len(trainer.calls) == 6 + 4 + 9 + 6
  summary = lq.summarize(runs, SETTING)["adamw"]
  assert summary["lr"] == {"std": 3e-3, "bc": 3e-3}
  np.testing.assert_allclose(summary["diffs"]["bc"]["mean"], ARM_OFFSET["bc"])
  assert summary["diffs"]["bc"]["improved"] == 3
  np.testing.assert_allclose(summary["diffs"]["inv"]["mean"], ARM_OFFSET["inv"])
  np.testing.assert_allclose(summary["diffs"]["cf-bc"]["mean"],
                             ARM_OFFSET["cf"] - ARM_OFFSET["bc"])
  np.testing.assert_allclose(summary["noise"]["diff"]["mean"], ARM_OFFSET["bc"])
  lq.run_family("adamw", SETTING, 3, run, noise=True)   # all cached
  assert len(trainer.calls) == 25

  md = tmp_path / "RESULTS.md"
  md.write_text("# Results\n\nintro\n\n<!-- other:begin -->\nkeep me\n"
                "<!-- other:end -->\n")
  png = tmp_path / "q.png"
  lq.report(results, SETTING, png, md)
  once = md.read_text()
  section = once.split(lq.BEGIN)[1].split(lq.END)[0]
  lq.write_results_md(lq.BEGIN + section + lq.END + "\n", md)
  text = md.read_text()
  assert text == once                          # replacing is idempotent
  assert text.startswith("# Results\n\nintro\n") and "keep me" in text
  assert text.count(lq.BEGIN) == text.count(lq.END) == 1
  section = text.split(lq.BEGIN)[1].split(lq.END)[0]
  assert "| adamw | 0.003 | 0.003 |" in section
  assert "-0.0300 ± 0.0000 | 3/3 | -0.149 |" in section
  assert "Not run yet: sophia, shampoo." in section
  assert "in progress" not in section and "(edge" not in section
  partial = [r for r in lq.load_runs(results)
             if not (r["variant"] == "bc" and r["lr"] == 1.5e-3)]
  section = lq.report_markdown(partial, SETTING, lq.summarize(partial, SETTING),
                               "q.png", "r.json")
  assert "| adamw (lr search in progress) |" in section
  assert png.stat().st_size > 0


def test_more_seeds_for_some_arms(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer(best_lr=3e-3)
  run = run_with(trainer, results, tmp_path / "runs")
  lq.run_family("adamw", SETTING, 2, run, noise=True)
  before = len(trainer.calls)
  lq.run_family("adamw", SETTING, 4, run, noise=False, arms=("std", "cf"))
  new = [lq.load_runs(results)[i] for i in range(before, len(trainer.calls))]
  assert sorted((r["variant"], r["seed"], r["data"]) for r in new) == [
      ("cf", 2, "shakespeare"), ("cf", 3, "shakespeare"),
      ("std", 2, "shakespeare"), ("std", 3, "shakespeare")]
  summary = lq.summarize(lq.load_runs(results), SETTING)["adamw"]
  assert summary["diffs"]["cf"]["n"] == 4 and summary["diffs"]["bc"]["n"] == 2


class ShiftedTrainer(FakeTrainer):
  """The fake trainer with every loss moved by ``shift`` (code that drifted)."""

  def __init__(self, shift):
    super().__init__(best_lr=3e-3)
    self.shift = shift

  def __call__(self, argv):
    summary = super().__call__(argv)
    return {**summary, "final_val_loss": summary["final_val_loss"] + self.shift,
            "final_eval_loss": summary["final_eval_loss"] + self.shift}


def test_verify_reruns_recorded_commands(tmp_path):
  results = tmp_path / "r.json"
  lq.run_family("adamw", SETTING, 2, run_with(FakeTrainer(), results,
                                              tmp_path / "runs"), noise=False)
  runs = lq.load_runs(results)
  rerun = FakeTrainer()
  check = lq.verify(results, tmp_path / "runs", 3, runner=rerun)
  assert len(check["checks"]) == len(rerun.calls) == 3
  # Spread over the file: the oldest and the newest records are re-run.
  picked = [(c["variant"], c["lr"], c["seed"]) for c in check["checks"]]
  assert picked[0] == (runs[0]["variant"], runs[0]["lr"], runs[0]["seed"])
  assert picked[-1] == (runs[-1]["variant"], runs[-1]["lr"], runs[-1]["seed"])
  assert rerun.calls[0] == lq.command_argv(
      runs[0]["command"], str(tmp_path / "runs" / "verify" / (
          f"shakespeare_adamw_{runs[0]['variant']}_lr{runs[0]['lr']:g}_s0")))
  assert check["ok"] and check["max_abs_diff"] == 0.0

  drifted = lq.verify(results, tmp_path / "runs", 2,
                      runner=ShiftedTrainer(0.03))
  assert not drifted["ok"]
  np.testing.assert_allclose(drifted["max_abs_diff"], 0.03)
  np.testing.assert_allclose(
      [c["final_eval_loss"]["diff"] for c in drifted["checks"]], [0.03, 0.03])
  assert lq.verify(results, tmp_path / "runs", 2,
                   runner=ShiftedTrainer(0.01))["ok"]


def test_rerun_unversioned_replaces_records_without_code(tmp_path):
  results = tmp_path / "r.json"
  run = run_with(FakeTrainer(), results, tmp_path / "runs")
  lq.run_family("adamw", SETTING, 2, run, noise=True)
  before = lq.load_runs(results)
  for r in before:
    r["final_eval_loss"] += 0.5     # what older code gave
  # run_with's records carry no `code`: mark one as versioned, and add an
  # unversioned record of another family.
  before[2]["code"] = {"commit": "abc", "modified": []}
  other = {**before[3], "family": "sophia"}
  other.pop("code", None)
  lq.write_json(results, {"runs": before + [other]})

  trainer = FakeTrainer()
  def run_versioned(cell):
    return lq.run_cell(cell, SETTING, results, tmp_path / "runs",
                       runner=trainer, code={"commit": "new", "modified": []})
  unversioned = [r for r in before if "code" not in r]
  assert lq.rerun_unversioned(results, SETTING, ["adamw"],
                              run_versioned) == len(unversioned)
  data = json.loads(results.read_text())
  assert len(data["runs"]) == len(before) + 1
  assert sorted(r["final_eval_loss"] for r in data["superseded"]) == sorted(
      r["final_eval_loss"] for r in unversioned)
  assert all(r["superseded"] for r in data["superseded"])
  rerun = [r for r in data["runs"] if r.get("code", {}).get("commit") == "new"]
  assert sorted(lq.cell_of(r).name for r in rerun) == sorted(
      lq.cell_of(r).name for r in unversioned)
  assert any(r["data"] != "shakespeare" for r in rerun)
  for r in rerun:                  # the fresh losses, not the old ones
    old = next(o for o in unversioned if lq.cell_of(o) == lq.cell_of(r))
    np.testing.assert_allclose(r["final_eval_loss"],
                               old["final_eval_loss"] - 0.5)
  assert other in data["runs"]     # other families untouched
  lq.append_run(results, dict(before[0]))   # appending keeps `superseded`
  assert len(json.loads(results.read_text())["superseded"]) == len(
      unversioned)


def test_quick_uses_the_rates_the_grid_chose(tmp_path):
  results = tmp_path / "r.json"
  assert lq.quick_lrs(results, SETTING) == {"std": lq.QUICK_LR,
                                            "bc": lq.QUICK_LR}
  run = run_with(FakeTrainer(best_lr=1.5e-3), results, tmp_path / "runs")
  lq.choose_lr("adamw", "std", SETTING, run)
  run(lq.Cell("adamw", "std", 1.5e-3, 1))     # other seeds do not vote
  assert lq.quick_lrs(results, SETTING) == {"std": 1.5e-3, "bc": lq.QUICK_LR}
  assert lq.quick_lrs(results, lq.Setting(steps=9))["std"] == lq.QUICK_LR
