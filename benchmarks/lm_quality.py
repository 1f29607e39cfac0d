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
  python -m benchmarks.lm_quality --families soap adopt muon  # baselines
  python -m benchmarks.lm_quality --protocol       # the paper's protocol
  python -m benchmarks.lm_quality --sophia-rho     # Sophia's rho, tuned
  python -m benchmarks.lm_quality --long           # 1000-step runs (own file)
  python -m benchmarks.lm_quality --add-monitor    # monitor of older records
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
from examples.lm import optimizer

MODULE = "benchmarks.lm_quality"
FAMILIES = ("adamw", "sophia", "shampoo")   # with ablations, paper's deltas
MAIN_ARMS = ("std", "bc")
ABLATIONS = ("cf", "inv", "paper")
# Baselines: SOAP with and without the corrections, and two single-arm
# families on the mean gradient (their arms' --optimizer in OPTIMIZER).
BASELINES = ("soap", "adopt", "muon")
BC_FAMILIES = FAMILIES + ("soap",)          # those with std and bc arms
ALL_FAMILIES = BC_FAMILIES + ("adopt", "muon")
SEARCHED = {**{f: MAIN_ARMS for f in BC_FAMILIES}, "adopt": ("std",),
            "muon": ("plain", "adaptive")}  # the arms with their own lr
OPTIMIZER = {("adopt", "std"): "adopt", ("muon", "plain"): "muon",
             ("muon", "adaptive"): "muon_adaptive"}
FLOOR = 0.1          # the cosine schedule's floor, a fraction of --lr
# The paper's protocol (AdamW): arm -> (the AdamW arm it runs, its peak
# rate as a multiple of std's chosen rate, its floor).
PROTOCOL = {"ref_bc": ("bc", 1.5, 0.2), "ref_std": ("std", 1.5, 0.2),
            "std_floor0": ("std", 1.0, 0.0)}
PROTOCOL_PAIRS = (("ref_bc", "std_floor0", "the reference configuration"),
                  ("ref_std", "std_floor0", "the schedule alone"))
# Sophia's clipping threshold: the table's default and the search's grid.
RHO = optimizer.OPTIMIZERS["sophia"].kwargs["rho"]
RHO_GRID = (RHO / 2, RHO, RHO * 2)
MONITOR = ("noise_scale", "coupling", "jensen", "win_rate")
# The paper's held-out deltas, bc - std in nats (docs/quality.md).
PAPER_DELTA = {"adamw": -0.1489, "sophia": -0.0701, "shampoo": -0.1103,
               "adamw-noise": -0.0191}
# Starting learning-rate grids (factor 2 apart).
# SOAP's update is Adam's: AdamW's rates. Muon's is scaled to AdamW's RMS,
# but its optimum lies 4-8x higher (the first searches from AdamW's grid
# reached 1.2e-2 and the edge 2.4e-2, with 1.5e-3 0.5-0.8 nats worse).
LR_GRID = {"adamw": (1.5e-3, 3e-3, 6e-3), "sophia": (7.5e-4, 1.5e-3, 3e-3),
           "shampoo": (1.5e-3, 3e-3, 6e-3), "soap": (1.5e-3, 3e-3, 6e-3),
           "adopt": (1.5e-3, 3e-3, 6e-3), "muon": (6e-3, 1.2e-2, 2.4e-2)}
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
LONG_RESULTS = ("benchmarks/results/lm_quality_long.json",) * 2
LONG_RUNS = ("runs/lm_quality_long",) * 2


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
  # Checkpoints every this many steps, so that an interrupted run resumes
  # (lm_runs.run); 0: none (short runs start over).
  checkpoint_every: int = 0

  def flags(self, floor: float = FLOOR) -> list[str]:
    """The shared flags, with the cosine schedule's ``floor``."""
    d = dataclasses.asdict(self)   # the recorded commands' order of flags
    every = d.pop("checkpoint_every")
    return lm_runs.flags({**{k: d.pop(k) for k in list(d)[:6]},
                          "schedule": "cosine", "lr_floor": f"{floor:g}", **d,
                          "checkpoint_every": every, "progress": "off"})

  def matches(self, record: dict) -> bool:
    return all(record.get(k) == getattr(self, k) for k in ("preset", *SHAPE))


# The longer runs: 1000 steps of M = 16 (lm_quality_long.json), resumable
# within a run.
LONG = Setting(steps=1000, microbatches=16, eval_every=100,
               checkpoint_every=100)


def arm_flags(family: str, arm: str) -> list[str]:
  """train.py flags selecting the optimizer of ``family`` x ``arm``."""
  if (family, arm) in OPTIMIZER:
    return lm_runs.flags({"optimizer": OPTIMIZER[family, arm]})
  if family == "adamw" and arm in PROTOCOL:
    return arm_flags(family, PROTOCOL[arm][0])
  if (family not in BC_FAMILIES or arm not in MAIN_ARMS + ABLATIONS
      or (family not in FAMILIES and arm in ABLATIONS)):
    raise ValueError(f"{family!r} x {arm!r}: not in {FAMILIES} x "
                     f"{MAIN_ARMS + ABLATIONS}, {BC_FAMILIES} x {MAIN_ARMS}, "
                     f"{sorted(OPTIMIZER)} or adamw x {list(PROTOCOL)}")
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
  """One training run of the grid.

  ``hparams``: sorted (name, value) pairs of the optimizer's table entry
  that the run overrides (``--hparam``); in the name and command only
  when set, so cells without them keep their names and commands.
  """

  family: str
  variant: str
  lr: float
  seed: int
  noise: float = 0.0
  hparams: tuple[tuple[str, float], ...] = ()

  @property
  def data(self) -> str:
    return data_name(self.noise)

  @property
  def floor(self) -> float:
    """The cosine floor: the protocol arms' own, else ``FLOOR``."""
    if self.family == "adamw" and self.variant in PROTOCOL:
      return PROTOCOL[self.variant][2]
    return FLOOR

  @property
  def name(self) -> str:
    return (f"{self.data}_{self.family}_{self.variant}_lr{self.lr:g}"
            + "".join(f"_{k}{v:g}" for k, v in self.hparams)
            + f"_s{self.seed}")

  def command(self, setting: Setting) -> str:
    """The train.py command of this run, its output folder as ``{out}``."""
    return lm_runs.command(
        arm_flags(self.family, self.variant)
        + [w for k, v in self.hparams for w in ("--hparam", f"{k}={v:g}")]
        + ["--lr", f"{self.lr:g}", "--seed", str(self.seed)]
        + (["--noise", f"{self.noise:g}"] if self.noise else [])
        + setting.flags(self.floor) + ["--out", lm_runs.OUT])


def cell_of(record: dict) -> Cell:
  """The grid cell a record was made for."""
  noise = 0.0 if record["data"] == data_name(0.0) else NOISE
  if record["data"] != data_name(noise):
    raise ValueError(f"unknown data {record['data']!r}")
  return Cell(record["family"], record["variant"], record["lr"],
              record["seed"], noise,
              tuple(sorted(record.get("hparams", {}).items())))


def rho_hparams(rho: float) -> tuple:
  """A Sophia cell's overrides for ``rho`` (none at the table's default)."""
  return () if math.isclose(rho, RHO) else (("rho", rho),)


def select(runs: list[dict], setting: Setting, family: str, arm: str,
           lr: float | None = None, seed: int | None = None,
           data: str = "shakespeare", hparams: tuple | None = ()
           ) -> list[dict]:
  """The records of ``family`` x ``arm`` on ``data`` with exactly the
  overrides ``hparams`` (None: any; at ``lr``, ``seed``)."""
  return [r for r in runs if setting.matches(r) and r["data"] == data
          and r["family"] == family and r["variant"] == arm
          and (hparams is None or r.get("hparams", {}) == dict(hparams))
          and (lr is None or math.isclose(r["lr"], lr, rel_tol=1e-6))
          and seed in (None, r["seed"])]


def find(runs: list[dict], cell: Cell, setting: Setting) -> dict | None:
  return next(iter(select(runs, setting, cell.family, cell.variant, cell.lr,
                          cell.seed, cell.data, cell.hparams)), None)


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
      **({"hparams": dict(cell.hparams)} if cell.hparams else {}),
      "lr_floor": cell.floor,
      # The example's bias monitor: run averages (None: not measured).
      "monitor": s.get("monitor"),
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


def add_monitor(results: pathlib.Path, setting: Setting, families,
                runs_dir: pathlib.Path, runner=None,
                tolerance: float = REPRODUCE_TOLERANCE,
                seeds: int | None = None) -> int:
  """Gives the main arms' seeded records of ``families`` (at their chosen
  rates; seeds below ``seeds`` if given, both arms' seed 0 first, then
  seed 1, ...) that predate the bias monitor its run averages: each record's
  command is re-run, its losses must come back within ``tolerance`` (the
  monitor does not change training; older code may round differently), and
  the record gains ``monitor`` and ``monitor_rerun`` (the re-run's code and
  losses; the recorded losses stay). Returns how many records gained it.

  Raises:
    ValueError: a re-run whose losses moved by more than ``tolerance``.
  """
  added = 0
  for family in families:
    runs = load_runs(results)
    lrs = selected_lrs(runs, setting, family)
    todo = sorted((r for arm in MAIN_ARMS if arm in lrs
                   for r in select(runs, setting, family, arm, lrs[arm])
                   if seeds is None or r["seed"] < seeds),
                  key=lambda r: (r["seed"], MAIN_ARMS.index(r["variant"])))
    for r in todo:
      if r.get("monitor") or r.get("status", "ok") != "ok":
        continue
      out = runs_dir / "monitor" / cell_of(r).name   # reused if finished
      log(f"monitor {out.name} (load {os.getloadavg()[0]:.1f})")
      s = lm_runs.run(lm_runs.argv_of(r["command"], out), runner,
                      replace=True)
      moved = max(abs(s[k] - r[k]) for k in LOSSES)
      if moved > tolerance:
        raise ValueError(f"{out.name}: the re-run's losses moved by "
                         f"{moved:.4f} > {tolerance}; not added")
      data = load_file(results)   # re-read: never drop what is on disk
      i = data["runs"].index(r)
      data["runs"][i] = {**r, "monitor": s.get("monitor"), "monitor_rerun": {
          "code": s["benchmark"]["code"], **{k: s[k] for k in LOSSES}}}
      harness.write_json(results, data)
      added += 1
  return added


def val_loss(record: dict | None) -> float:
  """Selection score: diverged or missing runs score +inf."""
  loss = (record or {}).get("final_val_loss")
  return math.inf if loss is None else loss


def search(grid, score) -> tuple:
  """Scores ``grid`` (lower is better) and extends it by factors of 2 past
  an edge with the best score, at most ``MAX_EXTEND`` times; returns (best
  value, tried values)."""
  grid, scores = sorted(grid), {}
  for _ in range(MAX_EXTEND + 1):
    for x in grid:
      if x not in scores:
        scores[x] = score(x)
    best = min(grid, key=lambda x: scores[x])
    if best == grid[0] or not math.isfinite(scores[best]):  # or all diverged
      grid.insert(0, float(f"{grid[0] / 2:.4g}"))
    elif best == grid[-1]:
      grid.append(float(f"{grid[-1] * 2:.4g}"))
    else:
      return best, grid
  best = min(scores, key=scores.get)
  return best, sorted(scores)


def choose_lr(family: str, arm: str, setting: Setting, run, grid=None,
              hparams: tuple = ()) -> tuple:
  """Seed-0 :func:`search` from ``grid`` (default ``LR_GRID[family]``) of
  validation losses; returns (best lr, tried lrs)."""
  del setting   # in ``run``
  return search(grid or LR_GRID[family], lambda lr: val_loss(
      run(Cell(family, arm, lr, 0, hparams=hparams))))


def halves(x: float) -> tuple:
  """A factor-2 grid centred on ``x``."""
  return (float(f"{x / 2:.4g}"), x, float(f"{x * 2:.4g}"))


def chosen_lr(runs: list[dict], setting: Setting, family: str, arm: str,
              hparams: tuple = ()) -> float | None:
  """``choose_lr``'s rule on the seed-0 clean records (None: none)."""
  scores = {r["lr"]: val_loss(r) for r in select(
      runs, setting, family, arm, seed=0, hparams=hparams)}
  return min(scores, key=scores.get) if scores else None


def selected_lrs(runs: list[dict], setting: Setting, family: str) -> dict:
  """{arm: lr} of the family's searched arms that have records."""
  return {arm: lr for arm in SEARCHED[family]
          if (lr := chosen_lr(runs, setting, family, arm)) is not None}


def quick_lrs(results: pathlib.Path, setting: Setting) -> dict:
  """--quick's rates: each arm's choice in the full grid's results (same
  settings), else ``QUICK_LR``: a fair quick comparison needs tuned rates."""
  chosen = selected_lrs(load_runs(results), setting, "adamw")
  return {arm: chosen.get(arm, QUICK_LR) for arm in MAIN_ARMS}


def run_family(family: str, setting: Setting, seeds: int, run,
               noise: bool, arms: tuple[str, ...] | None = None,
               grids: dict | None = None) -> None:
  """The learning-rate search of each of the family's ``SEARCHED`` arms
  (always; from ``grids[arm]`` if given, else ``LR_GRID[family]``), then
  seeds 0 to ``seeds - 1`` of ``arms`` (default: those and the ablations
  at bc's rate; and of the noisy main arms if ``noise``)."""
  searched = SEARCHED[family]
  lrs = {arm: choose_lr(family, arm, setting, run, (grids or {}).get(arm))[0]
         for arm in searched}
  log(f"{family}: chosen learning rates {lrs}")
  if arms is None:
    arms = searched + (ABLATIONS if family in FAMILIES else ())
  main_arms = [arm for arm in searched if arm in arms]
  seeded = [(arm, lrs[arm], seed, 0.0) for seed in range(seeds)
            for arm in main_arms]
  seeded += [(arm, lrs["bc"], seed, 0.0) for arm in ABLATIONS if arm in arms
             and family in FAMILIES for seed in range(seeds)]
  seeded += [(arm, lrs[arm], seed, NOISE) for seed in range(seeds) if noise
             for arm in main_arms]
  for arm, lr, seed, q in seeded:
    run(Cell(family, arm, lr, seed, q))


def protocol_lr(arm: str, std_lr: float) -> float:
  """A protocol arm's peak rate, from AdamW std's chosen rate."""
  return float(f"{PROTOCOL[arm][1] * std_lr:.4g}")


def run_protocol(setting: Setting, seeds: int, run) -> None:
  """The paper's protocol: AdamW std's search (reused), then seed 0 of the
  ``PROTOCOL`` arms (the paper's one seed), then seeds 1 to ``seeds - 1``."""
  std_lr = choose_lr("adamw", "std", setting, run)[0]
  for seed in range(seeds):
    for arm in PROTOCOL:
      run(Cell("adamw", arm, protocol_lr(arm, std_lr), seed))


def run_sophia_rho(setting: Setting, seeds: int, run) -> None:
  """Per Sophia arm: at its chosen rate, rho chosen on validation with seed
  0 from ``RHO_GRID`` (the default's records reused), extended like the
  rates; the rate re-chosen at that rho (a factor-2 grid around the old
  one); then, for both arms, seeds 0 to ``seeds - 1`` at (rate, rho)."""
  chosen = {}
  for arm in MAIN_ARMS:
    lr = choose_lr("sophia", arm, setting, run)[0]
    rho = search(RHO_GRID, lambda rho, arm=arm, lr=lr: val_loss(run(Cell(
        "sophia", arm, lr, 0, hparams=rho_hparams(rho)))))[0]
    hp = rho_hparams(rho)
    chosen[arm] = choose_lr("sophia", arm, setting, run, halves(lr), hp)[0], hp
    log(f"sophia {arm}: rho {rho:g}, lr {chosen[arm][0]:g}")
  for seed in range(seeds):
    for arm, (lr, hp) in chosen.items():
      run(Cell("sophia", arm, lr, seed, hparams=hp))


def short_grids(family: str) -> dict:
  """{arm: factor-2 grid centred on the arm's choice in the 200-step
  records} (the longer runs' starting grids; ``LR_GRID`` without one)."""
  short = load_runs(harness.ROOT / RESULTS[0])
  return {arm: halves(lr) for arm in SEARCHED[family]
          if (lr := chosen_lr(short, Setting(), family, arm)) is not None}


def run_long(setting: Setting, seeds: int, run) -> None:
  """The longer runs, the most important first: AdamW std and bc (searches,
  then seeds), ADOPT (search, seeds), then AdamW cf at bc's rate. Each
  search starts from a factor-2 grid around the arm's 200-step choice and
  extends past an edge as usual (:func:`search`)."""
  adamw = short_grids("adamw")
  run_family("adamw", setting, seeds, run, noise=False, arms=MAIN_ARMS,
             grids=adamw)
  run_family("adopt", setting, seeds, run, noise=False,
             grids=short_grids("adopt"))
  run_family("adamw", setting, seeds, run, noise=False, arms=("cf",),
             grids=adamw)


def arm_losses(runs: list[dict], setting: Setting, family: str, arm: str,
               lr: float, data: str = "shakespeare", hparams: tuple = ()
               ) -> dict:
  """{seed: final test loss (None: diverged)}."""
  return {r["seed"]: r["final_eval_loss"] for r in select(
      runs, setting, family, arm, lr, data=data, hparams=hparams)}


def settled(pts: list, chosen, start: int) -> bool:
  """Whether :func:`search` stops at the sorted seed-0 points ``pts``
  ((value, loss)) with ``chosen`` the best, from a grid of ``start``
  values: chosen inside, or the extension budget used up."""
  return len(pts) >= start and (chosen not in (pts[0][0], pts[-1][0])
                                or len(pts) >= start + MAX_EXTEND)


def arm_stats(losses: dict) -> dict:
  """Seeds finished, diverged and the mean test loss of {seed: loss}."""
  vals = [v for v in losses.values() if v is not None]
  return {"n": len(vals), "diverged": len(losses) - len(vals),
          "mean": float(np.mean(vals)) if vals else None}


def summarize(runs: list[dict], setting: Setting) -> dict:
  """The main, ablation and search tables' numbers of the std/bc families,
  computed from the records."""
  out = {}
  for family in BC_FAMILIES:
    lrs = selected_lrs(runs, setting, family)
    if not lrs:
      continue
    fam = out[family] = {"lr": lrs, "arms": {}, "diffs": {}, "noise": None}
    fam["grid"] = {arm: sorted((r["lr"], r["final_val_loss"]) for r in select(
        runs, setting, family, arm, seed=0)) for arm in MAIN_ARMS}
    # Settled: choose_lr would stop here (inside, or the budget used up).
    fam["settled"] = {arm: settled(pts, lrs.get(arm), len(LR_GRID[family]))
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


def summarize_baselines(runs: list[dict], setting: Setting) -> dict | None:
  """Every searched arm of every family at its chosen rate against AdamW's
  std and bc arms, paired by seed (a seed fixes the initialisation and the
  data order in every family); the baselines' searches; which Muon variant
  has the lower seed-0 validation loss. None without baseline records."""
  if not any(setting.matches(r) and r["family"] in BASELINES for r in runs):
    return None
  adamw = {arm: arm_losses(runs, setting, "adamw", arm, lr)
           for arm, lr in selected_lrs(runs, setting, "adamw").items()}
  rows, grids = [], []
  for family in ALL_FAMILIES:
    lrs = selected_lrs(runs, setting, family)
    for arm, lr in lrs.items():
      losses = arm_losses(runs, setting, family, arm, lr)
      rows.append({
          "family": family, "arm": arm, "optimizer": arm_flags(family, arm)[1],
          "lr": lr, **arm_stats(losses),
          **{f"vs_{base}": None if (family, arm) == ("adamw", base) else
             lm_runs.paired(losses, adamw.get(base, {})) for base in MAIN_ARMS}})
      if family not in FAMILIES:
        pts = sorted((r["lr"], r["final_val_loss"])
                     for r in select(runs, setting, family, arm, seed=0))
        grids.append({"family": family, "arm": arm, "lr": lr, "points": pts,
                      "settled": settled(pts, lr, len(LR_GRID[family]))})
  muon = {arm: val_loss(find(runs, Cell("muon", arm, lr, 0), setting))
          for arm, lr in selected_lrs(runs, setting, "muon").items()}
  return {"rows": rows, "grids": grids, "muon_val": muon,
          "muon": min(muon, key=muon.get) if len(muon) == 2 else None}


def ratio(a, b) -> dict | None:
  """``mean(a) / mean(b)`` of per-seed paired values ``a``, ``b``, with the
  delta-method standard error ``sd(a - R b) / (sqrt(n) |mean(b)|)`` (None
  for one seed) and ``mean(b)``; None without seeds or if ``mean(b)`` is
  0."""
  a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
  if not len(a) or b.mean() == 0:
    return None
  r = a.mean() / b.mean()
  se = ((a - r * b).std(ddof=1) / (math.sqrt(len(a)) * abs(b.mean()))
        if len(a) > 1 else None)
  return {"mean": float(r), "se": None if se is None else float(se),
          "n": len(a), "mean_b": float(b.mean())}


def schedule_share(losses: dict, seeds=None) -> dict | None:
  """The share of the reference configuration's gain (ref_bc - std_floor0)
  that the schedule alone (ref_std - std_floor0) reproduces: :func:`ratio`
  over the seeds (of ``seeds``, default all) all three arms finished."""
  common = sorted(s for s in set.intersection(*(set(v) for v in
                                                losses.values()))
                  if all(v[s] is not None for v in losses.values())
                  and (seeds is None or s in seeds))
  base = [losses["std_floor0"][s] for s in common]
  return ratio(np.subtract([losses["ref_std"][s] for s in common], base),
               np.subtract([losses["ref_bc"][s] for s in common], base))


def summarize_protocol(runs: list[dict], setting: Setting) -> dict | None:
  """The paper's protocol's arms at AdamW std's chosen rate, their pairs
  (seed 0 alone and all seeds), the tuned bc - std pair and the schedule's
  share; None without protocol records."""
  std_lr = chosen_lr(runs, setting, "adamw", "std")
  if std_lr is None or not any(select(runs, setting, "adamw", arm)
                               for arm in PROTOCOL):
    return None
  losses = {arm: arm_losses(runs, setting, "adamw", arm,
                            protocol_lr(arm, std_lr)) for arm in PROTOCOL}
  lrs = selected_lrs(runs, setting, "adamw")
  tuned = {arm: arm_losses(runs, setting, "adamw", arm, lr)
           for arm, lr in lrs.items()}
  pairs = [(a, b) for a, b, _ in PROTOCOL_PAIRS] + [("bc", "std")]
  both = {**losses, **tuned}
  seed0 = lambda d: {0: d[0]} if 0 in d else {}
  return {
      "std_lr": std_lr,
      "arms": {arm: {"lr": protocol_lr(arm, std_lr),
                     "floor": PROTOCOL[arm][2], **arm_stats(losses[arm])}
               for arm in PROTOCOL},
      "pairs": {f"{a}-{b}": lm_runs.paired(both.get(a, {}), both.get(b, {}))
                for a, b in pairs},
      "seed0": {f"{a}-{b}": lm_runs.paired(seed0(both.get(a, {})),
                                           seed0(both.get(b, {})))
                for a, b in pairs},
      "share": schedule_share(losses),
      "share_seed0": schedule_share(losses, seeds=(0,))}


def monitor_of(record: dict, key: str) -> float | None:
  """A record's bias-monitor average ``key`` (None: not measured)."""
  return (record.get("monitor") or {}).get(key)


def summarize_rho(runs: list[dict], setting: Setting) -> dict | None:
  """Per Sophia arm: its rate at the default rho, the rho search there
  ((rho, validation loss, win rate) at seed 0), the chosen rho, the rate
  search at that rho and the chosen rate, its seeds' test losses; the bc -
  std pairs at the default and the tuned rho. None without rho records."""
  if not any(setting.matches(r) and r["family"] == "sophia"
             and "rho" in r.get("hparams", {}) for r in runs):
    return None
  arms, losses = {}, {}
  for arm in MAIN_ARMS:
    lr = chosen_lr(runs, setting, "sophia", arm)
    if lr is None:
      continue
    pts = sorted((r.get("hparams", {}).get("rho", RHO), r["final_val_loss"],
                  monitor_of(r, "win_rate"))
                 for r in select(runs, setting, "sophia", arm, lr, 0,
                                 hparams=None)
                 if set(r.get("hparams", {})) <= {"rho"})
    rho = min(pts, key=lambda p: val_loss({"final_val_loss": p[1]}))[0]
    hp = rho_hparams(rho)
    lr2 = chosen_lr(runs, setting, "sophia", arm, hp)
    lr_pts = sorted((r["lr"], r["final_val_loss"]) for r in select(
        runs, setting, "sophia", arm, seed=0, hparams=hp))
    losses[arm] = (arm_losses(runs, setting, "sophia", arm, lr),
                   arm_losses(runs, setting, "sophia", arm, lr2, hparams=hp))
    arms[arm] = {"lr": lr, "rho_grid": pts, "rho": rho, "hparams": hp,
                 "rho_settled": settled(pts, rho, len(RHO_GRID)),
                 "lr_grid": lr_pts, "lr_at_rho": lr2,
                 "lr_settled": settled(lr_pts, lr2, 3),
                 **arm_stats(losses[arm][1])}
  pair = lambda i: (lm_runs.paired(losses["bc"][i], losses["std"][i])
                    if len(losses) == 2 else None)
  return {"arms": arms, "default": pair(0), "tuned": pair(1)}


def arm_cells(runs: list[dict], setting: Setting) -> list[tuple]:
  """(family, arm, lr, hparams) of every seeded arm at its chosen rate:
  the searched arms, the ablations (bc's rate), the protocol arms and the
  Sophia arms at their tuned rho."""
  out = []
  for family in ALL_FAMILIES:
    lrs = selected_lrs(runs, setting, family)
    out += [(family, arm, lr, ()) for arm, lr in lrs.items()]
    if family in FAMILIES and "bc" in lrs:
      out += [(family, arm, lrs["bc"], ()) for arm in ABLATIONS]
    if family == "adamw" and "std" in lrs:
      out += [(family, arm, protocol_lr(arm, lrs["std"]), ())
              for arm in PROTOCOL]
  rho = summarize_rho(runs, setting)
  out += [("sophia", arm, a["lr_at_rho"], a["hparams"])
          for arm, a in (rho or {"arms": {}})["arms"].items() if a["hparams"]]
  return out


def summarize_monitor(runs: list[dict], setting: Setting) -> list | None:
  """Per seeded arm (:func:`arm_cells`): the mean over its seeds of each
  ``MONITOR`` average (None where no seed measured it). None if no record
  has a monitor."""
  if not any(setting.matches(r) and r.get("monitor") for r in runs):
    return None
  rows = []
  for family, arm, lr, hp in arm_cells(runs, setting):
    recs = select(runs, setting, family, arm, lr, hparams=hp)
    if not any(r.get("monitor") for r in recs):
      continue
    vals = {k: [v for r in recs if (v := monitor_of(r, k)) is not None]
            for k in MONITOR}
    rows.append({"family": family, "arm": arm, "lr": lr, "hparams": hp,
                 "n": sum(bool(r.get("monitor")) for r in recs),
                 **{k: float(np.mean(v)) if v else None
                    for k, v in vals.items()}})
  return rows


def fmt_diff(p: dict | None) -> str:
  """A paired difference ± its standard error (``lm_runs.fmt``)."""
  return lm_runs.fmt(p, sign="+", one=" (1 seed)")


def fmt_improved(p: dict | None) -> str:
  """Seeds improved / seeds of a paired difference."""
  return "-" if p is None else f"{p['improved']}/{p['n']}"


def fmt_loss(x: float | None) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def monitor_table(rows: list[dict], lr: bool = True) -> str:
  """``summarize_monitor``'s rows as a table (with each arm's rate)."""
  num = lambda x: "-" if x is None else f"{x:.3g}"
  return harness.table(
      ["family", "arm", *(["lr"] if lr else []), "runs", *MONITOR],
      [[m["family"], m["arm"] + "".join(f", {k} {v:g}"
                                       for k, v in m["hparams"]),
        *([f"{m['lr']:g}"] if lr else []), m["n"],
        *(num(m[k]) for k in MONITOR)] for m in rows])


def extra_sections(runs: list[dict], setting: Setting) -> list[str]:
  """The report's lines on the baselines, the paper's protocol, Sophia's
  rho and the bias monitor: each only once it has records."""
  diff, loss = fmt_diff, fmt_loss
  vs = lambda p: "-" if p is None else f"{diff(p)} ({p['improved']}/{p['n']})"
  pt = lambda x, v: f"{x:g}: {loss(v) if v is not None else 'diverged'}"
  lines = []
  if (base := summarize_baselines(runs, setting)) is not None:
    lines += [
        "", "Every arm at its chosen rate against AdamW's, test loss paired "
        "by seed (a seed fixes the initialisation and the data order in "
        "every family), ± one standard error (improved seeds / seeds):", "",
        harness.table(
            ["family", "arm", "--optimizer", "lr", "seeds", "mean test",
             "arm - adamw std", "arm - adamw bc"],
            [[r["family"], r["arm"], f"`{r['optimizer']}`", f"{r['lr']:g}",
              f"{r['n']}" + (f" ({r['diverged']} diverged)"
                             if r["diverged"] else ""),
              loss(r["mean"]), vs(r["vs_std"]), vs(r["vs_bc"])]
             for r in base["rows"]]), "",
        "Baselines' learning-rate search (seed 0, factor-2 grid; final "
        "validation loss, **bold**: chosen):", "",
        harness.table(["family", "arm", "lr: validation loss"], [
            [g["family"], g["arm"], ", ".join(
                ("**{}**" if x == g["lr"] else "{}").format(pt(x, v))
                for x, v in g["points"])
             + ("" if g["settled"] else " (search in progress)")]
            for g in base["grids"]])]
    if base["muon"] is not None:
      val, other = base["muon_val"], {"plain": "adaptive",
                                      "adaptive": "plain"}[base["muon"]]
      lines += ["", f"Muon: the `{base['muon']}` variant (`--optimizer "
                f"{OPTIMIZER['muon', base['muon']]}`) has the lower seed-0 "
                f"validation loss at its chosen rate ({loss(val[base['muon']])}"
                f" vs {loss(val[other])} for `{other}`), so it is the Muon "
                "chosen; both variants have seeds above."]
  if (proto := summarize_protocol(runs, setting)) is not None:
    names = {"ref_bc-std_floor0": "ref_bc - std_floor0 (the reference "
             "configuration)", "ref_std-std_floor0": "ref_std - std_floor0 "
             "(the schedule alone)", "bc-std": f"bc - std (tuned rates, "
             f"floor {FLOOR:g})"}
    share = lambda d: "-" if d is None else lm_runs.fmt(d, digits=2) + (
        " (not a share: there the reference configuration shows no gain, "
        f"mean b = {d['mean_b']:+.4f})" if d["mean_b"] >= 0 else "")
    lines += [
        "", "The paper's protocol (AdamW). The reference code ran its bc arm "
        "at 1.5 x std's peak rate (9e-4 vs 6e-4) with a 0.2 cosine floor, std"
        " with floor 0, one seed. Here, from AdamW std's chosen rate "
        f"{proto['std_lr']:g}: `ref_bc` is `adamw_bc` at 1.5 x that rate, "
        "floor 0.2; `ref_std` is `adamw` at the same rate and floor (the "
        "schedule alone); `std_floor0` is `adamw` at std's rate, floor 0.",
        "", harness.table(["arm", "lr", "floor", "seeds", "mean test"], [
            [arm, f"{a['lr']:g}", f"{a['floor']:g}", a["n"], loss(a["mean"])]
            for arm, a in proto["arms"].items()]), "",
        harness.table(["test loss, paired", "1 seed, as the paper (seed 0)",
                       "all seeds", "improved"], [
            [names[k], diff(proto["seed0"][k]), diff(p),
             "-" if p is None else f"{p['improved']}/{p['n']}"]
            for k, p in proto["pairs"].items()]), "",
        "Share of the reference configuration's apparent gain that the "
        "schedule alone reproduces, (ref_std - std_floor0) / (ref_bc - "
        f"std_floor0): {share(proto['share_seed0'])} with 1 seed (seed 0, as"
        f" the paper); {share(proto['share'])} over "
        f"{(proto['share'] or {}).get('n', 0)} seeds (the ratio of the mean "
        "per-seed paired differences a = ref_std - std_floor0 and b = ref_bc"
        " - std_floor0 over the seeds all three arms finished; standard "
        "error by the delta method, sd(a - R b) / (sqrt(n) |mean b|))."]
  if (rho := summarize_rho(runs, setting)) is not None:
    win = lambda w: "" if w is None else f" (win rate {w:.2f})"
    lines += [
        "", f"Sophia's rho (its clipping threshold; table default {RHO:g}), "
        "chosen on validation with seed 0 at each arm's chosen rate from a "
        "factor-2 grid, then the rate re-chosen at that rho (factor-2 grid "
        "around the old rate). The win rate is the monitor's fraction of "
        "coordinates not clipped; the Sophia authors keep it in 0.1-0.5. "
        "**Bold**: chosen.", "",
        harness.table(["arm", "lr", "rho: validation loss", "rho",
                       "lr at that rho: validation loss"], [
            [arm, f"{a['lr']:g}", ", ".join(
                ("**{}**" if r == a["rho"] else "{}").format(pt(r, v) + win(w))
                for r, v, w in a["rho_grid"])
             + ("" if a["rho_settled"] else " (search in progress)"),
             f"{a['rho']:g}", ", ".join(
                 ("**{}**" if x == a["lr_at_rho"] else "{}").format(pt(x, v))
                 for x, v in a["lr_grid"])
             + ("" if a["lr_settled"] else " (search in progress)")]
            for arm, a in rho["arms"].items()]), "",
        harness.table(["sophia", "lr std / bc", "rho std / bc", "bc - std",
                       "improved"], [
            [label, " / ".join(f"{rho['arms'][a][k]:g}" if a in rho["arms"]
                               else "-" for a in MAIN_ARMS),
             rhos, diff(p), "-" if p is None else f"{p['improved']}/{p['n']}"]
            for label, k, rhos, p in (
                ("default rho (main table)", "lr", f"{RHO:g} / {RHO:g}",
                 rho["default"]),
                ("tuned rho", "lr_at_rho", " / ".join(
                    f"{rho['arms'][a]['rho']:g}" if a in rho["arms"] else "-"
                    for a in MAIN_ARMS), rho["tuned"]))])]
  if (mon := summarize_monitor(runs, setting)) is not None:
    lines += [
        "", "Bias monitor (the example's run averages over the evaluations), "
        "mean over each arm's seeds at its chosen rate; -: not measured:", "",
        monitor_table(mon)]
  return lines


HEAD = "## Quality: does bias correction pay? (`benchmarks/lm_quality.py`)"
LONG_HEAD = ("## Quality, longer runs (`benchmarks/lm_quality.py --long`)")


def report_markdown(runs: list[dict], setting: Setting, summary: dict,
                    png: str, results_name: str, head: str = HEAD,
                    expected: tuple = FAMILIES, flags: str = "") -> str:
  """The ``lm_quality`` section of RESULTS.md (without its markers):
  titled ``head``, naming the ``expected`` families not run yet and the
  script's ``flags`` (e.g. `` --long``) in its commands."""
  diff, improved, loss = fmt_diff, fmt_improved, fmt_loss
  sel = [r for r in runs if setting.matches(r)]
  ok = [r for r in sel if r.get("wall_s") is not None]
  if not sel:
    return f"{head}\n\nNo runs yet: `python -m {MODULE}{flags}`."
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
        diff(d), improved(d), f"{PAPER_DELTA[family]:+.3f}"
        if family in PAPER_DELTA else "-"])
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
  missing = [f for f in expected if f not in summary]
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
      *extra_sections(runs, setting),
      *(["", f"Not run yet: {', '.join(missing)}."] if missing else []), "",
      f"![paired differences and loss curves]({png})", "",
      f"Reproduce: `python -m {MODULE}{flags}` (resumable; "
      f"`--report-only{flags}`: this "
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
    if family in PAPER_DELTA:
      ax.plot([i + (len(arms) / 2) * width], [PAPER_DELTA[family]], "k*",
              ms=9, label="paper (bc)" if i == 0 else None)
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


# The docs page whose ``pays`` section is the headline of all the results.
DOCS_PAGE = harness.ROOT / "docs" / "when_it_pays.md"


def headline(runs: list[dict], long_runs: list[dict],
             setting: Setting = Setting(), long: Setting = LONG) -> str:
  """The headline of docs/when_it_pays.md: every question's paired test
  differences (``runs`` of ``setting``, ``long_runs`` of ``long``), and the
  monitor's averages per arm; a row whose runs are missing says so."""
  diff, improved = fmt_diff, fmt_improved
  rows = []

  def row(question, comparison, p, pending):
    rows.append([question, comparison,
                 f"pending: `python -m {MODULE} {pending}`" if p is None
                 else diff(p), improved(p)])

  for label, recs, where, flag in (
      (f"{setting.steps} steps, M = {setting.microbatches}", runs, setting,
       ""),
      (f"{long.steps:,} steps, M = {long.microbatches}", long_runs, long,
       " --long")):
    summary = summarize(recs, where)
    fams = FAMILIES + ("soap",) if not flag else ("adamw",)
    for family in fams:
      for arm in ("bc",) + (("cf",) if flag else ()):
        row(f"Does the correction beat its own optimizer? ({label})",
            f"`{family}` {arm} - std",
            summary.get(family, {}).get("diffs", {}).get(arm),
            ("--families " + family if not flag else "--long").strip())
    base = summarize_baselines(recs, where) or {"rows": []}
    found = {(r["family"], r["arm"]): r for r in base["rows"]}
    for family, arm in [("adopt", "std")] + (
        [("muon", "plain"), ("muon", "adaptive"), ("soap", "bc")]
        if not flag else []):
      r = found.get((family, arm), {})
      row(f"Is it better than the alternatives? ({label})",
          f"`{OPTIMIZER.get((family, arm), family + '_bc')}` - `adamw_bc`",
          r.get("vs_bc"), "--long" if flag else f"--families {family}")
  proto = summarize_protocol(runs, setting) or {"pairs": {}}
  for key, what in (("ref_bc-std_floor0", "the reference configuration"),
                    ("ref_std-std_floor0", "its schedule alone")):
    row("Where did the paper's gain come from?",
        f"{what}: `{key.replace('-', '` - `')}`", proto["pairs"].get(key),
        "--protocol")
  share = proto.get("share")
  rho = (summarize_rho(runs, setting) or {}).get("tuned")
  row("Does Sophia's own tuning change it?", "`sophia` bc - std, rho tuned",
      rho, "--sophia-rho")
  mon = summarize_monitor(runs, setting) or []
  mon = [m for m in mon if m["arm"] in MAIN_ARMS + tuple(PROTOCOL)]
  return "\n".join([
      "Test loss in nats/token, arm minus baseline, paired by seed, ± one "
      "standard error; improved: seeds where the arm is lower. Tiny preset, "
      "byte-level Shakespeare, learning rates chosen on validation "
      "(benchmarks/RESULTS.md has every table and search).", "",
      harness.table(["question", "comparison", "difference", "improved"],
                    rows), "",
      "Share of the reference configuration's gain that its schedule alone "
      "reproduces: " + ("pending" if share is None else
                        lm_runs.fmt(share, digits=2)
                        + f" ({share['n']} seeds)") + ".", "",
      "Bias monitor, run averages over the evaluations (mean over seeds; "
      "docs/monitor.md):", "",
      monitor_table(mon, lr=False) if mon else
      "pending: `python -m benchmarks.lm_quality --add-monitor`"])


def report(results: pathlib.Path, setting: Setting, png: pathlib.Path,
           results_md: pathlib.Path | None, long: bool = False) -> dict:
  """Prints the section, writes the PNG and (unless None) the section
  (``long``: the longer runs' section, ``lm_quality_long``)."""
  runs = load_runs(results)
  summary = summarize(runs, setting)
  section = report_markdown(runs, setting, summary, os.path.relpath(
      png, (results_md or harness.RESULTS_MD).parent),
      os.path.relpath(results, harness.ROOT),
      **(dict(head=LONG_HEAD, expected=("adamw",), flags=" --long")
         if long else {}))
  print(section)
  if summary:
    curves = harness.read_json(curves_path(results), {})
    plot(summary, curves, runs, setting, png)
  if results_md is not None:
    harness.write_section("lm_quality_long" if long else "lm_quality",
                          section, results_md)
    files = (harness.ROOT / RESULTS[0], results) if long else (
        results, harness.ROOT / LONG_RESULTS[0])
    settings = (Setting(), setting) if long else (setting, LONG)
    harness.write_section("pays", headline(*map(load_runs, files),
                                           *settings), DOCS_PAGE)
  return summary


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, with ``setting``, ``results``, ``png`` and ``runs_dir``."""
  p = lm_runs.parser(MODULE, __doc__, "adamw vs adamw_bc, seed 0 (two runs) "
                     "at the rates chosen in results/lm_quality.json",
                     RESULTS, RUNS)
  add = p.add_argument
  add("--families", nargs="+", choices=ALL_FAMILIES, help="the families "
      f"to run (default: {' '.join(FAMILIES)}, unless --protocol or "
      "--sophia-rho is given)")
  add("--seeds", type=int, default=3)
  add("--arms", nargs="+", choices=MAIN_ARMS + ABLATIONS + tuple(
      a for f in BASELINES for a in SEARCHED[f] if a not in MAIN_ARMS),
      help="the arms that get seeds (default: all of each family's)")
  add("--protocol", action="store_true", help="the paper's protocol: AdamW "
      "bc and std at 1.5 x std's rate with floor 0.2, std with floor 0")
  add("--sophia-rho", action="store_true", help="choose Sophia's rho per "
      "arm, re-choose the rate, then seeds")
  add("--long", action="store_true", help="the longer runs (1000 steps, M ="
      " 16; results/lm_quality_long.json): AdamW std, bc, ADOPT, AdamW cf")
  add("--no-noise", action="store_true", help="skip AdamW's noisy-data row")
  add("--add-monitor", action="store_true", help="re-run the --families' "
      "main-arm seeds (below --seeds, seed by seed) recorded without the bias"
      " monitor, adding its averages")
  add("--rerun-unversioned", action="store_true",
      help="first re-run the families' records that have no `code`")
  add("--verify", type=int, metavar="K", help="re-run K records spread over "
      f"the file (*_verify.json); fail if a loss moves > {REPRODUCE_TOLERANCE}")
  shape = ("preset", *SHAPE, "devices")
  for k in shape:
    add("--" + k.replace("_", "-"), type=type(getattr(Setting, k)),
        help=f"default: {getattr(Setting, k)} ({getattr(LONG, k)} with --long)")
  args = p.parse_args(argv)
  if args.seeds < 1 or (args.verify is not None and args.verify < 1):
    p.error("--seeds and --verify take a positive count")
  if args.long and (args.quick or args.families or args.protocol
                    or args.sophia_rho or args.arms):
    p.error("--long runs its own arms: no --quick, --families, --arms, "
            "--protocol or --sophia-rho")
  args.setting = dataclasses.replace(LONG if args.long else Setting(), **{
      k: getattr(args, k) for k in shape if getattr(args, k) is not None})
  lm_runs.paths(args, LONG_RESULTS if args.long else RESULTS,
                LONG_RUNS if args.long else RUNS)
  args.runs_dir = harness.ROOT / args.runs_dir
  return args


def main(argv=None, runner=None) -> None:
  args = parse_args(argv)
  setting, results, t0 = args.setting, args.results, time.time()
  run = lambda cell: run_cell(cell, setting, results, args.runs_dir, runner)
  if setting.devices > 1 and "XLA_FLAGS" not in os.environ:
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
  elif args.long and not args.report_only:
    run_long(setting, args.seeds, run)
  elif not args.report_only:
    families = args.families or ([] if args.protocol or args.sophia_rho
                                 else list(FAMILIES))
    if args.rerun_unversioned:
      n = rerun_unversioned(results, setting, families, run)
      log(f"re-ran {n} unversioned records")
    if args.add_monitor:
      n = add_monitor(results, setting, families, args.runs_dir, runner,
                      seeds=args.seeds)
      log(f"added the monitor to {n} records")
      families = []
    for family in families:
      run_family(family, setting, args.seeds, run, noise=family == "adamw"
                 and not args.no_noise, arms=args.arms and tuple(args.arms))
    if args.protocol:
      run_protocol(setting, args.seeds, run)
    if args.sophia_rho:
      run_sophia_rho(setting, args.seeds, run)
  report(results, setting, args.png, None if args.quick else harness.RESULTS_MD,
         long=args.long)
  log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
