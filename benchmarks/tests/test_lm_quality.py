"""The logic of benchmarks/lm_quality.py with a fake trainer (no training),
and its committed records: their commands and the RESULTS.md section."""

import dataclasses
import functools
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
ARM_OFFSET = {"std": 0.0, "bc": -0.03, "cf": -0.02, "inv": 0.01, "paper": 0.0,
              "adopt": 0.02, "plain": 0.05, "adaptive": 0.04}
HEAD = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"],
                      capture_output=True, text=True).stdout.strip()


def arm_of(cfg) -> str:
  """Inverts lm_quality.arm_flags through train.py's own parser (the
  baselines' arms: "adopt", "plain" and "adaptive" Muon)."""
  baseline = {"adopt": "adopt", "muon": "plain", "muon_adaptive": "adaptive"}
  if cfg.optimizer in baseline:
    return baseline[cfg.optimizer]
  if not cfg.optimizer.endswith("_bc"):
    return "std"
  return {(None, None): "bc", (None, "none"): "cf", ("none", None): "inv",
          }.get((cfg.cross_fit, cfg.inverse_correction), "paper")


def rho_of(cfg) -> float:
  """Sophia's rho of a run (the table's default unless --hparam sets it)."""
  return optimizer.optimizer_kwargs(cfg).get("rho", lq.RHO)


def floor_effect(cfg) -> float:
  """The fake's loss change from the cosine floor: 0 at the grid's 0.1,
  seed-dependent so that paired differences vary over seeds."""
  return -0.5 * (cfg.lr_floor - 0.1) * (1 + cfg.seed)


class FakeTrainer:
  """The training subprocess's stand-in: a loss bowl in log(lr) around
  ``best_lr`` (per --optimizer in ``best_lrs``; Sophia's moves with rho,
  ``best_lr * rho / 0.05``), offset by arm, seed, noise and the floor, and
  a bowl in log(rho) around ``best_rho``. Its summary's ``monitor``:
  noise_scale 1 + seed, coupling 10 lr, jensen 0.5 for the _bc optimizers,
  win_rate 4 rho for Sophia's."""

  def __init__(self, best_lr=3e-3, diverge_above=math.inf, shift=0.0,
               best_lrs=None, best_rho=0.05):
    self.best_lr, self.diverge_above, self.shift = best_lr, diverge_above, shift
    self.best_lrs, self.best_rho = best_lrs or {}, best_rho
    self.calls = []

  def __call__(self, argv):
    cfg = train.parse_args(argv)
    self.calls.append(argv)
    if cfg.lr > self.diverge_above:
      raise FloatingPointError("loss is nan at step 3")
    best_lr = self.best_lrs.get(cfg.optimizer, self.best_lr)
    sophia = cfg.optimizer.startswith("sophia")
    if sophia:
      best_lr *= rho_of(cfg) / 0.05
    loss = (2.0 + math.log(cfg.lr / best_lr) ** 2 + self.shift
            + ARM_OFFSET[arm_of(cfg)] + 0.001 * cfg.seed + cfg.noise
            + floor_effect(cfg)
            + 2 * math.log(rho_of(cfg) / self.best_rho) ** 2 * sophia)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": loss + 1 / s,
                    **({"val_loss": loss + 1 / s} if s % 3 == 0 or s == 7
                       else {})}) + "\n" for s in range(1, 8)))
    monitor = {"noise_scale": 1.0 + cfg.seed, "coupling": 10 * cfg.lr}
    if cfg.optimizer.endswith("_bc"):
      monitor["jensen"] = 0.5
    if sophia:
      monitor["win_rate"] = 4 * rho_of(cfg)
    return {"final_val_loss": loss, "final_eval_loss": loss + 0.1,
            "tokens": 7 * 2048, "wall_s": 1.0, "monitor": monitor}


@pytest.fixture(autouse=True)
def docs_page(tmp_path, monkeypatch):
  """The headline's docs page, written in the test's folder."""
  monkeypatch.setattr(lq, "DOCS_PAGE", tmp_path / "when_it_pays.md")
  return lq.DOCS_PAGE


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
  assert len(data["runs"]) >= 104
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


def test_the_docs_page_headline_is_that_of_the_committed_records():
  long = lq.load_runs(harness.ROOT / lq.LONG_RESULTS[0])
  page = (harness.ROOT / "docs" / "when_it_pays.md").read_text()
  assert harness.replace_section(page, "pays", lq.headline(
      committed()["runs"], long)) == page


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


def test_add_monitor_to_older_records(tmp_path):
  results, runs_dir = tmp_path / "r.json", tmp_path / "runs"
  lq.run_family("adamw", SETTING, 2, run_with(FakeTrainer(), results,
                                              runs_dir), noise=False)
  data = lq.load_file(results)   # as if made before the monitor existed
  for r in data["runs"]:
    r.pop("monitor")
  harness.write_json(results, data)
  lrs = lq.selected_lrs(data["runs"], SETTING, "adamw")
  with pytest.raises(ValueError, match="moved by 0.0300"):
    lq.add_monitor(results, SETTING, ["adamw"], runs_dir / "a",
                   FakeTrainer(shift=0.03))
  first = FakeTrainer(shift=0.01)   # seed 0 of both arms, std first
  assert lq.add_monitor(results, SETTING, ["adamw"], runs_dir / "b",
                        first, seeds=1) == 2
  assert [(c.optimizer, c.seed) for c in map(train.parse_args, first.calls)
          ] == [("adamw", 0), ("adamw_bc", 0)]
  rerun = FakeTrainer(shift=0.01)
  assert lq.add_monitor(results, SETTING, ["adamw"], runs_dir / "b",
                        rerun) == 2 == len(rerun.calls)
  after = lq.load_runs(results)
  for arm in lq.MAIN_ARMS:   # the main arms' seeds at their chosen rates
    for r in lq.select(after, SETTING, "adamw", arm, lrs[arm]):
      assert r["monitor"]["noise_scale"] == 1.0 + r["seed"]
      assert r["monitor_rerun"]["final_eval_loss"] == pytest.approx(
          r["final_eval_loss"] + 0.01)
  assert sum("monitor" in r for r in after) == 4   # nothing else re-run
  assert [{k: v for k, v in r.items() if "monitor" not in k} for r in after
          ] == data["runs"]                        # nor changed
  assert lq.add_monitor(results, SETTING, ["adamw"], runs_dir / "b",
                        FakeTrainer()) == 0


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


# Baselines, the paper's protocol and the bias monitor ----------------------

@pytest.mark.parametrize("family,arm,name", [
    ("soap", "std", "soap"), ("soap", "bc", "soap_bc"),
    ("adopt", "std", "adopt"), ("muon", "plain", "muon"),
    ("muon", "adaptive", "muon_adaptive"), ("adamw", "ref_bc", "adamw_bc"),
    ("adamw", "ref_std", "adamw"), ("adamw", "std_floor0", "adamw")])
def test_new_arms_parse_to_their_optimizer_and_floor(family, arm, name):
  command = lq.Cell(family, arm, 4.5e-3, 1).command(SETTING)
  cfg = train.parse_args(lq.lm_runs.argv_of(command, "/tmp/x"))
  assert cfg.optimizer == name and (cfg.lr, cfg.seed) == (4.5e-3, 1)
  assert (cfg.cross_fit, cfg.inverse_correction, cfg.hparam) == (None, None,
                                                                 ())
  floor = {"ref_bc": 0.2, "ref_std": 0.2, "std_floor0": 0.0}.get(arm, 0.1)
  assert cfg.lr_floor == floor and command.count("--lr-floor") == 1
  assert lq.Cell(family, arm, 4.5e-3, 1).name == (
      f"shakespeare_{family}_{arm}_lr0.0045_s1")


def test_hparams_are_in_the_name_and_command_only_when_set():
  plain = lq.Cell("sophia", "bc", 1.5e-3, 0)
  cell = lq.Cell("sophia", "bc", 1.5e-3, 0, hparams=(("rho", 0.025),))
  assert plain.name == "shakespeare_sophia_bc_lr0.0015_s0"
  assert cell.name == "shakespeare_sophia_bc_lr0.0015_rho0.025_s0"
  assert "--hparam" not in plain.command(SETTING)
  cfg = train.parse_args(lq.lm_runs.argv_of(cell.command(SETTING), "/x"))
  assert cfg.hparam == ("rho=0.025",) and cfg.optimizer == "sophia_bc"
  assert optimizer.optimizer_kwargs(cfg)["rho"] == 0.025
  assert lq.rho_hparams(0.05) == () and lq.RHO == 0.05
  assert lq.rho_hparams(0.1) == (("rho", 0.1),)
  for bad in (("soap", "cf"), ("adopt", "bc"), ("muon", "std"),
              ("sophia", "ref_bc")):
    with pytest.raises(ValueError):
      lq.arm_flags(*bad)


def main_with(tmp_path, monkeypatch, trainer, *argv):
  """lm_quality.main on a temporary results file; returns (runs, section)."""
  monkeypatch.setattr(harness, "RESULTS_MD", tmp_path / "RESULTS.md")
  results = tmp_path / "r.json"
  lq.main([*argv, "--steps", "7", "--results", str(results), "--runs-dir",
           str(tmp_path / "runs")], runner=trainer)
  text = (tmp_path / "RESULTS.md").read_text()
  name = "lm_quality_long" if "--long" in argv else "lm_quality"
  return lq.load_runs(results), text.split(f"<!-- {name}:begin -->")[1].split(
      f"<!-- {name}:end -->")[0]


def test_baselines_search_seed_and_pair_with_adamw(tmp_path, monkeypatch):
  # ADOPT's best rate is below the grid: its search extends to bracket it.
  # Muon's grid starts higher, around its best rate.
  trainer = FakeTrainer(best_lrs={"adopt": 1.5e-3, "muon": 1.2e-2,
                                  "muon_adaptive": 1.2e-2})
  runs, section = main_with(
      tmp_path, monkeypatch, trainer, "--families", "adamw", "soap", "adopt",
      "muon", "--no-noise", "--arms", "std", "bc", "plain", "adaptive")
  setting = lq.Setting(steps=7)
  assert {f: lq.selected_lrs(runs, setting, f) for f in lq.BASELINES} == {
      "soap": {"std": 3e-3, "bc": 3e-3}, "adopt": {"std": 1.5e-3},
      "muon": {"plain": 1.2e-2, "adaptive": 1.2e-2}}
  adopt = sorted(r["lr"] for r in runs if r["family"] == "adopt"
                 and r["seed"] == 0)
  assert adopt == [7.5e-4, 1.5e-3, 3e-3, 6e-3]
  # 3-point searches (ADOPT's 4) of 7 arms, then seeds 1 and 2 of each.
  assert len(runs) == len(trainer.calls) == 3 * 7 + 1 + 2 * 7
  for family, arms in lq.SEARCHED.items():
    if family in ("adamw", *lq.BASELINES):
      for arm in arms:
        assert sorted(r["seed"] for r in runs if (r["family"], r["variant"])
                      == (family, arm) and r["lr"] == lq.selected_lrs(
                          runs, setting, family)[arm]) == [0, 1, 2]
  base = lq.summarize_baselines(runs, setting)
  rows = {(r["family"], r["arm"]): r for r in base["rows"]}
  assert list(rows) == [("adamw", "std"), ("adamw", "bc"), ("soap", "std"),
                        ("soap", "bc"), ("adopt", "std"), ("muon", "plain"),
                        ("muon", "adaptive")]
  # The fake's loss is 2 + arm offset + seed / 1000 at the best rate.
  for (family, arm), r in rows.items():
    offset = ARM_OFFSET["adopt" if family == "adopt" else arm]
    np.testing.assert_allclose(r["mean"], 2.1 + offset + 0.001)
    for base_arm, p in (("std", r["vs_std"]), ("bc", r["vs_bc"])):
      if (family, arm) == ("adamw", base_arm):
        assert p is None
        continue
      np.testing.assert_allclose(p["diffs"], [offset - ARM_OFFSET[base_arm]]
                                 * 3, atol=1e-12)
      assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
  assert base["muon"] == "adaptive"
  np.testing.assert_allclose([base["muon_val"]["plain"],
                              base["muon_val"]["adaptive"]], [2.05, 2.04])
  assert ("| adopt | std | `adopt` | 0.0015 | 3 | 2.1210 | +0.0200 ± 0.0000 "
          "(0/3) | +0.0500 ± 0.0000 (0/3) |") in section
  assert ("| muon | adaptive | `muon_adaptive` | 0.012 | 3 | 2.1410 | "
          "+0.0400 ± 0.0000 (0/3) | +0.0700 ± 0.0000 (0/3) |") in section
  assert "| soap | 0.003 | 0.003 |" in section          # the bc - std table
  bowl = lambda lr: f"{2.02 + math.log(lr / 1.5e-3) ** 2:.4f}"
  assert (f"| adopt | std | 0.00075: {bowl(7.5e-4)}, **0.0015: 2.0200**, "
          f"0.003: {bowl(3e-3)}, 0.006: {bowl(6e-3)} |") in section
  assert "the `adaptive` variant (`--optimizer muon_adaptive`)" in section
  assert "(2.0400 vs 2.0500 for `plain`)" in section
  # More seeds for one arm leave the others alone.
  lq.run_family("adopt", setting, 4, run_with(trainer, tmp_path / "r.json",
                                              tmp_path / "runs"), noise=False)
  assert len(trainer.calls) == 3 * 7 + 1 + 2 * 7 + 1


def test_ratio_is_the_delta_method_ratio_of_means():
  rng = np.random.default_rng(0)
  a, b = rng.normal(-0.02, 0.01, 5), rng.normal(-0.03, 0.01, 5)
  r = lq.ratio(a, b)
  mean_a, mean_b, n = a.mean(), b.mean(), len(a)
  cov = np.cov(a, b)    # the delta method's variance of mean_a / mean_b
  var = (mean_a / mean_b) ** 2 * (cov[0, 0] / mean_a ** 2 + cov[1, 1]
                                  / mean_b ** 2 - 2 * cov[0, 1]
                                  / (mean_a * mean_b)) / n
  np.testing.assert_allclose([r["mean"], r["se"]], [mean_a / mean_b,
                                                    math.sqrt(var)])
  assert r["n"] == 5 and r["mean_b"] == mean_b
  assert lq.ratio([0.1], [0.2]) == {"mean": 0.5, "se": None, "n": 1,
                                    "mean_b": 0.2}
  assert lq.ratio([], []) is None and lq.ratio([0.1], [0.0]) is None


def test_protocol_runs_the_reference_configuration(tmp_path, monkeypatch):
  trainer = FakeTrainer(best_lr=3e-3)
  # One seed first, as the paper.
  runs, section = main_with(tmp_path, monkeypatch, trainer, "--protocol",
                            "--seeds", "1")
  assert {(r["variant"], r["lr"], r["seed"], r["lr_floor"]) for r in runs
          if r["variant"] in lq.PROTOCOL} == {
              ("ref_bc", 4.5e-3, 0, 0.2), ("ref_std", 4.5e-3, 0, 0.2),
              ("std_floor0", 3e-3, 0, 0.0)}
  assert len(trainer.calls) == 3 + 3        # std's search, three arms
  assert "| ref_bc - std_floor0 (the reference configuration) |" in section
  # The tuned bc arm has no records: its pair is missing.
  assert "| bc - std (tuned rates, floor 0.1) | - | - | - |" in section

  lq.main(["--families", "adamw", "--arms", "std", "bc", "--no-noise",
           "--protocol", "--steps", "7", "--results", str(tmp_path / "r.json"),
           "--runs-dir", str(tmp_path / "runs")], runner=trainer)
  runs = lq.load_runs(tmp_path / "r.json")
  proto = [argv for argv in trainer.calls   # argv[-1]: the run's folder
           if any(f"_{arm}_" in argv[-1] for arm in lq.PROTOCOL)]
  assert [pathlib.Path(argv[-1]).name for argv in proto[:3]] == [
      "shakespeare_adamw_ref_bc_lr0.0045_s0",
      "shakespeare_adamw_ref_std_lr0.0045_s0",
      "shakespeare_adamw_std_floor0_lr0.003_s0"]
  for argv in proto:             # the commands carry the protocol's settings
    cfg = train.parse_args(argv)
    ref = "_ref_" in argv[-1]
    assert cfg.lr == (4.5e-3 if ref else 3e-3)
    assert cfg.lr_floor == (0.2 if ref else 0.0)
    assert cfg.optimizer == ("adamw_bc" if "_ref_bc_" in argv[-1] else "adamw")
    assert argv.count("--lr-floor") == 1
  assert len(proto) == 9
  summary = lq.summarize_protocol(runs, lq.Setting(steps=7))
  # The fake's losses, restated: the bowl at 1.5 x the best rate, bc's
  # offset, and the floor's seed-dependent effect.
  # Relative to the seed's common part: ref arms -0.5 (0.2 - 0.1) (1 + s),
  # std_floor0 -0.5 (0 - 0.1) (1 + s).
  seeds = np.arange(3)
  bowl = math.log(1.5) ** 2
  ref_std, std_floor0 = bowl - 0.05 * (1 + seeds), 0.05 * (1 + seeds)
  ref_bc = ref_std - 0.03
  a, b = ref_std - std_floor0, ref_bc - std_floor0
  np.testing.assert_allclose(summary["pairs"]["ref_bc-std_floor0"]["diffs"],
                             b, atol=1e-9)
  np.testing.assert_allclose(summary["pairs"]["ref_std-std_floor0"]["diffs"],
                             a, atol=1e-9)
  np.testing.assert_allclose(summary["pairs"]["bc-std"]["diffs"], [-0.03] * 3,
                             atol=1e-9)
  assert summary["seed0"]["ref_bc-std_floor0"]["n"] == 1
  np.testing.assert_allclose(summary["seed0"]["ref_bc-std_floor0"]["mean"],
                             b[0], atol=1e-9)
  ratio = a.mean() / b.mean()
  se = np.std(a - ratio * b, ddof=1) / math.sqrt(3) / abs(b.mean())
  np.testing.assert_allclose([summary["share"]["mean"],
                              summary["share"]["se"]], [ratio, se], rtol=1e-6)
  np.testing.assert_allclose(summary["share_seed0"]["mean"], a[0] / b[0],
                             rtol=1e-6)
  section = lq.report_markdown(runs, lq.Setting(steps=7), lq.summarize(
      runs, lq.Setting(steps=7)), "q.png", "r.json")
  assert (f"| ref_bc - std_floor0 (the reference configuration) | "
          f"{b[0]:+.4f} (1 seed) | {b.mean():+.4f} ± "
          f"{np.std(b, ddof=1) / math.sqrt(3):.4f} | {(b < 0).sum()}/3 |") in section
  assert b[0] > 0 > b.mean()     # seed 0 alone: the configuration lost
  assert (f"{a[0] / b[0]:.2f} (not a share: there the reference "
          f"configuration shows no gain, mean b = {b[0]:+.4f}) with 1 seed"
          ) in section
  assert f"{ratio:.2f} ± {se:.2f} over 3 seeds" in section
  assert "| ref_bc | 0.0045 | 0.2 | 3 |" in section


def test_headline_of_the_docs_page(tmp_path, monkeypatch, docs_page):
  # No longer runs (the committed ones would be read otherwise).
  monkeypatch.setattr(lq, "LONG_RESULTS", (str(tmp_path / "long.json"),) * 2)
  trainer = FakeTrainer(best_lr=3e-3)
  runs, _ = main_with(tmp_path, monkeypatch, trainer, "--families", "adamw",
                      "--arms", "std", "bc", "--no-noise", "--protocol")
  setting = lq.Setting(steps=7)
  page = docs_page.read_text()   # written with RESULTS.md's section
  assert page == lq.harness.replace_section(
      lq.harness.RESULTS_HEADER, "pays", lq.headline(runs, [], setting,
                                                     lq.LONG))
  rows = {line.split(" | ")[1]: line.split(" | ")[2:]   # the first of each
          for line in reversed(page.splitlines()) if line.startswith("| ")}
  test = {(r["variant"], r["seed"]): r["final_eval_loss"] for r in runs
          if r["lr"] == 3e-3 or r["variant"].startswith("ref")}
  d = [test["bc", k] - test["std", k] for k in range(3)]   # by hand
  assert rows["`adamw` bc - std"][0] == (
      f"{np.mean(d):+.4f} ± {np.std(d, ddof=1) / math.sqrt(3):.4f}")
  assert rows["`adamw` bc - std"][1] == "3/3 |"
  d = [test["ref_std", k] - test["std_floor0", k] for k in range(3)]
  assert rows["its schedule alone: `ref_std` - `std_floor0`"][0] == (
      f"{np.mean(d):+.4f} ± {np.std(d, ddof=1) / math.sqrt(3):.4f}")
  assert rows["`sophia` bc - std, rho tuned"][0] == (
      "pending: `python -m benchmarks.lm_quality --sophia-rho`")
  assert rows["`adamw` cf - std"][0].endswith("--long`")
  assert "| adamw | ref_bc | 3 | 2 | 0.045 | 0.5 | - |" in page   # the fake's


def test_monitor_averages_per_arm(tmp_path, monkeypatch):
  trainer = FakeTrainer(best_lr=3e-3)
  runs, section = main_with(tmp_path, monkeypatch, trainer, "--families",
                            "adamw", "--arms", "std", "bc", "--no-noise")
  assert all(r["monitor"]["noise_scale"] == 1 + r["seed"] for r in runs)
  setting = lq.Setting(steps=7)
  rows = {(m["family"], m["arm"]): m for m in lq.summarize_monitor(
      runs, setting)}
  assert list(rows) == [("adamw", "std"), ("adamw", "bc")]
  for arm, m in rows.items():   # seeds 0, 1, 2 at 3e-3
    assert m["n"] == 3 and m["win_rate"] is None
    np.testing.assert_allclose([m["noise_scale"], m["coupling"]],
                               [np.mean([1, 2, 3]), 10 * 3e-3])
  assert rows["adamw", "std"]["jensen"] is None
  assert rows["adamw", "bc"]["jensen"] == 0.5
  assert "| adamw | std | 0.003 | 3 | 2 | 0.03 | - | - |" in section
  assert "| adamw | bc | 0.003 | 3 | 2 | 0.03 | 0.5 | - |" in section
  # Records of older code (no monitor) leave it out of the means.
  for r in runs:
    if r["seed"] == 2:
      r["monitor"] = None
  m = lq.summarize_monitor(runs, setting)[0]
  assert m["n"] == 2 and m["noise_scale"] == 1.5
  for r in runs:
    del r["monitor"]
  assert lq.summarize_monitor(runs, setting) is None
  assert "Bias monitor" not in lq.report_markdown(
      runs, setting, lq.summarize(runs, setting), "q.png", "r.json")


def test_the_monitor_goes_from_summary_json_to_the_record(tmp_path):
  """Through the training subprocess (the fake train.py) and its file."""
  runner = functools.partial(lq.lm_runs.subprocess_runner,
                             module="benchmarks.tests.fake_train")
  results = tmp_path / "r.json"
  record = lq.run_cell(lq.Cell("adamw", "bc", 0.25, 1), SETTING, results,
                       tmp_path / "runs", runner)
  assert record["monitor"] == {"noise_scale": 2.0, "coupling": 2.5}
  assert lq.load_runs(results) == [record]


def test_parse_args_of_the_new_work():
  args = lq.parse_args(["--families", "soap", "adopt", "muon", "--protocol"])
  assert args.families == ["soap", "adopt", "muon"] and args.protocol
  assert args.setting == lq.Setting() and args.arms is None
  assert args.results == harness.RESULTS_DIR / "lm_quality.json"
  args = lq.parse_args(["--arms", "plain", "adaptive"])
  assert args.arms == ["plain", "adaptive"]
  with pytest.raises(SystemExit):
    lq.parse_args(["--families", "lion"])


# Sophia's rho and the longer runs -------------------------------------------

def test_sophia_rho_is_chosen_then_the_rate_then_seeds(tmp_path, monkeypatch):
  # The fake's best rho is 0.1 and its best rate doubles with rho.
  trainer = FakeTrainer(best_lr=1.5e-3, best_rho=0.1)
  runs, section = main_with(tmp_path, monkeypatch, trainer, "--sophia-rho")
  # Rates at the default rho (3 per arm); per arm rho 0.025, 0.1 and 0.2
  # (0.05 is the rate search's point), rates 7.5e-4, 3e-3, 6e-3 at rho 0.1
  # (1.5e-3 is the rho search's point), seeds 1 and 2 at (3e-3, 0.1).
  assert len(runs) == len(trainer.calls) == 6 + 2 * (3 + 3 + 2)
  assert len({lq.cell_of(r).name for r in runs}) == len(runs)
  val = lambda rho, lr=1.5e-3: (2 + math.log(lr / (1.5e-3 * rho / 0.05)) ** 2
                                + 2 * math.log(rho / 0.1) ** 2)
  setting = lq.Setting(steps=7)
  rho = lq.summarize_rho(runs, setting)
  for arm in lq.MAIN_ARMS:
    a = rho["arms"][arm]
    assert (a["lr"], a["rho"], a["lr_at_rho"]) == (1.5e-3, 0.1, 3e-3)
    assert a["hparams"] == (("rho", 0.1),)
    assert a["rho_settled"] and a["lr_settled"] and a["n"] == 3
    assert [p[0] for p in a["rho_grid"]] == [0.025, 0.05, 0.1, 0.2]
    np.testing.assert_allclose([p[1] for p in a["rho_grid"]], [
        val(x) + ARM_OFFSET[arm] for x in (0.025, 0.05, 0.1, 0.2)])
    np.testing.assert_allclose([p[2] for p in a["rho_grid"]],
                               [0.1, 0.2, 0.4, 0.8])   # the win rates
    assert [x for x, _ in a["lr_grid"]] == [7.5e-4, 1.5e-3, 3e-3, 6e-3]
  np.testing.assert_allclose(rho["tuned"]["diffs"], [-0.03] * 3, atol=1e-9)
  assert rho["default"]["n"] == 1       # no seeds at the default rho here
  seeded = [r for r in runs if r["seed"] > 0]
  assert all(r["hparams"] == {"rho": 0.1} and r["lr"] == 3e-3 for r in seeded)
  for r in seeded:
    cfg = train.parse_args(lq.lm_runs.argv_of(r["command"], "/x"))
    assert rho_of(cfg) == 0.1 and cfg.lr == 3e-3
    assert "_rho0.1_s" in lq.cell_of(r).name
  assert ("| std | 0.0015 | 0.025: {:.4f} (win rate 0.10), 0.05: {:.4f} (win "
          "rate 0.20), **0.1: {:.4f} (win rate 0.40)**, 0.2: {:.4f} (win rate"
          " 0.80) | 0.1 | 0.00075: {:.4f}, 0.0015: {:.4f}, **0.003: {:.4f}**, "
          "0.006: {:.4f} |").format(
              *(val(x) for x in (0.025, 0.05, 0.1, 0.2)),
              *(val(0.1, lr) for lr in (7.5e-4, 1.5e-3, 3e-3, 6e-3))
          ) in section
  assert ("| tuned rho | 0.003 / 0.003 | 0.1 / 0.1 | -0.0300 ± 0.0000 | 3/3 |"
          in section)
  assert "| default rho (main table) | 0.0015 / 0.0015 | 0.05 / 0.05 |" \
      in section
  assert "| sophia | std, rho 0.1 | 0.003 | 3 |" in section     # monitor
  # Resumed: nothing runs again.
  lq.run_sophia_rho(setting, 3, run_with(trainer, tmp_path / "r.json",
                                         tmp_path / "runs"))
  assert len(trainer.calls) == 22


def test_sophia_rho_at_the_default_reuses_the_rate_search(tmp_path):
  trainer = FakeTrainer(best_lr=1.5e-3, best_rho=0.05)
  results = tmp_path / "r.json"
  run = run_with(trainer, results, tmp_path / "runs")
  lq.run_family("sophia", SETTING, 3, run, noise=False, arms=lq.MAIN_ARMS)
  before = len(trainer.calls)
  lq.run_sophia_rho(SETTING, 3, run)
  # Only rho 0.025 and 0.1 per arm are new: the rate and seeds at the
  # default rho are the grid's records.
  assert len(trainer.calls) - before == 2 * 2
  rho = lq.summarize_rho(lq.load_runs(results), SETTING)
  assert all(a["rho"] == 0.05 and a["hparams"] == () and a["lr_at_rho"]
             == 1.5e-3 and a["n"] == 3 for a in rho["arms"].values())
  assert rho["tuned"] == rho["default"]


class Interrupted(Exception):
  pass


def test_long_runs_the_most_important_first_and_resume(tmp_path, monkeypatch):
  class Stopping(FakeTrainer):
    def __init__(self, after):
      super().__init__(best_lrs={"adopt": 1.5e-3})
      self.after = after

    def __call__(self, argv):
      if len(self.calls) == self.after:
        raise Interrupted
      return super().__call__(argv)

  monkeypatch.setattr(harness, "RESULTS_MD", tmp_path / "RESULTS.md")
  argv = ["--long", "--steps", "7", "--results", str(tmp_path / "long.json"),
          "--runs-dir", str(tmp_path / "runs")]
  first = Stopping(after=9)
  with pytest.raises(Interrupted):
    lq.main(argv, runner=first)
  rest = Stopping(after=math.inf)
  lq.main(argv, runner=rest)
  calls = first.calls + rest.calls
  names = [pathlib.Path(a[-1]).name for a in calls]
  # The searches start around the committed 200-step choices (AdamW std
  # 1.5e-3, bc 3e-3, ADOPT 1.5e-3); the stand-in's optimum, 3e-3, extends
  # std's once. Then 2 more seeds per arm, cf's 3 seeds.
  assert len(names) == len(set(names)) == 4 + 3 + 4 + 3 + 2 + 3
  lrs = [train.parse_args(a).lr for a in calls]
  assert lrs[:7] == [7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.5e-3, 3e-3, 6e-3]
  assert lrs[11:14] == [7.5e-4, 1.5e-3, 3e-3]
  order = [(n.split("_")[2], n.split("_")[-1]) for n in names]
  # std and bc searches (seed 0), their seeds, ADOPT's search and seeds,
  # then cf's seeds.
  assert order == [("std", "s0")] * 4 + [("bc", "s0")] * 3 + [
      (arm, f"s{s}") for s in (1, 2) for arm in ("std", "bc")] + [
          ("std", "s0")] * 3 + [("std", "s1"), ("std", "s2")] + [
              ("cf", f"s{s}") for s in range(3)]
  assert [n.split("_")[1] for n in names].count("adopt") == 5
  assert all(n.split("_")[1] == "adopt" for n in names[11:16])
  cfg = train.parse_args(first.calls[0])
  assert (cfg.steps, cfg.microbatches, cfg.microbatch_size, cfg.seq_len,
          cfg.eval_every, cfg.warmup, cfg.lr_floor) == (7, 16, 2, 128, 100, 20,
                                                        0.1)
  runs = lq.load_runs(tmp_path / "long.json")
  assert len(runs) == 19 and all(r["microbatches"] == 16 for r in runs)
  summary = lq.summarize(runs, dataclasses.replace(lq.LONG, steps=7))
  np.testing.assert_allclose(summary["adamw"]["diffs"]["cf"]["diffs"],
                             [ARM_OFFSET["cf"]] * 3, atol=1e-9)
  text = (tmp_path / "RESULTS.md").read_text()
  assert "<!-- lm_quality:begin -->" not in text
  section = text.split("<!-- lm_quality_long:begin -->")[1]
  assert section.startswith("\n" + lq.LONG_HEAD)
  assert "7 steps of M = 16 x 2 sequences" in section
  assert "Not run yet" not in section
  assert "Reproduce: `python -m benchmarks.lm_quality --long`" in section
  assert "| adopt | std | `adopt` | 0.0015 | 3 |" in section
  assert (tmp_path / "long.png").stat().st_size > 0
  assert (tmp_path / "long_curves.json").exists()


def test_parse_args_of_the_long_runs():
  args = lq.parse_args(["--long"])
  assert args.setting == lq.LONG == lq.Setting(
      steps=1000, microbatches=16, eval_every=100, checkpoint_every=100)
  cfg = train.parse_args(lq.Cell("adamw", "bc", 3e-3, 1).command(lq.LONG)
                         .split()[3:])   # resumable within a run
  assert (cfg.steps, cfg.checkpoint_every) == (1000, 100)
  assert args.results == harness.RESULTS_DIR / "lm_quality_long.json"
  assert args.png == harness.RESULTS_DIR / "lm_quality_long.png"
  assert args.runs_dir == harness.ROOT / "runs" / "lm_quality_long"
  assert lq.parse_args(["--long", "--preset", "small"]).setting == (
      dataclasses.replace(lq.LONG, preset="small"))
  for bad in (["--long", "--families", "adamw"], ["--long", "--protocol"],
              ["--long", "--quick"], ["--long", "--sophia-rho"]):
    with pytest.raises(SystemExit):
      lq.parse_args(bad)
