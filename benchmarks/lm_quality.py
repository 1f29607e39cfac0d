r"""Does bias correction pay? A tuned, seeded comparison on the LM example.

The grid (rates chosen on validation with seed 0, then seeded arms and
ablations compared on test; docs/quality.md) is one ``lm_runs`` training
run per cell, recorded in ``results/lm_quality.json`` (curves in
``lm_quality_curves.json``) with the ``command`` that reruns it; recorded
cells are skipped, interrupted ones resume. The RESULTS.md section and PNG
are rebuilt from the records. On an accelerator add e.g. ``--preset small
--devices N --steps 2000``::

  python -m benchmarks.lm_quality --quick          # adamw vs adamw_bc, seed 0
  python -m benchmarks.lm_quality                  # the grid (hours on CPU)
  python -m benchmarks.lm_quality --families adamw # one family
  python -m benchmarks.lm_quality --report-only    # RESULTS.md + PNG from JSON
  python -m benchmarks.lm_quality --verify 6       # rerun 6 records, compare
"""

import argparse
import dataclasses
import math
import os
import pathlib
import shutil
import time

import numpy as np

from benchmarks import harness
from benchmarks import lm_runs

MODULE = "benchmarks.lm_quality"
FAMILIES = ("adamw", "sophia", "shampoo")
MAIN_ARMS = ("std", "bc")
ABLATIONS = ("cf", "inv", "paper")
# The paper's held-out deltas, bc - std in nats (docs/quality.md).
PAPER_DELTA = {"adamw": -0.1489, "sophia": -0.0701, "shampoo": -0.1103,
               "adamw-noise": -0.0191}
# Starting learning-rate grids (factor 2 apart).
LR_GRID = {"adamw": (1.5e-3, 3e-3, 6e-3), "sophia": (7.5e-4, 1.5e-3, 3e-3),
           "shampoo": (1.5e-3, 3e-3, 6e-3)}
MAX_EXTEND = 2
NOISE = 0.2
LIGHT_LOAD = 4.0    # report: runs started below this 1-minute load average
QUICK_LR = 3e-3     # --quick, before the full grid has chosen: both arms
REPRODUCE_TOLERANCE = 0.02  # a record's command must give its losses to this
SHAPE = ("steps", "microbatches", "microbatch_size", "seq_len")
LOSSES = ("final_eval_loss", "final_val_loss")   # test, validation
# Results and run folders without and with --quick (which always trains).
RESULTS = ("benchmarks/results/lm_quality.json", "runs/lm_quality_quick.json")
RUNS = ("runs/lm_quality", "runs/lm_quality_quick")


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
    d = dataclasses.asdict(self)   # the recorded commands' order of flags
    return lm_runs.flags({**{k: d.pop(k) for k in list(d)[:6]},
                          "schedule": "cosine", "lr_floor": 0.1, **d,
                          "checkpoint_every": 0, "progress": "off"})

  def matches(self, record: dict) -> bool:
    return all(record.get(k) == getattr(self, k) for k in ("preset", *SHAPE))


def arm_flags(family: str, arm: str) -> list[str]:
  """train.py flags selecting the optimizer of ``family`` x ``arm``."""
  if family not in FAMILIES or arm not in MAIN_ARMS + ABLATIONS:
    raise ValueError(f"{family!r} x {arm!r}: not in {FAMILIES} x "
                     f"{MAIN_ARMS + ABLATIONS}")
  switches = {"cf": {"inverse_correction": "none"},
              "inv": {"cross_fit": "none"},
              "paper": {"cross_fit": "loo" if family == "adamw" else "twofold",
                        "inverse_correction": "paper"}}.get(arm, {})
  return lm_runs.flags({"optimizer": family if arm == "std"
                        else f"{family}_bc", **switches})


def log(message: str) -> None:
  print(f"[lm_quality] {message}", flush=True)


def data_name(noise: float) -> str:
  return "shakespeare" if noise == 0 else f"shakespeare-noise{noise:g}"


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
    return lm_runs.command(
        arm_flags(self.family, self.variant)
        + ["--lr", f"{self.lr:g}", "--seed", str(self.seed)]
        + (["--noise", f"{self.noise:g}"] if self.noise else [])
        + setting.flags() + ["--out", lm_runs.OUT])


def cell_of(record: dict) -> Cell:
  """The grid cell a record was made for."""
  noise = 0.0 if record["data"] == data_name(0.0) else NOISE
  if record["data"] != data_name(noise):
    raise ValueError(f"unknown data {record['data']!r}")
  return Cell(record["family"], record["variant"], record["lr"],
              record["seed"], noise)


def select(runs: list[dict], setting: Setting, family: str, arm: str,
           lr: float | None = None, seed: int | None = None,
           data: str = "shakespeare") -> list[dict]:
  """The records of ``family`` x ``arm`` on ``data`` (at ``lr``, ``seed``)."""
  return [r for r in runs if setting.matches(r) and r["data"] == data
          and r["family"] == family and r["variant"] == arm
          and (lr is None or math.isclose(r["lr"], lr, rel_tol=1e-6))
          and seed in (None, r["seed"])]


def find(runs: list[dict], cell: Cell, setting: Setting) -> dict | None:
  return next(iter(select(runs, setting, cell.family, cell.variant, cell.lr,
                          cell.seed, cell.data)), None)


def load_file(path: pathlib.Path) -> dict:
  """The whole results file (``runs``, and ``superseded`` if any)."""
  return harness.read_json(path, {"runs": []})


def load_runs(path: pathlib.Path) -> list[dict]:
  return load_file(path)["runs"]


def append_run(path: pathlib.Path, record: dict) -> None:
  data = load_file(path)     # re-read: never drop what is on disk
  data["runs"].append(record)
  harness.write_json(path, data)


def curves_path(results: pathlib.Path) -> pathlib.Path:
  return results.with_name(results.stem + "_curves.json")


def save_curve(path: pathlib.Path, name: str, out: pathlib.Path) -> None:
  """Adds a run's training-loss and validation curves to ``path``."""
  records, curves = lm_runs.metrics(out), harness.read_json(path, {})
  curves[name] = {"step": [r["step"] for r in records],
                  "train_loss": [round(r["train_loss"], 4) for r in records],
                  "val": [[r["step"], round(r["val_loss"], 5)]
                          for r in records if "val_loss" in r]}
  if records:
    harness.write_json(path, curves)


def run_cell(cell: Cell, setting: Setting, results: pathlib.Path,
             runs_dir: pathlib.Path, runner=None) -> dict:
  """Runs one cell unless the results file has it; returns its record
  (``runner``: see ``lm_runs.run``)."""
  if (existing := find(load_runs(results), cell, setting)) is not None:
    return existing
  command, out = cell.command(setting), runs_dir / cell.name
  log(f"{cell.name} (load {os.getloadavg()[0]:.1f})")
  s = lm_runs.run(lm_runs.argv_of(command, out), runner, replace=True)
  record = {
      "data": cell.data, "family": cell.family, "variant": cell.variant,
      "lr": cell.lr, "seed": cell.seed,
      **{k: s.get(k) for k in ("final_val_loss", "final_eval_loss")},
      **{k: getattr(setting, k) for k in SHAPE},
      "tokens": s.get("tokens", math.prod(getattr(setting, k) for k in SHAPE)),
      "wall_s": s.get("wall_s"), "command": command,
      # Context; the run's wall and CPU seconds include compilation.
      "status": "diverged" if "diverged" in s else "ok",
      "preset": setting.preset, "devices": setting.devices,
      **{k: s["benchmark"][k]
         for k in ("call_wall_s", "cpu_s", "loadavg_1m", "code")}}
  save_curve(curves_path(results), cell.name, out)
  append_run(results, record)
  if record["status"] == "ok":
    log(f"{cell.name}: val {record['final_val_loss']:.4f} test "
        f"{record['final_eval_loss']:.4f} ({record['call_wall_s']:.0f} s "
        f"wall, {record['cpu_s']:.0f} s CPU)")
  return record


def rerun_unversioned(results: pathlib.Path, setting: Setting,
                      families, run) -> int:
  """Re-runs the records of ``families`` (this setting) without ``code``,
  moving them to ``superseded`` (kept, not read); returns how many."""
  stale = [r for r in load_runs(results) if "code" not in r
           and r["family"] in families and setting.matches(r)]
  for r in stale:
    data = load_file(results)
    data["runs"] = [x for x in data["runs"] if x != r]
    data.setdefault("superseded", []).append(
        {**r, "superseded": "made by code of unknown version; re-run"})
    harness.write_json(results, data)
    run(cell_of(r))
  return len(stale)


def verify(results: pathlib.Path, runs_dir: pathlib.Path, count: int,
           runner=None, tolerance: float = REPRODUCE_TOLERANCE) -> dict:
  """Re-runs ``count`` records spread over the file (first and last
  included) from their ``command``: {"tolerance", "checks" (per record its
  cell, command, code, recorded and re-run losses), "max_abs_diff", "ok"}."""
  if not (runs := [r for r in load_runs(results)
                   if r.get("status", "ok") == "ok"]):
    raise ValueError(f"{results} has no finished runs to verify")
  checks = []
  for i in sorted({round(x) for x in np.linspace(0, len(runs) - 1,
                                                 min(count, len(runs)))}):
    r = runs[i]
    out = runs_dir / "verify" / cell_of(r).name
    shutil.rmtree(out, ignore_errors=True)   # a fresh run, never a reused one
    summary = lm_runs.run(lm_runs.argv_of(r["command"], out), runner)
    if "diverged" in summary:
      raise FloatingPointError(f"verify {out.name}: {summary['diverged']}")
    checks.append({**{k: r[k] for k in ("data", "family", "variant", "lr",
                                        "seed", "command")},
                   **{k: {"recorded": r[k], "rerun": summary[k],
                          "diff": summary[k] - r[k]} for k in LOSSES},
                   "code": r.get("code")})
    log(f"verify {out.name}: test {r['final_eval_loss']:.4f} -> "
        f"{summary['final_eval_loss']:.4f}")
  worst = max(abs(c[k]["diff"]) for c in checks for k in LOSSES)
  return {"tolerance": tolerance, "checks": checks, "max_abs_diff": worst,
          "ok": worst <= tolerance}


def val_loss(record: dict | None) -> float:
  """Selection score: diverged or missing runs score +inf."""
  loss = (record or {}).get("final_val_loss")
  return math.inf if loss is None else loss


def choose_lr(family: str, arm: str, setting: Setting, run) -> tuple:
  """Seed-0 search from ``LR_GRID[family]``, extended by factors of 2 past
  an edge with the best validation loss; returns (best lr, tried lrs)."""
  grid = sorted(LR_GRID[family])
  scores = {}
  for _ in range(MAX_EXTEND + 1):
    for lr in grid:
      if lr not in scores:
        scores[lr] = val_loss(run(Cell(family, arm, lr, 0)))
    best = min(grid, key=lambda lr: scores[lr])
    if best == grid[0] or not math.isfinite(scores[best]):  # or all diverged
      grid.insert(0, float(f"{grid[0] / 2:.4g}"))
    elif best == grid[-1]:
      grid.append(float(f"{grid[-1] * 2:.4g}"))
    else:
      return best, grid
  best = min(scores, key=scores.get)
  return best, sorted(scores)


def selected_lrs(runs: list[dict], setting: Setting, family: str) -> dict:
  """{arm: lr}: ``choose_lr``'s rule on the seed-0 clean records."""
  chosen = {}
  for arm in MAIN_ARMS:
    scores = {r["lr"]: val_loss(r)
              for r in select(runs, setting, family, arm, seed=0)}
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
  """Both main arms' learning-rate search (always), then seeds 0 to
  ``seeds - 1`` of ``arms`` (and of the noisy main arms if ``noise``)."""
  lrs = {arm: choose_lr(family, arm, setting, run)[0] for arm in MAIN_ARMS}
  log(f"{family}: chosen learning rates {lrs}")
  main_arms = [arm for arm in MAIN_ARMS if arm in arms]
  seeded = [(arm, lrs[arm], seed, 0.0) for seed in range(seeds)
            for arm in main_arms]
  seeded += [(arm, lrs["bc"], seed, 0.0) for arm in ABLATIONS if arm in arms
             for seed in range(seeds)]
  seeded += [(arm, lrs[arm], seed, NOISE) for seed in range(seeds) if noise
             for arm in main_arms]
  for arm, lr, seed, q in seeded:
    run(Cell(family, arm, lr, seed, q))


def arm_losses(runs: list[dict], setting: Setting, family: str, arm: str,
               lr: float, data: str = "shakespeare") -> dict:
  """{seed: final test loss (None: diverged)}."""
  return {r["seed"]: r["final_eval_loss"]
          for r in select(runs, setting, family, arm, lr, data=data)}


def summarize(runs: list[dict], setting: Setting) -> dict:
  """Everything the report shows, computed from the records."""
  out = {}
  for family in FAMILIES:
    lrs = selected_lrs(runs, setting, family)
    if not lrs:
      continue
    fam = out[family] = {"lr": lrs, "arms": {}, "diffs": {}, "noise": None}
    fam["grid"] = {arm: sorted((r["lr"], r["final_val_loss"]) for r in select(
        runs, setting, family, arm, seed=0)) for arm in MAIN_ARMS}
    # Settled: choose_lr would stop here (inside, or the budget used up).
    fam["settled"] = {
        arm: len(pts) >= len(LR_GRID[family]) and (
            lrs.get(arm) not in (pts[0][0], pts[-1][0])
            or len(pts) >= len(LR_GRID[family]) + MAX_EXTEND)
        for arm, pts in fam["grid"].items() if pts}
    arm_lr = {arm: lrs.get("std" if arm == "std" else "bc")
              for arm in MAIN_ARMS + ABLATIONS}
    losses = {arm: by_seed for arm, lr in arm_lr.items() if lr is not None
              for by_seed in [arm_losses(runs, setting, family, arm, lr)]
              if by_seed}
    for arm, by_seed in losses.items():
      vals = [v for v in by_seed.values() if v is not None]
      fam["arms"][arm] = {"lr": arm_lr[arm], "n": len(vals),
                          "diverged": len(by_seed) - len(vals),
                          "mean": float(np.mean(vals)) if vals else None}
    for arm, base in ([(a, "std") for a in ("bc",) + ABLATIONS]
                      + [(a, "bc") for a in ABLATIONS]):
      if arm in losses and base in losses:
        fam["diffs"][arm if base == "std" else f"{arm}-{base}"] = (
            lm_runs.paired(losses[arm], losses[base]))
    noisy = {arm: arm_losses(runs, setting, family, arm, lrs[arm],
                             data=data_name(NOISE)) for arm in lrs}
    if len(noisy) == 2 and all(noisy.values()):
      mean = lambda arm: float(np.mean([v for v in noisy[arm].values()
                                        if v is not None] or [np.nan]))
      fam["noise"] = {"std": mean("std"), "bc": mean("bc"),
                      "diff": lm_runs.paired(noisy["bc"], noisy["std"])}
  return out


def report_markdown(runs: list[dict], setting: Setting, summary: dict,
                    png: str, results_name: str) -> str:
  """The ``lm_quality`` section of RESULTS.md (without its markers)."""
  diff = lambda p: lm_runs.fmt(p, sign="+", one=" (1 seed)")
  improved = lambda p: "-" if p is None else f"{p['improved']}/{p['n']}"
  loss = lambda x: "-" if x is None or not math.isfinite(x) else f"{x:.4f}"
  sel = [r for r in runs if setting.matches(r)]
  ok = [r for r in sel if r.get("wall_s") is not None]
  head = "## Quality: does bias correction pay? (`benchmarks/lm_quality.py`)"
  if not sel:
    return f"{head}\n\nNo runs yet: `python -m {MODULE}`."
  tokens = setting.microbatches * setting.microbatch_size * setting.seq_len
  walls = [r["wall_s"] for r in ok]
  cpus = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
  loads = [r["loadavg_1m"] for r in sel if r.get("loadavg_1m") is not None]
  light = [r["wall_s"] for r in ok if r.get("loadavg_1m", 99) < LIGHT_LOAD]
  main_rows, ablation_rows, grid_rows = [], [], []
  for family, fam in summary.items():
    arms, d = fam["arms"], fam["diffs"].get("bc")
    main_rows.append([
        family + (" (lr search in progress)" if not all(
            fam["settled"].get(a) for a in MAIN_ARMS) else ""),
        *(f"{fam['lr'][a]:g}" if a in fam["lr"] else "-" for a in MAIN_ARMS),
        *(loss(arms.get(a, {}).get("mean")) for a in MAIN_ARMS),
        diff(d), improved(d), f"{PAPER_DELTA[family]:+.3f}"])
    if fam["noise"]:
      nz, paper = fam["noise"], PAPER_DELTA.get(family + "-noise")
      main_rows.append([
          f"{family}, noise q = {NOISE:g}", "(same)", "(same)",
          loss(nz["std"]), loss(nz["bc"]), diff(nz["diff"]),
          improved(nz["diff"]), "-" if paper is None else f"{paper:+.3f}"])
    for arm in (a for a in MAIN_ARMS + ABLATIONS if a in arms):
      a, d, db = arms[arm], fam["diffs"].get(arm), fam["diffs"].get(f"{arm}-bc")
      div = f" ({a['diverged']} diverged)" if a["diverged"] else ""
      ablation_rows.append([
          family, arm, f"{a['lr']:g}", f"{a['n']}{div}", loss(a["mean"]),
          *((diff(d), improved(d)) if arm != "std" else ("", "")),
          diff(db) if db else ""])
    for arm, pts in ((arm, pts) for arm, pts in fam["grid"].items() if pts):
      cells = [("**{}**" if lr == fam["lr"].get(arm) else "{}").format(
          f"{lr:g}: {loss(v) if v is not None else 'diverged'}")
               for lr, v in pts]
      edge = fam["lr"].get(arm) in (pts[0][0], pts[-1][0])
      note = ("" if not edge else " (edge: extension budget used up)"
              if fam["settled"].get(arm) else " (search in progress)")
      grid_rows.append([family, arm, ", ".join(cells) + note])
  missing = [f for f in FAMILIES if f not in summary]
  return "\n".join([
      head, "", f"`{setting.preset}` preset, {setting.steps} steps of M = "
      f"{setting.microbatches} x {setting.microbatch_size} sequences x "
      f"{setting.seq_len} tokens ({tokens} tokens/step, "
      f"{tokens * setting.steps:,}/run) of byte-level Shakespeare (32 "
      f"training plays), cosine schedule, {setting.warmup} warm-up steps, 0.1"
      " floor (docs/quality.md). `arm - std`: test loss in nats/token, paired"
      " by seed, ± one standard error; improved: seeds where the arm is "
      f"lower. {len(sel)} runs in `{results_name}`"
      + (f"; a median {np.median(walls):.0f} s of training wall time per run"
         f" ({np.median(cpus):.0f} s of process CPU time with compilation) "
         "on this shared 2-core CPU machine (1-minute load average "
         f"{min(loads):.1f}-{max(loads):.1f} at the starts)"
         if walls and cpus and loads else "")
      + (f"; {np.median(light):.0f} s for the {len(light)} runs started "
         f"below a load of {LIGHT_LOAD:g}." if light else "."), "",
      harness.table(["family", "lr std", "lr bc", "test std", "test bc",
                     "bc - std", "improved", "paper (Qwen2.5-0.5B)"],
                    main_rows), "",
      "Ablations at the `bc` rate, same seeds: `cf` cross-fit only, `inv` "
      "inverse correction only, `paper` the reference code's variant (AdamW "
      "LOO, Sophia/Shampoo twofold, `\"paper\"` estimator).",
      "", harness.table(["family", "arm", "lr", "seeds", "mean test",
                         "arm - std", "improved vs std", "arm - bc"],
                        ablation_rows), "",
      "Learning-rate search (seed 0, factor-2 grid; final validation loss, "
      "**bold**: chosen):", "",
      harness.table(["family", "arm", "lr: validation loss"], grid_rows),
      *(["", f"Not run yet: {', '.join(missing)}."] if missing else []), "",
      f"![paired differences and loss curves]({png})", "",
      f"Reproduce: `python -m {MODULE}` (resumable; `--report-only`: this "
      "section; on an accelerator add e.g. `--preset small --steps 2000 "
      "--devices N`); every record's `command` reruns one cell."])


def plot(summary: dict, curves: dict, runs: list[dict], setting: Setting,
         path: pathlib.Path) -> None:
  """Paired differences (bars), and each family's mean validation curves."""
  fams = list(summary)
  fig, axes = lm_runs.subplots(1, 1 + max(1, len(fams)),
                               figsize=(4.2 * (1 + max(1, len(fams))), 4.2))
  ax, arms = axes[0], ("bc",) + ABLATIONS
  width = 0.8 / (len(arms) + 1)
  for i, family in enumerate(fams):
    for j, arm in enumerate(arms):
      p = summary[family]["diffs"].get(arm)
      if p is not None:
        ax.bar(i + (j - len(arms) / 2) * width, p["mean"], width,
               yerr=p["se"] or 0, capsize=2, color=f"C{j}",
               label=arm if i == 0 else None)
    ax.plot([i + (len(arms) / 2) * width], [PAPER_DELTA[family]], "k*", ms=9,
            label="paper (bc)" if i == 0 else None)
  ax.axhline(0, color="k", lw=0.7)
  ax.set_xticks(range(len(fams)), fams)
  ax.set(ylabel="test loss: arm - std (nats/token)",
         title="paired difference ± s.e. over seeds")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  for ax, family in zip(axes[1:], fams):
    for k, arm in enumerate(MAIN_ARMS + ABLATIONS):
      a = summary[family]["arms"].get(arm)
      vals = [dict(curves[cell_of(r).name]["val"]) for r in select(
          runs, setting, family, arm, a["lr"]) if r.get("final_eval_loss")
              is not None and cell_of(r).name in curves] if a else []
      if not vals:
        continue
      steps = sorted(set.intersection(*(set(v) for v in vals)))
      main = arm in MAIN_ARMS
      ax.plot(steps, [np.mean([v[s] for v in vals]) for s in steps],
              "o-" if main else ".--", ms=3, lw=1.5 if main else 0.8,
              color=f"C{k}", label=f"{arm} (lr {a['lr']:g}, {len(vals)} "
              "seeds)")
    ax.set(title=f"{family}: validation loss, mean over seeds",
           xlabel="step", ylabel="nats/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lo = [m for m in ax.get_lines() if len(m.get_ydata())]
    if lo:   # zoom on the second half of training
      ys = np.concatenate([m.get_ydata()[len(m.get_ydata()) // 2 - 1:]
                           for m in lo])
      ax.set_ylim(ys.min() - 0.05, ys.max() + 0.05)
  lm_runs.save_figure(fig, path, dpi=110)


def report(results: pathlib.Path, setting: Setting, png: pathlib.Path,
           results_md: pathlib.Path | None) -> dict:
  """Prints the section, writes the PNG and (unless None) the section."""
  runs = load_runs(results)
  summary = summarize(runs, setting)
  section = report_markdown(runs, setting, summary, os.path.relpath(
      png, (results_md or harness.RESULTS_MD).parent),
      os.path.relpath(results, harness.ROOT))
  print(section)
  if summary:
    curves = harness.read_json(curves_path(results), {})
    plot(summary, curves, runs, setting, png)
  if results_md is not None:
    harness.write_section("lm_quality", section, results_md)
  return summary


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, with ``setting``, ``results``, ``png`` and ``runs_dir``."""
  p = lm_runs.parser(MODULE, __doc__, "adamw vs adamw_bc, seed 0 (two runs) "
                     "at the rates chosen in results/lm_quality.json",
                     RESULTS, RUNS)
  add = p.add_argument
  add("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
  add("--seeds", type=int, default=3)
  add("--arms", nargs="+", default=list(MAIN_ARMS + ABLATIONS),
      choices=MAIN_ARMS + ABLATIONS, help="the arms that get seeds")
  add("--no-noise", action="store_true", help="skip AdamW's noisy-data row")
  add("--rerun-unversioned", action="store_true",
      help="first re-run the families' records that have no `code`")
  add("--verify", type=int, metavar="K", help="re-run K records spread over "
      f"the file (*_verify.json); fail if a loss moves > {REPRODUCE_TOLERANCE}")
  shape = ("preset", *SHAPE, "devices")
  for k in shape:
    add("--" + k.replace("_", "-"), default=getattr(Setting, k),
        type=type(getattr(Setting, k)))
  args = p.parse_args(argv)
  if args.seeds < 1 or (args.verify is not None and args.verify < 1):
    p.error("--seeds and --verify take a positive count")
  args.setting = Setting(**{k: getattr(args, k) for k in shape})
  lm_runs.paths(args, RESULTS, RUNS)
  args.runs_dir = harness.ROOT / args.runs_dir
  return args


def main(argv=None, runner=None) -> None:
  args = parse_args(argv)
  setting, results, t0 = args.setting, args.results, time.time()
  run = lambda cell: run_cell(cell, setting, results, args.runs_dir, runner)
  if args.devices > 1 and "XLA_FLAGS" not in os.environ:
    log("note: on CPU, --devices N needs XLA_FLAGS="
        "--xla_force_host_platform_device_count=N")
  if args.verify is not None:
    check = verify(results, args.runs_dir, args.verify, runner)
    path = results.with_name(results.stem + "_verify.json")
    old = harness.read_json(path)
    harness.write_json(path, {   # earlier checks kept, newest first
        "command": harness.command(MODULE, argv),
        "code": harness.git_state(), **check,
        "previous": [old] + old.pop("previous", []) if old else []})
    log(f"verify: {len(check['checks'])} runs, largest |difference| "
        f"{check['max_abs_diff']:.4f} nats (tolerance {check['tolerance']})")
    if not check["ok"]:
      raise SystemExit(1)
    return
  if args.quick and not args.report_only:
    lrs = quick_lrs(harness.ROOT / RESULTS[0], setting)
    log(f"--quick: learning rates {lrs}")
    for arm in MAIN_ARMS:
      run(Cell("adamw", arm, lrs[arm], 0))
  elif not args.report_only:
    if args.rerun_unversioned:
      n = rerun_unversioned(results, setting, args.families, run)
      log(f"re-ran {n} unversioned records")
    for family in args.families:
      run_family(family, setting, args.seeds, run, noise=family == "adamw"
                 and not args.no_noise, arms=tuple(args.arms))
  report(results, setting, args.png, None if args.quick else harness.RESULTS_MD)
  log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
