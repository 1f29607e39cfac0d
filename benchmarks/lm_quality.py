r"""Does bias correction pay? A fairly tuned, seeded comparison on the LM example.

Every run is ``examples/lm/train.py`` with the same model, data, steps and
examples per step; only the optimizer arm, the learning rate and the seed
change. For each family (``adamw``, ``sophia``, ``shampoo``):

* main arms ``std`` (``--optimizer FAMILY``: no cross-fit, no correction) and
  ``bc`` (``--optimizer FAMILY_bc``: the family's SPEC defaults). Each gets
  its own learning rate, chosen on the **validation** plays with seed 0 from
  a grid of factor-2 steps; if the best value sits on an edge of the grid
  the grid is extended past it (up to ``MAX_EXTEND`` times) so the chosen
  rate is bracketed. Then seeds ``1 .. SEEDS-1`` at the chosen rate. The
  comparison is on the **test** plays, paired by seed (a seed fixes the
  initialisation and the batch order, the same for every arm);
* ablation arms at the ``bc`` arm's learning rate, same seeds: ``cf``
  (cross-fit only), ``inv`` (inverse correction only) and ``paper`` (the
  reference code's variant: AdamW LOO, Sophia and Shampoo twofold, each with
  the ``"paper"`` variance estimator);
* for AdamW, the mixed-quality row: ``std`` vs ``bc`` with ``--noise 0.2`` at
  the learning rates chosen on clean data.

Results: ``benchmarks/results/lm_quality.json`` = ``{"runs": [...]}``, one
record per run, written after every run; cells already there are skipped, so
an interrupted grid continues where it stopped. A record's ``command``
reproduces the run with its output folder as ``{out}``. The per-step
training loss and the validation curve of every run go to
``lm_quality_curves.json`` next to it. The report (the part of
``benchmarks/RESULTS.md`` between the ``lm_quality`` markers, and
``benchmarks/results/lm_quality.png``) is regenerated from whatever runs
exist.

Usage::

  python benchmarks/lm_quality.py --quick          # adamw vs adamw_bc, seed 0, at
                                                   # the rates the grid chose
                                                   # (runs/lm_quality_quick.*)
  python benchmarks/lm_quality.py                  # the whole grid (hours on CPU)
  python benchmarks/lm_quality.py --families adamw # one family
  python benchmarks/lm_quality.py --report-only    # RESULTS.md + PNG from the JSON
  python benchmarks/lm_quality.py --verify 6       # re-run 6 records' commands,
                                                   # compare their losses

On an accelerator, keep everything and pass e.g. ``--preset small --devices
N`` (and more ``--steps``); the records then carry those settings and only
cells with the same settings are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- lm_quality:begin -->", "<!-- lm_quality:end -->"

FAMILIES = ("adamw", "sophia", "shampoo")
MAIN_ARMS = ("std", "bc")
ABLATIONS = ("cf", "inv", "paper")
# The paper's held-out deltas, bc - std in nats (SPEC section 7).
PAPER_DELTA = {"adamw": -0.1489, "sophia": -0.0701, "shampoo": -0.1103,
               "adamw-noise": -0.0191}
# Starting learning-rate grids (factor 2 apart), extended past an edge if
# the best value lands there.
LR_GRID = {"adamw": (1.5e-3, 3e-3, 6e-3),
           "sophia": (7.5e-4, 1.5e-3, 3e-3),
           "shampoo": (1.5e-3, 3e-3, 6e-3)}
MAX_EXTEND = 2
NOISE = 0.2
LIGHT_LOAD = 4.0    # report: runs started below this 1-minute load average
QUICK_LR = 3e-3     # --quick, before the full grid has chosen: both arms
REPRODUCE_TOLERANCE = 0.02  # a record's command must give its losses to this


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every run of the grid shares (all passed explicitly to train.py)."""

  preset: str = "tiny"
  steps: int = 200
  microbatches: int = 8
  microbatch_size: int = 2
  seq_len: int = 128
  warmup: int = 20
  eval_every: int = 50
  eval_batches: int = 8
  devices: int = 1

  def flags(self) -> list[str]:
    return ["--preset", self.preset, "--steps", str(self.steps),
            "--microbatches", str(self.microbatches),
            "--microbatch-size", str(self.microbatch_size),
            "--seq-len", str(self.seq_len), "--warmup", str(self.warmup),
            "--schedule", "cosine", "--lr-floor", "0.1",
            "--eval-every", str(self.eval_every),
            "--eval-batches", str(self.eval_batches),
            "--devices", str(self.devices),
            "--checkpoint-every", "0", "--progress", "off"]

  def matches(self, record: dict) -> bool:
    return all(record.get(k) == getattr(self, k) for k in
               ("preset", "steps", "microbatches", "microbatch_size",
                "seq_len"))


def arm_flags(family: str, arm: str) -> list[str]:
  """train.py flags selecting the optimizer of ``family`` x ``arm``."""
  if family not in FAMILIES:
    raise ValueError(f"family {family!r} not in {FAMILIES}")
  if arm == "std":
    return ["--optimizer", family]
  flags = ["--optimizer", f"{family}_bc"]
  if arm == "bc":
    return flags
  if arm == "cf":
    return flags + ["--inverse-correction", "none"]
  if arm == "inv":
    return flags + ["--cross-fit", "none"]
  if arm == "paper":
    scheme = "loo" if family == "adamw" else "twofold"
    return flags + ["--cross-fit", scheme, "--inverse-correction", "paper"]
  raise ValueError(f"arm {arm!r} not in {MAIN_ARMS + ABLATIONS}")


def git_state() -> dict:
  """HEAD and the tracked files under bcopt/ and examples/ that differ from it
  (other sessions may edit the checkout while a benchmark runs)."""
  import subprocess
  def git(*a):
    try:
      return subprocess.run(["git", *a], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None
  dirty = git("status", "--porcelain", "--untracked-files=no", "--",
              "bcopt", "examples")
  return {"commit": git("rev-parse", "HEAD"),
          "modified": [line.split(maxsplit=1)[1]
                       for line in (dirty or "").splitlines()]}


def data_name(noise: float) -> str:
  return "shakespeare" if noise == 0 else f"shakespeare-noise{noise:g}"


def round_lr(lr: float) -> float:
  return float(f"{lr:.4g}")


@dataclasses.dataclass(frozen=True)
class Cell:
  family: str
  variant: str
  lr: float
  seed: int
  noise: float = 0.0

  @property
  def data(self) -> str:
    return data_name(self.noise)

  @property
  def name(self) -> str:
    return (f"{self.data}_{self.family}_{self.variant}_lr{self.lr:g}"
            f"_s{self.seed}")

  def command(self, setting: Setting) -> str:
    """The train.py command of this run, its output folder as ``{out}``."""
    argv = (arm_flags(self.family, self.variant)
            + ["--lr", f"{self.lr:g}", "--seed", str(self.seed)]
            + (["--noise", f"{self.noise:g}"] if self.noise else [])
            + setting.flags() + ["--out", "{out}"])
    return "python -m examples.lm.train " + " ".join(
        a if a == "{out}" else shlex.quote(a) for a in argv)

  def matches(self, record: dict, setting: Setting) -> bool:
    return (setting.matches(record) and record["data"] == self.data
            and record["family"] == self.family
            and record["variant"] == self.variant
            and math.isclose(record["lr"], self.lr, rel_tol=1e-6)
            and record["seed"] == self.seed)


def command_argv(command: str, out: str) -> list[str]:
  """The train.py argv of a record's command, with ``{out}`` filled in."""
  words = shlex.split(command)
  prefix = ["python", "-m", "examples.lm.train"]
  if words[:3] != prefix:
    raise ValueError(f"not a train.py command: {command!r}")
  return [out if w == "{out}" else w for w in words[3:]]


# ----------------------------------------------------------------------------
# Results files




def write_json(path: pathlib.Path, obj) -> None:
  """Atomic write (a crash never leaves a truncated results file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  os.replace(tmp, path)


def load_file(path: pathlib.Path) -> dict:
  """The whole results file (``runs``, and ``superseded`` if any)."""
  return json.loads(path.read_text()) if path.exists() else {"runs": []}


def load_runs(path: pathlib.Path) -> list[dict]:
  return load_file(path)["runs"]


def append_run(path: pathlib.Path, record: dict) -> None:
  data = load_file(path)     # re-read: never drop what is on disk
  data["runs"].append(record)
  write_json(path, data)


def supersede(path: pathlib.Path, record: dict, reason: str) -> None:
  """Moves ``record`` from the file's ``runs`` to its ``superseded`` list
  (kept, with ``reason``, but no longer read by the grid or the report)."""
  data = load_file(path)
  data["runs"] = [r for r in data["runs"] if r != record]
  data.setdefault("superseded", []).append({**record, "superseded": reason})
  write_json(path, data)


def find(runs: list[dict], cell: Cell, setting: Setting) -> dict | None:
  for r in runs:
    if cell.matches(r, setting):
      return r
  return None


def curves_path(results: pathlib.Path) -> pathlib.Path:
  return results.with_name(results.stem + "_curves.json")


# ----------------------------------------------------------------------------
# Running cells


def run_cell(cell: Cell, setting: Setting, results: pathlib.Path,
             runs_dir: pathlib.Path, runner=None, code: dict | None = None
             ) -> dict:
  """Runs one cell unless the results file has it; returns its record.

  ``runner(argv) -> summary dict`` defaults to ``train.main`` in this process
  (programs compiled for one seed are reused for the next). ``code`` (the
  git state of the code the runner imported) goes into the record.
  """
  existing = find(load_runs(results), cell, setting)
  if existing is not None:
    return existing
  if runner is None:
    from examples.lm import train
    runner = train.main
  out = runs_dir / cell.name
  if out.exists():          # a run interrupted before its record was written
    shutil.rmtree(out)
  command = cell.command(setting)
  load = os.getloadavg()
  cpu0, wall0 = time.process_time(), time.time()
  print(f"[lm_quality] {cell.name} (load {load[0]:.1f})", flush=True)
  status = "ok"
  try:
    summary = runner(command_argv(command, str(out)))
  except FloatingPointError as e:     # diverged: the worst possible outcome
    print(f"[lm_quality] {cell.name} diverged: {e}", flush=True)
    summary, status = None, "diverged"
  record = {
      "data": cell.data, "family": cell.family, "variant": cell.variant,
      "lr": cell.lr, "seed": cell.seed,
      "final_val_loss": summary["final_val_loss"] if summary else None,
      "final_eval_loss": summary["final_eval_loss"] if summary else None,
      "steps": setting.steps, "microbatches": setting.microbatches,
      "microbatch_size": setting.microbatch_size, "seq_len": setting.seq_len,
      "tokens": (summary["tokens"] if summary else setting.steps
                 * setting.microbatches * setting.microbatch_size
                 * setting.seq_len),
      "wall_s": summary["wall_s"] if summary else None,
      "command": command,
      # Extra context: status, preset, whole-call wall and process CPU time
      # (compilation included), load average when the run started.
      "status": status, "preset": setting.preset, "devices": setting.devices,
      "call_wall_s": round(time.time() - wall0, 1),
      "cpu_s": round(time.process_time() - cpu0, 1),
      "loadavg_1m": round(load[0], 2),
      **({"code": code} if code is not None else {}),
  }
  save_curve(curves_path(results), cell.name, out / "metrics.jsonl")
  append_run(results, record)
  if summary:
    print(f"[lm_quality] {cell.name}: val {record['final_val_loss']:.4f} "
          f"test {record['final_eval_loss']:.4f} "
          f"({record['call_wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU)",
          flush=True)
  return record


def cell_of(record: dict) -> Cell:
  """The grid cell a record was made for."""
  noise = 0.0 if record["data"] == data_name(0.0) else NOISE
  if record["data"] != data_name(noise):
    raise ValueError(f"unknown data {record['data']!r}")
  return Cell(record["family"], record["variant"], record["lr"],
              record["seed"], noise)


def rerun_unversioned(results: pathlib.Path, setting: Setting,
                      families, run) -> int:
  """Re-runs, with the current code, every record of ``families`` (and of
  this setting) that has no ``code`` field (made before records said which
  code made them); the old record moves to ``superseded``. Returns the
  number re-run. ``run(cell) -> record`` as in :func:`run_family`."""
  stale = [r for r in load_runs(results)
           if "code" not in r and r["family"] in families
           and setting.matches(r)]
  for r in stale:
    supersede(results, r, "made by code of unknown version; re-run")
    run(cell_of(r))
  return len(stale)


def verify(results: pathlib.Path, runs_dir: pathlib.Path, count: int,
           runner=None, tolerance: float = REPRODUCE_TOLERANCE) -> dict:
  """Re-runs ``count`` recorded runs from their ``command``; compares losses.

  The runs are spread evenly over the results file (its oldest and newest
  records included), so the check covers records made by older code too.
  Returns ``{"tolerance", "checks": [...], "max_abs_diff", "ok"}``, each
  check with the record's cell, its recorded and re-run test and
  validation losses and their differences (re-run - recorded).
  """
  if runner is None:
    from examples.lm import train
    runner = train.main
  runs = [r for r in load_runs(results) if r.get("status", "ok") == "ok"]
  if not runs:
    raise ValueError(f"{results} has no finished runs to verify")
  picks = sorted({int(round(i)) for i in
                  np.linspace(0, len(runs) - 1, min(count, len(runs)))})
  checks = []
  for i in picks:
    r = runs[i]
    name = cell_of(r).name
    out = runs_dir / "verify" / name
    if out.exists():
      shutil.rmtree(out)
    print(f"[lm_quality] verify {name}: {r['command']}", flush=True)
    summary = runner(command_argv(r["command"], str(out)))
    check = {k: r[k] for k in ("data", "family", "variant", "lr", "seed",
                               "command")}
    for key in ("final_eval_loss", "final_val_loss"):
      check[key] = {"recorded": r[key], "rerun": summary[key],
                    "diff": summary[key] - r[key]}
    check["code"] = r.get("code")
    checks.append(check)
    print(f"[lm_quality] verify {name}: test {r['final_eval_loss']:.4f} -> "
          f"{summary['final_eval_loss']:.4f} "
          f"({check['final_eval_loss']['diff']:+.4f})", flush=True)
  worst = max(abs(c[k]["diff"]) for c in checks
              for k in ("final_eval_loss", "final_val_loss"))
  return {"tolerance": tolerance, "checks": checks, "max_abs_diff": worst,
          "ok": worst <= tolerance}


def save_curve(path: pathlib.Path, name: str, metrics: pathlib.Path) -> None:
  if not metrics.exists():
    return
  records = [json.loads(line) for line in metrics.read_text().splitlines()
             if line.strip()]
  curve = {"step": [r["step"] for r in records],
           "train_loss": [round(r["train_loss"], 4) for r in records],
           "val": [[r["step"], round(r["val_loss"], 5)] for r in records
                   if "val_loss" in r]}
  curves = json.loads(path.read_text()) if path.exists() else {}
  curves[name] = curve
  write_json(path, curves)


def val_loss(record: dict | None) -> float:
  """Selection score: diverged or missing runs score +inf."""
  if record is None or record.get("final_val_loss") is None:
    return math.inf
  return record["final_val_loss"]


def choose_lr(family: str, arm: str, setting: Setting, run) -> tuple:
  """Seed-0 search; ``run(cell) -> record``. Returns (best lr, tried lrs).

  Starts from ``LR_GRID[family]`` and extends by factors of 2 past an edge
  holding the best validation loss, at most ``MAX_EXTEND`` times.
  """
  grid = sorted(round_lr(x) for x in LR_GRID[family])
  scores = {}
  for _ in range(MAX_EXTEND + 1):
    for lr in grid:
      if lr not in scores:
        scores[lr] = val_loss(run(Cell(family, arm, lr, 0)))
    best = min(grid, key=lambda lr: scores[lr])
    if best == grid[0] or not math.isfinite(scores[best]):  # all diverged: go lower
      grid.insert(0, round_lr(grid[0] / 2))
    elif best == grid[-1]:
      grid.append(round_lr(grid[-1] * 2))
    else:
      return best, grid
  best = min(scores, key=scores.get)
  return best, sorted(scores)


def selected_lrs(runs: list[dict], setting: Setting, family: str) -> dict:
  """{arm: lr} chosen from the seed-0 clean runs of the results file.

  The same rule as ``choose_lr`` applied to what has been run.
  """
  chosen = {}
  for arm in MAIN_ARMS:
    scores = {r["lr"]: val_loss(r) for r in runs
              if setting.matches(r) and r["data"] == "shakespeare"
              and r["family"] == family and r["variant"] == arm
              and r["seed"] == 0}
    if scores:
      chosen[arm] = min(scores, key=scores.get)
  return chosen


def quick_lrs(results: pathlib.Path, setting: Setting) -> dict:
  """--quick's rates: each arm's choice in the full grid's results (same
  settings), else ``QUICK_LR``: a fair quick comparison needs tuned rates."""
  chosen = selected_lrs(load_runs(results), setting, "adamw")
  return {arm: chosen.get(arm, QUICK_LR) for arm in MAIN_ARMS}


def run_family(family: str, setting: Setting, seeds: int, run,
               noise: bool, arms: tuple[str, ...] = MAIN_ARMS + ABLATIONS
               ) -> None:
  """The learning-rate search of both main arms, then seeds ``0 .. seeds-1``
  of every arm in ``arms`` (and of the noisy main arms if ``noise``).

  ``arms`` only narrows the seeded cells (for example more seeds for a few
  arms); the search always runs, since every arm's rate comes from it.
  """
  lrs = {arm: choose_lr(family, arm, setting, run)[0] for arm in MAIN_ARMS}
  print(f"[lm_quality] {family}: chosen learning rates {lrs}", flush=True)
  main_arms = [arm for arm in MAIN_ARMS if arm in arms]
  for seed in range(seeds):
    for arm in main_arms:
      run(Cell(family, arm, lrs[arm], seed))
  for arm in ABLATIONS:
    if arm in arms:
      for seed in range(seeds):
        run(Cell(family, arm, lrs["bc"], seed))
  if noise:
    for seed in range(seeds):
      for arm in main_arms:
        run(Cell(family, arm, lrs[arm], seed, NOISE))


# ----------------------------------------------------------------------------
# Statistics and the report


def paired(a: dict, b: dict) -> dict | None:
  """Paired difference a - b over common seeds ({seed: loss} dicts).

  Returns mean, standard error (sample std / sqrt(n), None for n = 1), n,
  the number of seeds where a < b, and the differences.
  """
  seeds = sorted(s for s in set(a) & set(b)
                 if a[s] is not None and b[s] is not None)
  if not seeds:
    return None
  d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
  return {"mean": float(d.mean()), "se": se, "n": len(d),
          "improved": int((d < 0).sum()), "seeds": seeds,
          "diffs": [float(x) for x in d]}


def arm_losses(runs: list[dict], setting: Setting, family: str, arm: str,
               lr: float, data: str = "shakespeare",
               key: str = "final_eval_loss") -> dict:
  return {r["seed"]: r[key] for r in runs
          if setting.matches(r) and r["data"] == data and r["family"] == family
          and r["variant"] == arm and math.isclose(r["lr"], lr, rel_tol=1e-6)}


def summarize(runs: list[dict], setting: Setting) -> dict:
  """Everything the report shows, computed from the records."""
  out = {}
  for family in FAMILIES:
    lrs = selected_lrs(runs, setting, family)
    if not lrs:
      continue
    fam = {"lr": lrs, "grid": {}, "arms": {}, "diffs": {}, "noise": None}
    for arm in MAIN_ARMS:
      fam["grid"][arm] = sorted(
          (r["lr"], r["final_val_loss"]) for r in runs
          if setting.matches(r) and r["data"] == "shakespeare"
          and r["family"] == family and r["variant"] == arm and r["seed"] == 0)
    # Settled: the choose_lr rule would stop here (optimum inside the
    # tried rates, or the extension budget used up).
    fam["settled"] = {
        arm: len(pts) >= len(LR_GRID[family]) and (
            lrs.get(arm) not in (pts[0][0], pts[-1][0])
            or len(pts) >= len(LR_GRID[family]) + MAX_EXTEND)
        for arm, pts in fam["grid"].items() if pts}
    arm_lr = {"std": lrs.get("std"), "bc": lrs.get("bc")}
    for arm in ABLATIONS:
      arm_lr[arm] = lrs.get("bc")
    losses = {arm: arm_losses(runs, setting, family, arm, lr)
              for arm, lr in arm_lr.items() if lr is not None}
    losses = {arm: by_seed for arm, by_seed in losses.items() if by_seed}
    for arm, by_seed in losses.items():
      vals = [v for v in by_seed.values() if v is not None]
      fam["arms"][arm] = {"lr": arm_lr[arm], "n": len(vals),
                          "diverged": len(by_seed) - len(vals),
                          "mean": float(np.mean(vals)) if vals else None}
    if "std" in losses:
      for arm in ("bc",) + ABLATIONS:
        if arm in losses:
          fam["diffs"][arm] = paired(losses[arm], losses["std"])
    if "bc" in losses:
      for arm in ABLATIONS:
        if arm in losses:
          fam["diffs"][f"{arm}-bc"] = paired(losses[arm], losses["bc"])
    if "std" in lrs and "bc" in lrs:
      noisy = {arm: arm_losses(runs, setting, family, arm, lrs[arm],
                               data=data_name(NOISE)) for arm in MAIN_ARMS}
      if all(noisy.values()):
        fam["noise"] = {
            "std": float(np.mean([v for v in noisy["std"].values()
                                  if v is not None] or [np.nan])),
            "bc": float(np.mean([v for v in noisy["bc"].values()
                                 if v is not None] or [np.nan])),
            "diff": paired(noisy["bc"], noisy["std"])}
    out[family] = fam
  return out


def fmt_diff(p: dict | None) -> str:
  if p is None:
    return "-"
  se = f" ± {p['se']:.4f}" if p["se"] is not None else " (1 seed)"
  return f"{p['mean']:+.4f}{se}"


def fmt_improved(p: dict | None) -> str:
  return "-" if p is None else f"{p['improved']}/{p['n']}"


def fmt_lr(x) -> str:
  return "-" if x is None else f"{x:g}"


def fmt_loss(x) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def report_markdown(runs: list[dict], setting: Setting, summary: dict,
                    png: str, results_name: str) -> str:
  sel = [r for r in runs if setting.matches(r)]
  ok = [r for r in sel if r.get("wall_s") is not None]
  lines = [BEGIN, "## Quality: does bias correction pay? (`benchmarks/lm_quality.py`)", ""]
  if not sel:
    lines += ["No runs yet: `python benchmarks/lm_quality.py`.", END]
    return "\n".join(lines) + "\n"
  tokens = setting.microbatches * setting.microbatch_size * setting.seq_len
  walls = [r["wall_s"] for r in ok]
  cpus = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
  loads = [r["loadavg_1m"] for r in sel if r.get("loadavg_1m") is not None]
  light = [r["wall_s"] for r in ok if r.get("loadavg_1m", 99) < LIGHT_LOAD]
  lines += [
      f"`{setting.preset}` preset, {setting.steps} steps of M = "
      f"{setting.microbatches} microbatches x {setting.microbatch_size} "
      f"sequences x {setting.seq_len} tokens ({tokens} tokens/step, "
      f"{tokens * setting.steps:,} tokens/run), byte-level Shakespeare "
      f"(train on 32 plays, choose the learning rate on the validation plays, "
      f"report the test plays: `examples/lm/data.py`), cosine schedule with "
      f"{setting.warmup} warm-up steps and a 0.1 floor, the same for every "
      f"arm. Each arm's learning rate is chosen on validation with seed 0 "
      f"from a factor-2 grid (extended past an edge when the best value sits "
      f"there); the comparison is on test, paired by seed (a seed fixes the "
      f"initialisation and the batch order). Differences are `arm - std` "
      f"in nats/token, ± one standard error over seeds; \"improved\" counts "
      f"the seeds where the arm's test loss is lower.",
      "",
      f"{len(sel)} runs in `benchmarks/results/{results_name}`"
      + (f"; one run took a median {np.median(walls):.0f} s of training "
         f"wall time ({np.median(cpus):.0f} s of process CPU time including "
         f"compilation) on this 2-core CPU machine, shared with other jobs "
         f"(1-minute load average {min(loads):.1f}-{max(loads):.1f} at the "
         f"runs' starts)" if walls and cpus and loads else "")
      + (f"; the {len(light)} runs started at a load average below "
         f"{LIGHT_LOAD:g} took a median {np.median(light):.0f} s." if light
         else "."),
      "",
      "| family | lr std | lr bc | test std | test bc | bc - std | improved "
      "| paper (Qwen2.5-0.5B) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for family, fam in summary.items():
    arms, d = fam["arms"], fam["diffs"].get("bc")
    pending = [a for a in MAIN_ARMS if not fam["settled"].get(a)]
    lines.append(
        f"| {family}{' (lr search in progress)' if pending else ''} | "
        f"{fmt_lr(fam['lr'].get('std'))} | "
        f"{fmt_lr(fam['lr'].get('bc'))} | "
        f"{fmt_loss(arms.get('std', {}).get('mean'))} | "
        f"{fmt_loss(arms.get('bc', {}).get('mean'))} | {fmt_diff(d)} | "
        f"{fmt_improved(d)} | {PAPER_DELTA[family]:+.3f} |")
    if fam["noise"]:
      nz = fam["noise"]
      paper = PAPER_DELTA.get(family + "-noise")
      lines.append(
          f"| {family}, noise q = {NOISE:g} | (same) | (same) | "
          f"{fmt_loss(nz['std'])} | {fmt_loss(nz['bc'])} | "
          f"{fmt_diff(nz['diff'])} | {fmt_improved(nz['diff'])} | "
          f"{'-' if paper is None else f'{paper:+.3f}'} |")
  lines += ["", "Ablations at the `bc` arm's learning rate (same seeds): "
            "`cf` cross-fit only, `inv` inverse correction only, `paper` the "
            "reference code's variant (AdamW LOO, Sophia/Shampoo twofold, "
            "`\"paper\"` estimator).", "",
            "| family | arm | lr | seeds | mean test | arm - std | improved "
            "vs std | arm - bc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for family, fam in summary.items():
    for arm in MAIN_ARMS + ABLATIONS:
      if arm not in fam["arms"]:
        continue
      a = fam["arms"][arm]
      d = fam["diffs"].get(arm)
      db = fam["diffs"].get(f"{arm}-bc")
      div = f" ({a['diverged']} diverged)" if a["diverged"] else ""
      lines.append(
          f"| {family} | {arm} | {a['lr']:g} | {a['n']}{div} | "
          f"{fmt_loss(a['mean'])} | {fmt_diff(d) if arm != 'std' else ''} | "
          f"{fmt_improved(d) if arm != 'std' else ''} | "
          f"{fmt_diff(db) if db else ''} |")
  lines += ["", "Learning-rate search (seed 0, final validation loss; "
            "**bold** = chosen; an edge choice means the grid did not "
            "bracket the optimum within the extension budget):", "",
            "| family | arm | lr: validation loss |", "| --- | --- | --- |"]
  for family, fam in summary.items():
    for arm, pts in fam["grid"].items():
      if not pts:
        continue
      cells = []
      for lr, v in pts:
        s = f"{lr:g}: {fmt_loss(v) if v is not None else 'diverged'}"
        cells.append(f"**{s}**" if lr == fam["lr"].get(arm) else s)
      edge = fam["lr"].get(arm) in (pts[0][0], pts[-1][0])
      note = ("" if not edge else " (edge: extension budget used up)"
              if fam["settled"].get(arm) else " (search in progress)")
      lines.append(f"| {family} | {arm} | {', '.join(cells)}{note} |")
  missing = [f for f in FAMILIES if f not in summary]
  if missing:
    lines += ["", f"Not run yet: {', '.join(missing)}."]
  lines += ["", f"![paired differences and loss curves]({png})", "",
            "Reproduce: `python benchmarks/lm_quality.py` (resumable; "
            "`--families adamw` for one family, `--report-only` to rebuild "
            "this section); every record's `command` reruns one cell. On an "
            "accelerator add e.g. `--preset small --steps 2000 --devices N`.",
            END]
  return "\n".join(lines) + "\n"


def write_results_md(section: str, path: pathlib.Path = RESULTS_MD) -> None:
  """Replaces only the text between the lm_quality markers (re-read first)."""
  text = path.read_text() if path.exists() else (
      "# Benchmark results\n\nGenerated by the scripts in `benchmarks/`; "
      "each section names its script and results file.\n")
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + section.rstrip("\n") + tail
  else:
    text = text.rstrip("\n") + "\n\n" + section
  tmp = path.with_suffix(".md.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def plot(summary: dict, curves: dict, runs: list[dict], setting: Setting,
         path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fams = list(summary)
  fig, axes = plt.subplots(1, 1 + max(1, len(fams)),
                           figsize=(4.2 * (1 + max(1, len(fams))), 4.2))
  ax = axes[0]
  arms = ("bc",) + ABLATIONS
  width = 0.8 / (len(arms) + 1)
  for i, family in enumerate(fams):
    for j, arm in enumerate(arms):
      p = summary[family]["diffs"].get(arm)
      if p is None:
        continue
      x = i + (j - len(arms) / 2) * width
      ax.bar(x, p["mean"], width, yerr=p["se"] or 0, capsize=2,
             color=f"C{j}", label=arm if i == 0 else None)
    ax.plot([i + (len(arms) / 2) * width], [PAPER_DELTA[family]], "k*", ms=9,
            label="paper (bc)" if i == 0 else None)
  ax.axhline(0, color="k", lw=0.7)
  ax.set_xticks(range(len(fams)), fams)
  ax.set_ylabel("test loss: arm - std (nats/token)")
  ax.set_title("paired difference ± s.e. over seeds")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  for ax, family in zip(axes[1:], fams):
    fam = summary[family]
    for k, arm in enumerate(MAIN_ARMS + ABLATIONS):
      a = fam["arms"].get(arm)
      if not a or not a["n"]:
        continue
      names = [Cell(family, arm, a["lr"], r["seed"]).name for r in runs
               if setting.matches(r) and r["data"] == "shakespeare"
               and r["family"] == family and r["variant"] == arm
               and math.isclose(r["lr"], a["lr"], rel_tol=1e-6)
               and r.get("final_eval_loss") is not None]
      vals = [dict(curves[n]["val"]) for n in names if n in curves]
      if not vals:
        continue
      steps = sorted(set.intersection(*(set(v) for v in vals)))
      mean = [np.mean([v[s] for v in vals]) for s in steps]
      main = arm in MAIN_ARMS
      ax.plot(steps, mean, "o-" if main else ".--", ms=3, lw=1.5 if main else 0.8,
              color=f"C{k}", label=f"{arm} (lr {a['lr']:g}, {len(vals)} seeds)")
    ax.set_title(f"{family}: validation loss, mean over seeds")
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lo = [m for m in ax.get_lines() if len(m.get_ydata())]
    if lo:   # zoom on the second half of training
      ys = np.concatenate([m.get_ydata()[len(m.get_ydata()) // 2 - 1:]
                           for m in lo])
      ax.set_ylim(ys.min() - 0.05, ys.max() + 0.05)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def print_table(summary: dict) -> None:
  print(f"{'family':8} {'arm':6} {'lr':>8} {'seeds':>5} {'test':>8} "
        f"{'arm-std':>18} {'improved':>8}")
  for family, fam in summary.items():
    for arm in MAIN_ARMS + ABLATIONS:
      a = fam["arms"].get(arm)
      if not a:
        continue
      d = fam["diffs"].get(arm)
      print(f"{family:8} {arm:6} {a['lr']:8g} {a['n']:5d} "
            f"{fmt_loss(a['mean']):>8} {fmt_diff(d) if d else '':>18} "
            f"{fmt_improved(d) if d else '':>8}")
    if fam["noise"]:
      nz = fam["noise"]
      print(f"{family:8} noisy  std {fmt_loss(nz['std'])} bc "
            f"{fmt_loss(nz['bc'])}  bc-std {fmt_diff(nz['diff'])}")


def report(results: pathlib.Path, setting: Setting, png: pathlib.Path,
           results_md: pathlib.Path | None) -> dict:
  """Prints the table, writes the PNG and (unless None) the RESULTS.md part."""
  runs = load_runs(results)
  summary = summarize(runs, setting)
  curves = (json.loads(curves_path(results).read_text())
            if curves_path(results).exists() else {})
  print_table(summary)
  if summary:
    plot(summary, curves, runs, setting, png)
    print(f"[lm_quality] wrote {png}")
  if results_md is not None:
    write_results_md(report_markdown(
        runs, setting, summary, os.path.relpath(png, results_md.parent),
        results.name), results_md)
    print(f"[lm_quality] wrote {results_md}")
  return summary


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="adamw vs adamw_bc, seed 0 (two runs), each at the rate "
                      "chosen in benchmarks/results/lm_quality.json")
  p.add_argument("--families", nargs="+", default=list(FAMILIES),
                 choices=FAMILIES)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--arms", nargs="+", default=list(MAIN_ARMS + ABLATIONS),
                 choices=MAIN_ARMS + ABLATIONS,
                 help="arms that get seeds (default: all; the learning-rate"
                      " search always runs)")
  p.add_argument("--no-noise", action="store_true",
                 help="skip the noisy-data row (AdamW)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--rerun-unversioned", action="store_true",
                 help="first re-run (with this code) the records of the"
                      " selected families that carry no `code` field; the"
                      " old records are kept under `superseded`")
  p.add_argument("--verify", type=int, metavar="K", default=None,
                 help="re-run K recorded runs (spread over the results file)"
                      " from their commands, write lm_quality_verify.json"
                      " next to the results and fail if a loss moved by more"
                      f" than {REPRODUCE_TOLERANCE} nats")
  p.add_argument("--preset", default=Setting.preset)
  p.add_argument("--steps", type=int, default=Setting.steps)
  p.add_argument("--microbatches", type=int, default=Setting.microbatches)
  p.add_argument("--microbatch-size", type=int,
                 default=Setting.microbatch_size)
  p.add_argument("--seq-len", type=int, default=Setting.seq_len)
  p.add_argument("--devices", type=int, default=Setting.devices)
  p.add_argument("--results", type=pathlib.Path,
                 help="results JSON (default benchmarks/results/"
                      "lm_quality.json; runs/lm_quality_quick.json with "
                      "--quick); the PNG goes next to it")
  p.add_argument("--runs-dir", type=pathlib.Path,
                 help="run output folders (default runs/lm_quality, "
                      "runs/lm_quality_quick with --quick)")
  args = p.parse_args(argv)
  setting = Setting(preset=args.preset, steps=args.steps,
                    microbatches=args.microbatches,
                    microbatch_size=args.microbatch_size, seq_len=args.seq_len,
                    devices=args.devices)
  # --quick keeps its runs out of the committed results (so that it always
  # trains on a fresh checkout): runs/lm_quality_quick.json and .png.
  results = args.results or (ROOT / "runs" / "lm_quality_quick.json"
                             if args.quick else RESULTS / "lm_quality.json")
  png = results.with_suffix(".png")
  runs_dir = args.runs_dir or ROOT / "runs" / (
      "lm_quality_quick" if args.quick else "lm_quality")
  if args.devices > 1 and "XLA_FLAGS" not in os.environ and (
      args.preset == "tiny"):
    print("[lm_quality] note: on CPU, --devices N needs XLA_FLAGS="
          "--xla_force_host_platform_device_count=N", flush=True)
  os.chdir(ROOT)              # train.py's relative paths, `python -m` commands
  sys.path.insert(0, str(ROOT))
  t0 = time.time()
  if args.verify is not None:
    command = " ".join(shlex.quote(a) for a in
                       ["python", "benchmarks/lm_quality.py"] + list(
                           sys.argv[1:] if argv is None else argv))
    check = verify(results, runs_dir, args.verify)
    write_json(results.with_name(results.stem + "_verify.json"),
               {"command": command, "code": git_state(), **check})
    print(f"[lm_quality] verify: {len(check['checks'])} runs, largest "
          f"|difference| {check['max_abs_diff']:.4f} nats (tolerance "
          f"{check['tolerance']})", flush=True)
    if not check["ok"]:
      raise SystemExit(1)
    return
  if not args.report_only:
    from examples.lm import train   # imported now: `code` describes it
    code = git_state()
    run = lambda cell: run_cell(cell, setting, results, runs_dir,
                                runner=train.main, code=code)
    if args.quick:
      lrs = quick_lrs(RESULTS / "lm_quality.json", setting)
      print(f"[lm_quality] --quick: learning rates {lrs}", flush=True)
      for arm in MAIN_ARMS:
        run(Cell("adamw", arm, lrs[arm], 0))
    else:
      if args.rerun_unversioned:
        n = rerun_unversioned(results, setting, args.families, run)
        print(f"[lm_quality] re-ran {n} unversioned records", flush=True)
      for family in args.families:
        run_family(family, setting, args.seeds, run,
                   noise=family == "adamw" and not args.no_noise,
                   arms=tuple(args.arms))
  report(results, setting, png, None if args.quick else RESULTS_MD)
  print(f"[lm_quality] done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
