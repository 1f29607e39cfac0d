"""benchmarks/step_time.py: options, a one-round smoke run on a tiny model,
and the records of the script it replaced."""

import json
import subprocess

import pytest

from benchmarks import harness
from benchmarks import step_time as st

TINY = ["--model", "num_layers=1", "--model", "d_model=16", "--model",
        "d_ff=32", "--model", "num_heads=2", "--model", "num_kv_heads=1",
        "--microbatches", "4", "--microbatch-size", "1", "--seq-len", "8"]


def test_parse_args():
  args = st.parse_args([])
  assert args.presets == ["tiny", "small"] and args.rounds == 15
  assert args.out.endswith("results/step_time.json")
  q = st.parse_args(["--quick"])
  assert (q.presets, q.rounds) == (["tiny"], 3)
  assert q.out.endswith("results/step_time_quick.json")
  assert st.parse_args(["--quick", "--rounds", "1"]).rounds == 1
  with pytest.raises(SystemExit):
    st.parse_args(["--families", "lion"])
  with pytest.raises(ValueError):      # the example's own check
    st.parse_args(["--model", "num_heads=3"])


def test_smoke_run(tmp_path):
  before = harness.RESULTS_MD.read_text()
  argv = ["--quick", *TINY, "--families", "adamw", "--rounds",
          "1", "--warmup", "0", "--fast-compile", "--out",
          str(tmp_path / "r.json")]
  st.main(argv)
  r = json.loads((tmp_path / "r.json").read_text())
  assert harness.command_argv(r["command"], st.MODULE) == argv
  assert r["environment"]["git"] == harness.git_state()
  res = r["presets"]["tiny"]
  steps = res["steps"]
  assert list(steps) == [
      "adamw/std", "adamw/std/monitor", "adamw/bc", "adamw/bc/monitor",
      "plain", "estimator/gradients", "estimator/gnb_diag",
      "estimator/hutchinson_diag"]
  for name, s in steps.items():
    assert s["rounds"] == 1, name
    m = s["memory"]
    assert m["peak_bound"] == (m["argument"] + m["output"] - m["alias"]
                               + m["temp"])
  assert steps["adamw/bc"]["opt_state_bytes"] == steps["plain"][
      "opt_state_bytes"]
  ratios = res["ratios"]
  assert ratios["adamw/bc"]["vs_std"]["wall"] == pytest.approx(
      steps["adamw/bc"]["median_ms"] / steps["adamw/std"]["median_ms"],
      rel=1e-3)
  assert ratios["adamw/bc"]["temp_minus_std"] == (
      steps["adamw/bc"]["memory"]["temp"] - steps["adamw/std"]["memory"]["temp"])
  for arm in ("std", "bc"):   # the monitor in steps of the arm
    assert ratios[f"adamw/{arm}/monitor"]["vs_step"]["wall"] == (
        pytest.approx(steps[f"adamw/{arm}/monitor"]["median_ms"]
                      / steps[f"adamw/{arm}"]["median_ms"], rel=1e-3))
  assert ratios["estimator/gnb_diag"]["vs_gradients"]["cpu"] == pytest.approx(
      steps["estimator/gnb_diag"]["cpu_median_ms"]
      / steps["estimator/gradients"]["cpu_median_ms"], rel=1e-3)
  assert ratios["adamw/std"]["vs_plain"]["wall"] == pytest.approx(
      steps["adamw/std"]["median_ms"] / steps["plain"]["median_ms"], rel=1e-3)
  assert set(res["targets"]) == {"adamw/bc"}   # sophia not timed
  assert res["params"] == steps["adamw/std"]["params"]
  assert res["microbatch_gradients_bytes"] == 4 * 4 * res["params"]
  assert "| estimator/hutchinson_diag |" in res["markdown"]
  assert harness.RESULTS_MD.read_text() == before   # --quick


@pytest.mark.parametrize("name", ["step_time", "step_time_quick"])
def test_the_old_records_name_their_commit_and_new_command(name):
  r = json.loads((harness.RESULTS_DIR / f"{name}.json").read_text())
  rep = r["replaced"]
  assert r["command"].startswith("python benchmarks/step_time.py")
  subprocess.run(["git", "-C", str(harness.ROOT), "cat-file", "-e",
                  f"{rep['command_reproduces_at_commit']}:{rep['script']}"],
                 check=True)
  st.parse_args(harness.command_argv(rep["equivalent_command"], st.MODULE))
