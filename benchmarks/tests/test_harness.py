"""benchmarks/harness.py against independent computations."""

import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import harness


def timed(wall, cpu):
  return types.SimpleNamespace(wall=list(wall), cpu=list(cpu))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_stats_against_statistics_module(n):
  rng = np.random.default_rng(n)
  wall, cpu = rng.exponential(1e-2, n), rng.exponential(1e-2, n)
  s = harness.stats(timed(wall, cpu))
  ms = [1e3 * x for x in wall]
  q1, _, q3 = (statistics.quantiles(ms, n=4, method="inclusive") if n > 1
               else (ms[0],) * 3)
  expected = {"median_ms": statistics.median(ms), "p25_ms": q1,
              "p75_ms": q3, "min_ms": min(ms),
              "cpu_median_ms": statistics.median([1e3 * x for x in cpu]),
              "cpu_min_ms": 1e3 * min(cpu)}
  assert s["rounds"] == n
  for k, v in expected.items():
    assert s[k] == pytest.approx(v, abs=1e-4), k


def test_stats_exact_quartiles():
  s = harness.stats(timed([5e-3, 1e-3, 4e-3, 2e-3, 3e-3], [1e-3] * 5))
  assert (s["min_ms"], s["p25_ms"], s["median_ms"], s["p75_ms"]) == (
      1, 2, 3, 4)


def test_ratios_against_direct_computation():
  a = timed([2.0, 4.0, 9.0], [1.0, 3.0, 3.0])
  b = timed([1.0, 1.0, 3.0], [1.0, 2.0, 1.0])
  r = harness.ratios(a, b)
  assert r == {"wall": 4.0, "cpu": 3.0, "min": 2.0,
               "wall_paired": 3.0, "cpu_paired": 1.5}


class Recorder:
  """A stand-in runner: logs its calls."""

  def __init__(self, name, log):
    self.name, self.log, self.wall = name, log, []

  def __call__(self, record=True):
    self.log.append((self.name, record))
    if record:
      self.wall.append(1e-3)


def test_round_robin_order_with_rotated_start():
  log = []
  runners = {n: Recorder(n, log) for n in "abc"}
  assert harness.time_rounds(runners, rounds=4, warmup=1) == 4
  assert log[:3] == [("a", False), ("b", False), ("c", False)]
  order = "".join(name for name, record in log[3:] if record)
  assert order == "abc" "bca" "cab" "abc"


def test_time_budget_keeps_min_rounds():
  log = []
  runners = {n: Recorder(n, log) for n in "ab"}
  assert harness.time_rounds(runners, rounds=50, max_seconds=0.0,
                             min_rounds=3, warmup=0) == 3
  assert [len(r.wall) for r in runners.values()] == [3, 3]


def test_runner_feeds_back_donated_state():
  state, x = jnp.arange(4.0), jnp.ones(4)
  seen = []
  r = harness.Runner(lambda s, x: (s.sum(), s + x), state, x,
                     prepare=lambda s: s * 2, check=seen.append)
  for record in (False, True, True):
    r(record=record)
  # s -> 2 s + 1, three times, from [0, 1, 2, 3]: 8 s + 7.
  np.testing.assert_array_equal(r.state, 8 * np.arange(4.0) + 7)
  assert [float(v) for v in seen] == [12.0, 32.0, 72.0]  # sums of 2 s
  assert len(r.wall) == len(r.cpu) == 2 and min(r.cpu) >= 0
  np.testing.assert_array_equal(state, np.arange(4.0))  # a copy was donated
  shared = harness.Runner(r.compiled, state, x)  # the same program
  shared()
  assert shared.compiled is r.compiled
  np.testing.assert_array_equal(shared.state, np.arange(4.0) + 1)


def test_memory_of_a_donating_program():
  compiled = jax.jit(lambda s, x: jnp.sin(s) * x, donate_argnums=0).lower(
      jnp.zeros(1000), jnp.zeros(1000)).compile()
  m = harness.memory(compiled)
  assert (m["argument"], m["output"], m["alias"]) == (8000, 4000, 4000)
  assert m["peak_bound"] == 8000 + 4000 - 4000 + m["temp"]


def test_nbytes_and_with_count():
  assert harness.nbytes({"a": jnp.zeros((3, 4)), "b": jnp.zeros(5, jnp.int8),
                         "c": optax.EmptyState()}) == 53
  tx = optax.chain(optax.clip(1.0), optax.scale_by_adam(),
                   optax.scale_by_schedule(lambda c: c))
  state = harness.with_count(tx.init({"w": jnp.zeros(2)}), 7)
  counts = [s.count for s in state if "count" in getattr(s, "_fields", ())]
  assert len(counts) == 2 and all(int(c) == 7 for c in counts)
  assert all(c.dtype == jnp.int32 for c in counts)
  only = harness.with_count(tx.init({"w": jnp.zeros(2)}), 5,
                            of=optax.ScaleByAdamState)
  assert [int(s.count) for s in only
          if "count" in getattr(s, "_fields", ())] == [5, 0]


def test_runner_of_a_jitted_step_returning_state_first():
  step = jax.jit(lambda s, x: (s + x, s.sum()), donate_argnums=0)
  state = jnp.arange(3.0)
  r = harness.Runner(step, state, jnp.ones(3), state_first=True)
  assert r.compile_s > 0 and isinstance(r.compiled, jax.stages.Compiled)
  assert float(r()) == 3.0 and float(r()) == 6.0
  np.testing.assert_array_equal(r.state, np.arange(3.0) + 2)
  np.testing.assert_array_equal(state, np.arange(3.0))  # a copy was donated


def test_runner_that_reads_its_state():
  probe = jax.jit(lambda s, x: (s * x).sum())
  state = jnp.arange(3.0)
  r = harness.Runner(probe, state, jnp.full(3, 2.0), reads_state=True)
  assert float(r()) == 6.0 and float(r()) == 6.0   # the state is kept
  assert r.state is state and len(r.wall) == 2


def test_write_json_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "r.json"
  harness.write_json(path, {"a": [1, 2.5]})
  assert json.loads(path.read_text()) == {"a": [1, 2.5]}
  with pytest.raises(TypeError):
    harness.write_json(path, {"a": object()})
  def fail(*args):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    harness.write_json(path, {"b": 1})
  assert json.loads(path.read_text()) == {"a": [1, 2.5]}
  assert os.listdir(path.parent) == ["r.json"]


DOC = ("# Results\n\nintro\n\n<!-- other:begin -->\nkeep me\n"
       "<!-- other:end -->\n\n<!-- x:begin -->\nold\nlines\n<!-- x:end -->\n"
       "\ntail\n")


def test_replace_section_present_absent():
  out = harness.replace_section(DOC, "x", "new\n")
  assert out == DOC.replace("old\nlines", "new")
  out = harness.replace_section(DOC, "y", "why")
  assert out == DOC + "\n<!-- y:begin -->\nwhy\n<!-- y:end -->\n"


@pytest.mark.parametrize("text", [
    "a <!-- x:begin --> b",
    "a <!-- x:end --> b",
    "<!-- x:end --> <!-- x:begin -->",
    "<!-- x:begin --> <!-- x:end --> <!-- x:begin --> <!-- x:end -->",
])
def test_replace_section_unbalanced(text):
  with pytest.raises(ValueError, match="unbalanced"):
    harness.replace_section(text, "x", "body")


def test_write_section_rereads_the_file(tmp_path):
  path = tmp_path / "RESULTS.md"
  harness.write_section("x", "first", path)
  assert path.read_text().startswith(harness.RESULTS_HEADER)
  path.write_text(path.read_text() + "\nadded by another script\n")
  harness.write_section("x", "second", path)
  text = path.read_text()
  assert "second" in text and "first" not in text
  assert text.endswith("added by another script\n")


@pytest.mark.parametrize("argv", [
    [], ["--quick"], ["--ref", "HEAD~1", "--sizes", "2M", "16M"],
    ["--note", "it's a \"test\"", "", "{out}", "a b;c"],
])
def test_command_round_trip(argv, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["prog", *argv])
  assert harness.command("m") == harness.command("m", argv)
  assert harness.command("m", ["--out", "{out}", "{x}"], verbatim=(
      "{out}",)) == "python -m m --out {out} '{x}'"
  cmd = harness.command("benchmarks.update_cost", argv)
  assert shlex.split(cmd) == ["python", "-m", "benchmarks.update_cost",
                              *argv]
  assert harness.command_argv(cmd, "benchmarks.update_cost") == argv
  with pytest.raises(ValueError):
    harness.command_argv(cmd, "examples.lm.train")


def test_parser():
  p = harness.parser("benchmarks.x", "First paragraph\nof two lines.\n\nMore.")
  assert p.prog == "python -m benchmarks.x"
  assert p.description == "First paragraph\nof two lines."


def test_table():
  assert harness.table(["a", "b"], [[1, "x"], [2.5, None]]) == (
      "| a | b |\n| --- | --- |\n| 1 | x |\n| 2.5 | None |")


def test_git_state_lists_modified_tracked_files(tmp_path):
  def git(*a):
    subprocess.run(["git", "-C", str(tmp_path), *a], check=True,
                   capture_output=True)
  git("init", "-q")
  for name in ("bcopt/a.py", "examples/b.py", "docs/c.md"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("x\n")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
  for name in ("bcopt/a.py", "docs/c.md", "bcopt/new.py"):
    (tmp_path / name).write_text("y\n")
  state = harness.git_state(tmp_path)
  head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                        capture_output=True, text=True).stdout.strip()
  assert state == {"commit": head, "modified": ["bcopt/a.py"]}


def test_environment_and_finish():
  env = harness.finish(harness.environment())
  assert env["jax"] == jax.__version__ and env["optax"] == optax.__version__
  assert env["backend"] == jax.default_backend()
  assert env["cpus_usable"] == len(os.sched_getaffinity(0))
  assert len(env["loadavg_start"]) == len(env["loadavg_end"]) == 3
  assert env["wall_s"] >= 0 and env["process_cpu_s"] > 0
  assert env["git"]["commit"] == subprocess.run(
      ["git", "-C", str(harness.ROOT), "rev-parse", "HEAD"],
      capture_output=True, text=True).stdout.strip()
  json.dumps(env)
  assert pathlib.Path(harness.RESULTS_DIR).parent.name == "benchmarks"
