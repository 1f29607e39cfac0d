"""The LM example's training runs for ``lm_quality`` and
``finetune_averaging`` (:func:`run`: one ``python -m examples.lm.train``
subprocess per run, in the repository root, so memory does not grow over a
grid and the recorded command is what ran), their shared flags, statistics
and figures.
"""

import argparse
import json
import math
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from benchmarks import harness
from examples.lm import config
from examples.lm import train

MODULE = "examples.lm.train"
OUT = "{out}"   # a recorded command's output folder, filled in to rerun it
_DIVERGED = re.compile(r"^error: (loss is \S+ at step \d+)", re.M)


def flags(values: dict) -> list[str]:
  """``--name value`` words of ``values`` (keys ``name``, or ``--flag``)."""
  return [w for k, v in values.items() for w in (
      k if k.startswith("--") else "--" + k.replace("_", "-"), str(v))]


def command(argv: Sequence[str]) -> str:
  """The training command of ``argv`` (a ``{out}`` word kept as is)."""
  return harness.command(MODULE, argv, verbatim=(OUT,))


def argv_of(cmd: str, out=None) -> list[str]:
  """The argv of a training command, ``{out}`` replaced by ``out``."""
  return [str(out) if w == OUT and out is not None else w
          for w in harness.command_argv(cmd, MODULE)]


def out_dir(argv: Sequence[str]) -> pathlib.Path:
  """A run's folder: its ``--out``, relative to the repository root."""
  return harness.ROOT / argv[list(argv).index("--out") + 1]


def metrics(out) -> list[dict]:
  """The records of a run's ``metrics.jsonl`` (none if it has none)."""
  path = pathlib.Path(out) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()] if path.exists() else []


def subprocess_runner(argv: Sequence[str], module: str = MODULE) -> dict:
  """Trains in a ``python -m module`` subprocess; returns its summary.
  ``FloatingPointError``: a NaN or infinite loss; ``KeyboardInterrupt``:
  once the run saved its checkpoint; ``RuntimeError``: any other failure."""
  with subprocess.Popen([sys.executable, "-m", module, *argv],
                        cwd=harness.ROOT, stderr=subprocess.PIPE,
                        text=True) as p:
    try:
      _, err = p.communicate()
    except KeyboardInterrupt:   # the run saves a checkpoint, then exits
      p.communicate()
      raise
  if p.returncode:
    diverged = _DIVERGED.search(err)
    if diverged:
      raise FloatingPointError(diverged.group(1))
    raise RuntimeError(f"{command(argv)} exited with {p.returncode}:\n"
                       f"{err[-3000:]}")
  return json.loads((out_dir(argv) / "summary.json").read_text())


def _checkpoints(out: pathlib.Path) -> bool:
  folder = out / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _resumable(out: pathlib.Path, argv: Sequence[str]) -> bool:
  """Checkpoints made with the settings of ``argv`` (those --resume keeps)."""
  if not _checkpoints(out) or not (out / "config.json").exists():
    return False
  saved = json.loads((out / "config.json").read_text())
  cfg = train.parse_args(list(argv))
  return not config.changed_on_resume(saved, config.run_config(
      cfg, config.model_config(cfg, saved["model"]["vocab_size"])))


def _cpu_children() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run(argv: Sequence[str], runner: Optional[Callable] = None,
        replace: bool = False) -> dict:
  """Reuses ``argv``'s folder (``--out``) if its ``summary.json`` has the
  same command, resumes its checkpoints of the same settings (``--resume``;
  the example then reproduces the whole run on CPU), else trains afresh
  with ``runner`` (``ValueError`` if the folder holds another run, unless
  ``replace``). Returns the summary with the ``command`` (no ``--resume``)
  and ``benchmark``: the code's git state, the subprocess's wall and CPU
  seconds, the load at the start, whether it resumed (a diverged run's:
  only these and ``diverged``)."""
  argv, cmd, out = list(argv), command(argv), out_dir(argv)
  path = out / "summary.json"
  summary = harness.read_json(path)
  if summary is not None and summary["command"] == cmd:
    print(f"reusing {out}", flush=True)
    return summary
  resume = summary is None and _resumable(out, argv)
  if out.exists() and not resume:
    if (summary is not None or _checkpoints(out)) and not replace:
      raise ValueError(f"{out} holds another run; delete it or choose "
                       f"another folder ({summary and summary['command']})")
    shutil.rmtree(out)
  code, load = harness.git_state(), os.getloadavg()[0]
  cpu0, wall0 = _cpu_children(), time.time()
  print(("resuming: " if resume else "running: ") + cmd, flush=True)
  try:
    summary = (runner or subprocess_runner)(argv + ["--resume"] * resume)
  except FloatingPointError as e:   # diverged: the worst possible outcome
    print(f"diverged: {e}", flush=True)
    summary = {"diverged": str(e)}
  summary |= {"command": cmd, "benchmark": {
      "code": code, "call_wall_s": round(time.time() - wall0, 1),
      "cpu_s": round(_cpu_children() - cpu0, 1),
      "loadavg_1m": round(load, 2), "resumed": resume}}
  if "diverged" not in summary:
    harness.write_json(path, summary)
  return summary


def parser(module: str, doc: str, quick: str, results: tuple, runs: tuple
           ) -> argparse.ArgumentParser:
  """Both scripts' --quick (help ``quick``), --report-only, --results and
  --runs-dir (defaults ``results``, ``runs``: without and with --quick)."""
  p = harness.parser(module, doc)
  p.add_argument("--quick", action="store_true", help=quick)
  p.add_argument("--report-only", action="store_true", help="rebuild the "
                 "PNG and the RESULTS.md section from the results JSON")
  p.add_argument("--results", type=pathlib.Path, help="results JSON (default"
                 f": {results[0]}, {results[1]} with --quick); the PNG goes "
                 "next to it")
  p.add_argument("--runs-dir", type=pathlib.Path, help="run folders "
                 f"(default: {runs[0]}, {runs[1]} with --quick)")
  return p


def paths(args: argparse.Namespace, results: tuple, runs: tuple) -> None:
  """Fills in ``args.results`` (under the root), ``args.png`` next to it
  and ``args.runs_dir`` (as given) from the defaults of :func:`parser`."""
  args.results = harness.ROOT / (args.results or results[args.quick])
  args.png = args.results.with_suffix(".png")
  args.runs_dir = args.runs_dir or pathlib.Path(runs[args.quick])


# Statistics and figures ----------------------------------------------------

def mean_se(x) -> dict:
  """Mean and standard error (``std(ddof=1) / sqrt(n)``; NaN for n = 1)
  over the first axis."""
  x = np.asarray(x, dtype=np.float64)
  n = x.shape[0]
  se = x.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(
      x.shape[1:], np.nan)
  return {"mean": x.mean(axis=0).tolist(), "se": np.asarray(se).tolist(),
          "n": n}


def paired(a: dict, b: dict) -> Optional[dict]:
  """``a - b`` over the seeds both have ({seed: loss}, None: diverged): mean,
  se (None for one seed), n, ``improved`` (seeds where ``a`` is lower),
  the seeds and the differences."""
  seeds = sorted(s for s in set(a) & set(b)
                 if a[s] is not None and b[s] is not None)
  if not seeds:
    return None
  d = [a[s] - b[s] for s in seeds]
  s = mean_se(d)
  return {"mean": s["mean"], "se": s["se"] if len(d) > 1 else None,
          "n": len(d), "improved": sum(x < 0 for x in d), "seeds": seeds,
          "diffs": d}


def fmt(d: Optional[dict], digits: int = 4, sign: str = "",
        one: str = "") -> str:
  """``mean ± se`` of a :func:`mean_se` or :func:`paired` result (``sign``:
  "+" to sign the mean; ``one``: the suffix when there is no se)."""
  if d is None or d["mean"] is None:
    return "-"
  mean = f"{d['mean']:{sign}.{digits}f}"
  if d.get("se") is None or not math.isfinite(d["se"]):
    return mean + one
  return f"{mean} ± {d['se']:.{digits}f}"


def subplots(*args, **kwargs):
  """``plt.subplots`` on matplotlib's file-only Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(*args, **kwargs)


def save_figure(fig, path: pathlib.Path, dpi: int) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
