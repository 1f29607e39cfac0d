"""The logic of benchmarks/lm_quality.py with a fake trainer (no training),
and its committed records: their commands and the RESULTS.md section."""

import json
import math
import os
import pathlib
import subprocess

import numpy as np
import pytest

from benchmarks import harness
from benchmarks import lm_quality as lq
from examples.lm import optimizer
from examples.lm import train

SETTING = lq.Setting(steps=7)
ARM_OFFSET = {"std": 0.0, "bc": -0.03, "cf": -0.02, "inv": 0.01, "paper": 0.0}
HEAD = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"],
                      capture_output=True, text=True).stdout.strip()


def arm_of(cfg) -> str:
  """Inverts lm_quality.arm_flags through train.py's own parser."""
  if not cfg.optimizer.endswith("_bc"):
    return "std"
  return {(None, None): "bc", (None, "none"): "cf", ("none", None): "inv",
          }.get((cfg.cross_fit, cfg.inverse_correction), "paper")


class FakeTrainer:
  """The training subprocess's stand-in: a loss bowl in log(lr) around
  ``best_lr``, offset by arm, seed and noise."""

  def __init__(self, best_lr=3e-3, diverge_above=math.inf, shift=0.0):
    self.best_lr, self.diverge_above, self.shift = best_lr, diverge_above, shift
    self.calls = []

  def __call__(self, argv):
    cfg = train.parse_args(argv)
    self.calls.append(argv)
    if cfg.lr > self.diverge_above:
      raise FloatingPointError("loss is nan at step 3")
    loss = (2.0 + math.log(cfg.lr / self.best_lr) ** 2 + self.shift
            + ARM_OFFSET[arm_of(cfg)] + 0.001 * cfg.seed + cfg.noise)
    out = pathlib.Path(cfg.out)
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


@pytest.mark.parametrize("arm", lq.MAIN_ARMS + lq.ABLATIONS)
@pytest.mark.parametrize("family", lq.FAMILIES)
def test_command_template_parses_to_the_cell(family, arm):
  command = lq.Cell(family, arm, 1.5e-3, 2, noise=0.2).command(SETTING)
  assert command.startswith("python -m examples.lm.train ")
  assert command.endswith(" --out {out}") and command.count("{out}") == 1
  cfg = train.parse_args(lq.lm_runs.argv_of(command, "/tmp/x"))
  assert arm_of(cfg) == arm and cfg.optimizer.split("_")[0] == family
  assert (cfg.lr, cfg.seed, cfg.noise, cfg.out) == (1.5e-3, 2, 0.2, "/tmp/x")
  assert (cfg.steps, cfg.microbatches, cfg.preset) == (7, 8, "tiny")
  assert (cfg.schedule, cfg.lr_floor, cfg.checkpoint_every) == (
      "cosine", 0.1, 0)
  if arm == "paper":
    assert cfg.inverse_correction == "paper"
    assert cfg.cross_fit == ("loo" if family == "adamw" else "twofold")
  kwargs = optimizer.optimizer_kwargs(cfg)
  on = (kwargs["cross_fit"] is not None,
        kwargs["inverse_correction"] is not None)
  assert on == {"std": (False, False), "bc": (True, True), "cf": (True, False),
                "inv": (False, True), "paper": (True, True)}[arm]


def committed():
  return lq.load_file(harness.RESULTS_DIR / "lm_quality.json")


def test_the_recorded_commands_are_the_cells_commands():
  """Every committed record (superseded ones too) is what its cell would
  run now: the grid reuses them and their commands reproduce them."""
  data = committed()
  assert len(data["runs"]) == 104
  for r in data["runs"] + data["superseded"]:
    setting = lq.Setting(**{k: r.get(k, getattr(lq.Setting, k)) for k in (
        "preset", "steps", "microbatches", "microbatch_size", "seq_len",
        "devices")})
    assert lq.cell_of(r).command(setting) == r["command"]


def test_the_committed_section_is_the_report_of_the_committed_records():
  runs = committed()["runs"]
  section = lq.report_markdown(runs, lq.Setting(), lq.summarize(
      runs, lq.Setting()), "results/lm_quality.png",
      "benchmarks/results/lm_quality.json")
  text = harness.RESULTS_MD.read_text()
  assert harness.replace_section(text, "lm_quality", section) == text
  assert "Reproduce: `python -m benchmarks.lm_quality`" in section


def test_cells_in_the_results_file_are_skipped(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer()
  run = run_with(trainer, results, tmp_path / "runs")
  first = run(lq.Cell("adamw", "bc", 3e-3, 1))
  assert len(trainer.calls) == 1 and first["final_val_loss"] is not None
  assert first["code"]["commit"] == HEAD and first["status"] == "ok"
  assert run(lq.Cell("adamw", "bc", 3e-3, 1)) == first
  assert len(trainer.calls) == 1
  run(lq.Cell("adamw", "bc", 3e-3, 2))          # another seed runs
  run(lq.Cell("adamw", "bc", 3e-3, 1, noise=0.2))   # another data set runs
  assert len(trainer.calls) == 3
  other = lq.Setting(steps=8)                   # other settings are other cells
  assert lq.find(lq.load_runs(results), lq.Cell("adamw", "bc", 3e-3, 1),
                 other) is None
  runs = lq.load_runs(results)
  assert len(runs) == 3
  assert {r["data"] for r in runs} == {"shakespeare", "shakespeare-noise0.2"}
  val = json.loads(lq.curves_path(results).read_text())[
      lq.cell_of(runs[0]).name]["val"]
  assert [s for s, _ in val] == [3, 6, 7]
  np.testing.assert_allclose([v for _, v in val], [
      runs[0]["final_val_loss"] + 1 / s for s in (3, 6, 7)], atol=1e-5)
  # A run whose record was not written (a crash after training) is reused.
  cell = lq.Cell("adamw", "std", 3e-3, 0)
  run(cell)
  harness.write_json(results, {"runs": runs})
  assert run(cell)["final_val_loss"] is not None and len(trainer.calls) == 4


def test_appending_is_atomic(tmp_path, monkeypatch):
  results = tmp_path / "r.json"
  run_with(FakeTrainer(), results, tmp_path / "runs")(
      lq.Cell("adamw", "bc", 3e-3, 1))
  before = results.read_text()
  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    lq.append_run(results, {"x": 1})
  assert results.read_text() == before


def test_diverged_runs_are_recorded_and_lose(tmp_path):
  results = tmp_path / "r.json"
  trainer = FakeTrainer(best_lr=6e-3, diverge_above=7e-3)
  run = run_with(trainer, results, tmp_path / "runs")
  best, grid = lq.choose_lr("adamw", "std", SETTING, run)
  assert best == 6e-3 and max(grid) == 1.2e-2
  bad = lq.find(lq.load_runs(results), lq.Cell("adamw", "std", 1.2e-2, 0),
                SETTING)
  assert bad["status"] == "diverged" and bad["final_eval_loss"] is None
  assert bad["tokens"] == 7 * 8 * 2 * 128 and bad["code"]["commit"] == HEAD


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
  lq.report(results, SETTING, png, md)
  text = md.read_text()
  assert text == once                          # replacing is idempotent
  assert text.startswith("# Results\n\nintro\n") and "keep me" in text
  begin, end = "<!-- lm_quality:begin -->", "<!-- lm_quality:end -->"
  assert text.count(begin) == text.count(end) == 1
  section = text.split(begin)[1].split(end)[0]
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
  new = lq.load_runs(results)[before:]
  assert len(new) == len(trainer.calls) - before
  assert sorted((r["variant"], r["seed"], r["data"]) for r in new) == [
      ("cf", 2, "shakespeare"), ("cf", 3, "shakespeare"),
      ("std", 2, "shakespeare"), ("std", 3, "shakespeare")]
  summary = lq.summarize(lq.load_runs(results), SETTING)["adamw"]
  assert summary["diffs"]["cf"]["n"] == 4 and summary["diffs"]["bc"]["n"] == 2


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
  assert rerun.calls[0] == lq.lm_runs.argv_of(
      runs[0]["command"], tmp_path / "runs" / "verify" / (
          f"shakespeare_adamw_{runs[0]['variant']}_lr{runs[0]['lr']:g}_s0"))
  assert check["ok"] and check["max_abs_diff"] == 0.0
  again = FakeTrainer()      # the verify folders are trained afresh
  lq.verify(results, tmp_path / "runs", 3, runner=again)
  assert again.calls == rerun.calls

  drifted = lq.verify(results, tmp_path / "runs", 2,
                      runner=FakeTrainer(shift=0.03))
  assert not drifted["ok"]
  np.testing.assert_allclose(drifted["max_abs_diff"], 0.03)
  np.testing.assert_allclose(
      [c["final_eval_loss"]["diff"] for c in drifted["checks"]], [0.03, 0.03])
  assert lq.verify(results, tmp_path / "runs", 2,
                   runner=FakeTrainer(shift=0.01))["ok"]


def test_verify_command_keeps_earlier_checks(tmp_path, monkeypatch):
  monkeypatch.setattr(harness, "RESULTS_MD", tmp_path / "RESULTS.md")
  results = tmp_path / "r.json"
  lq.main(["--families", "adamw", "--seeds", "1", "--no-noise", "--arms",
           "std", "--results", str(results), "--runs-dir",
           str(tmp_path / "runs")], runner=FakeTrainer())
  path = tmp_path / "r_verify.json"
  for k in (1, 2):
    lq.main(["--verify", str(k), "--results", str(results), "--runs-dir",
             str(tmp_path / "runs")], runner=FakeTrainer())
  written = json.loads(path.read_text())
  assert written["command"] == "python -m benchmarks.lm_quality --verify 2 " \
      f"--results {results} --runs-dir {tmp_path / 'runs'}"
  assert len(written["checks"]) == 2 and written["ok"]
  assert written["code"]["commit"] == HEAD
  (earlier,) = written["previous"]
  assert len(earlier["checks"]) == 1 and "previous" not in earlier
  with pytest.raises(SystemExit):
    lq.main(["--verify", "1", "--results", str(results), "--runs-dir",
             str(tmp_path / "runs")], runner=FakeTrainer(shift=0.5))
  assert len(json.loads(path.read_text())["previous"]) == 2
  assert "| adamw | 0.003 | 0.003 |" in (tmp_path / "RESULTS.md").read_text()


def test_rerun_unversioned_replaces_records_without_code(tmp_path):
  results = tmp_path / "r.json"
  run = run_with(FakeTrainer(), results, tmp_path / "runs")
  lq.run_family("adamw", SETTING, 2, run, noise=True)
  before = lq.load_runs(results)
  for r in before:           # what older code gave, before records said so
    r["final_eval_loss"] += 0.5
    if r is not before[2]:
      del r["code"]
  other = {**before[3], "family": "sophia"}    # another family: untouched
  harness.write_json(results, {"runs": before + [other]})

  unversioned = [r for r in before if "code" not in r]
  assert lq.rerun_unversioned(results, SETTING, ["adamw"], run) == len(
      unversioned)
  data = json.loads(results.read_text())
  assert len(data["runs"]) == len(before) + 1
  assert sorted(r["final_eval_loss"] for r in data["superseded"]) == sorted(
      r["final_eval_loss"] for r in unversioned)
  assert all(r["superseded"] for r in data["superseded"])
  rerun = [r for r in data["runs"] if r not in before + [other]]
  assert all(r["code"]["commit"] == HEAD for r in rerun)
  assert sorted(lq.cell_of(r).name for r in rerun) == sorted(
      lq.cell_of(r).name for r in unversioned)
  assert any(r["data"] != "shakespeare" for r in rerun)
  for r in rerun:                  # the fresh losses, not the old ones
    old = next(o for o in unversioned if lq.cell_of(o) == lq.cell_of(r))
    np.testing.assert_allclose(r["final_eval_loss"],
                               old["final_eval_loss"] - 0.5)
  assert other in data["runs"]
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


def test_parse_args():
  args = lq.parse_args(["--quick"])
  assert args.results == harness.ROOT / "runs" / "lm_quality_quick.json"
  assert args.png == harness.ROOT / "runs" / "lm_quality_quick.png"
  assert args.runs_dir == harness.ROOT / "runs" / "lm_quality_quick"
  args = lq.parse_args(["--seeds", "6", "--arms", "std", "bc", "cf",
                        "--no-noise", "--steps", "50", "--seq-len", "64"])
  assert args.results == harness.RESULTS_DIR / "lm_quality.json"
  assert args.setting == lq.Setting(steps=50, seq_len=64)
  assert (args.seeds, args.arms, args.no_noise) == (6, ["std", "bc", "cf"],
                                                    True)
  for bad in (["--arms", "xx"], ["--seeds", "0"], ["--verify", "0"]):
    with pytest.raises(SystemExit):
      lq.parse_args(bad)


@pytest.mark.parametrize("name", ["lm_quality", "lm_quality_verify"])
def test_the_old_command_names_its_commit_and_new_command(name):
  data = json.loads((harness.RESULTS_DIR / f"{name}.json").read_text())
  # The old --verify result went to `previous` when --verify ran again.
  rep = next(d["replaced"] for d in [data, *data.get("previous", [])]
             if "replaced" in d)
  subprocess.run(["git", "-C", str(harness.ROOT), "cat-file", "-e",
                  f"{rep['command_reproduces_at_commit']}:{rep['script']}"],
                 check=True)
  lq.parse_args(harness.command_argv(rep["equivalent_command"], lq.MODULE))
