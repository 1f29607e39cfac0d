"""benchmarks/update_cost.py: options, a one-round smoke run per family with
``--ref HEAD``, and the records of the scripts it replaced."""

import json
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness
from benchmarks import update_cost as uc

STATS = {"rounds", "median_ms", "p25_ms", "p75_ms", "min_ms",
         "cpu_median_ms", "cpu_min_ms"}


def test_parse_args_defaults_and_quick():
  args = uc.parse_args([])
  assert args.family == ["adam", "sophia", "shampoo", "soap"]
  assert args.sizes == ["2M", "16M"]
  assert args.dims == {"shampoo": [256, 1024], "soap": [1024]}
  assert args.microbatches == {"adam": [2, 8, 32], "sophia": [8],
                               "shampoo": [4, 16], "soap": [8]}
  assert args.out.endswith("results/update_cost.json")
  q = uc.parse_args(["--quick", "--family", "shampoo", "--microbatches", "2"])
  assert q.microbatches == {"shampoo": [2]}
  assert q.dims == {"shampoo": [128], "soap": [128]}
  assert q.out.endswith("update_cost_quick.json")
  assert uc.parse_args(["--ref", "HEAD"]).out.endswith("update_cost_ref.json")
  with pytest.raises(SystemExit):
    uc.parse_args(["--family", "muon"])


def test_fingerprint_is_bitwise():
  x = jnp.arange(3.0)
  assert uc.fingerprint({"a": x}) == uc.fingerprint({"a": jnp.arange(3.0)})
  assert uc.fingerprint({"a": x}) != uc.fingerprint(
      {"a": x.at[1].set(np.nextafter(np.float32(1), np.float32(2)))})
  assert uc.fingerprint({"a": x}) != uc.fingerprint({"b": x})


@pytest.fixture(scope="module")
def results_md_before():
  return harness.RESULTS_MD.read_text()


@pytest.mark.parametrize("family,variants", [
    ("adam", "loo + jackknife"), ("sophia", "loo + jackknife"),
    ("shampoo", "twofold"), ("soap", "SOAP")])
def test_smoke_run_with_ref_head(family, variants, tmp_path,
                                 results_md_before):
  argv = ["--quick", "--family", family, "--sizes", "tiny", "--dims", "16",
          "--microbatches", "4", "--reps", "1", "--warmup", "0",
          "--variants", variants, "--ref", "HEAD",
          "--out", str(tmp_path / "r.json")]
  uc.main(argv)
  r = json.loads((tmp_path / "r.json").read_text())
  assert harness.command_argv(r["command"], uc.MODULE) == argv
  head = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"],
                        capture_output=True, text=True).stdout.strip()
  assert r["ref"] == {"requested": "HEAD", "commit": head}
  assert r["environment"]["git"]["commit"] == head
  assert list(r["families"]) == [family]
  (cell,) = r["families"][family]
  assert cell["M"] == 4 and cell["rounds"] == 1 and not cell["skipped"]
  v = cell["variants"]
  twins = [n for n in v if n + uc.REF in v]
  for name, x in v.items():
    assert STATS <= set(x) and x["rounds"] == 1, name
    m = x["memory"]
    assert m["peak_bound"] == (m["argument"] + m["output"] - m["alias"]
                               + m["temp"])
    for base, ratios in x["vs"].items():
      other = v[name + uc.REF] if base == "ref" else v[
          {"a": uc.A, "b": uc.B, "adam": uc.ADAM_MEAN}[base]]
      assert ratios["wall"] == pytest.approx(
          x["median_ms"] / other["median_ms"], rel=1e-3, abs=1e-4)
  assert all(v[n]["bitwise_equal_ref"] for n in twins)
  assert "bitwise equal" in r["markdown"]
  if family == "adam":  # and the monitored variant, without a twin
    assert {uc.B, uc.ADAM_LOO, uc.CLIP_BC} == set(twins)
    monitored = uc.ADAM_LOO + uc.MONITOR
    assert set(v) == {uc.A, monitored, *twins, *(n + uc.REF for n in twins)}
    assert cell["diagnostics_vs_plain"][uc.ADAM_LOO]["wall"] == pytest.approx(
        v[monitored]["median_ms"] / v[uc.ADAM_LOO]["median_ms"], rel=1e-3)
    assert v[uc.ADAM_LOO]["state_bytes"] == v[uc.B]["state_bytes"]
    assert v[uc.B]["vs"]["b"]["wall"] == 1.0
  if family == "sophia":
    assert len(twins) == 4 and len(v) == 9
    k = uc.REFRESH_EVERY
    for name, got in cell[f"amortized_every_{k}"].items():
      ms = (v[name + uc.REFRESH]["median_ms"]
            + (k - 1) * v[name + uc.CACHED]["median_ms"]) / k
      assert got["median_ms_vs_b"] == pytest.approx(
          ms / v[uc.B]["median_ms"], rel=1e-3)
  if family == "shampoo":
    corrected = ("twofold + jackknife K=4", "twofold + jackknife exact")
    assert set(twins) == {f"{name}, {kind}" for kind in uc.STEPS
                          for name in ("twofold", *corrected)}
    s = cell["summary"]["median_ms"]
    assert not any(k.startswith("correction_overhead standard") for k in s)
    for name in corrected:
      assert s[f"correction_overhead {name}"] == pytest.approx(
          v[f"{name}, root"]["median_ms"]
          / v["twofold, root"]["median_ms"] - 1, abs=1e-3)
    mem = cell["memory_step_only"]
    for name in ("twofold", *corrected):  # one branch each
      assert mem[f"{name}, non-root"]["temp"] < mem[f"{name}, root"]["temp"]
      assert mem[f"{name}, root"]["temp"] <= v[f"{name}, root"]["memory"][
          "temp"]
  if family == "soap":  # SOAP and the three SOAP-BC variants
    assert set(twins) == {f"{name}, {kind}" for kind in uc.SOAP_STEPS
                          for name in uc.SOAP}
    s = cell["summary"]["median_ms"]
    assert s["SOAP-BC loo + jackknife, refresh / SOAP"] == pytest.approx(
        v["SOAP-BC loo + jackknife, refresh"]["median_ms"]
        / v["SOAP, refresh"]["median_ms"], rel=1e-3)
    assert s["SOAP-BC loo + jackknife: predicted / SOAP"] == pytest.approx(
        1 + 4 * v[uc.PROJECTION]["median_ms"]
        / v["SOAP, no refresh"]["median_ms"], rel=1e-3)  # M = 4 rotations
  assert harness.RESULTS_MD.read_text() == results_md_before  # --quick


@pytest.mark.parametrize("name", [
    "optimizer_overhead", "optimizer_overhead_quick", "sophia_cost",
    "sophia_cost_quick", "shampoo_cost", "shampoo_cost_quick", "update_ab"])
def test_replaced_records_name_their_commit_and_new_command(name):
  r = json.loads((harness.RESULTS_DIR / f"{name}.json").read_text())
  rep = r["replaced"]
  old = rep["script"]
  assert r["command"].split()[1] == old
  # The script exists at that commit, and is gone now.
  subprocess.run(["git", "-C", str(harness.ROOT), "cat-file", "-e",
                  f"{rep['command_reproduces_at_commit']}:{old}"], check=True)
  assert not (harness.ROOT / old).exists()
  uc.parse_args(harness.command_argv(rep["equivalent_command"], uc.MODULE))
