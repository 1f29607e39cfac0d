r"""Adam-BC update cost now against the same update at an earlier commit.

A before/after comparison for performance work on the core: the bcopt
package at ``--ref`` (a git commit) is extracted into a temporary package
``bcopt_ref`` (imports rewritten) and both versions' jitted
``scale_by_adam_bc(...).update`` run in one process, interleaved round by
round (``optimizer_overhead.py``'s method: donated state, compile and
warm-up excluded, wall and process CPU time per call), next to the optax
Adam baseline (b) on the fused mean and optax Adam on each version's
``bcopt.microbatch_mean``. Ratios are to (b).

Usage::

  python benchmarks/update_ab.py --ref 2783460      # 2M params, M = 8
  python benchmarks/update_ab.py --ref HEAD~3 --sizes 2M,16M --microbatches 8,32
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import optax

import bcopt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optimizer_overhead as oo  # pylint: disable=g-import-not-at-top

BASE = "optax Adam on the fused mean (b)"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = {
    "loo + jackknife": ("loo", "jackknife"),
    "loo, no correction": ("loo", None),
    "twofold + jackknife": ("twofold", "jackknife"),
    "symmetric + jackknife": ("symmetric", "jackknife"),
    "standard + jackknife": (None, "jackknife"),
    "standard, no correction": (None, None),
}


def import_ref(ref: str, tmp: str):
  """The bcopt package at git ``ref`` as module ``bcopt_ref``."""
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", ref], check=True,
                          capture_output=True, text=True).stdout.strip()
  files = subprocess.run(
      ["git", "-C", REPO, "ls-tree", "-r", "--name-only", commit, "bcopt"],
      check=True, capture_output=True, text=True).stdout.split()
  for path in files:
    if not path.endswith(".py"):
      continue
    text = subprocess.run(["git", "-C", REPO, "show", f"{commit}:{path}"],
                          check=True, capture_output=True, text=True).stdout
    text = re.sub(r"\bbcopt\._src\b", "bcopt_ref._src", text)
    out = os.path.join(tmp, "bcopt_ref" + path[len("bcopt"):])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
  sys.path.insert(0, tmp)
  return importlib.import_module("bcopt_ref"), commit


def cell(size, m, lib_ref, schemes, reps, max_seconds, warmup):
  shapes = oo.lm_param_shapes(size)
  grads = oo.microbatched_gradients(shapes, m)
  params = jax.tree.map(lambda x: x[0], grads)
  adam = optax.scale_by_adam()
  runners = {BASE: oo.Runner(lambda s, g: adam.update(oo.fused_mean(g), s),
                             adam.init(params), (grads,))}
  for tag, lib in (("", bcopt), (" @ref", lib_ref)):
    runners[f"optax Adam on bcopt.microbatch_mean{tag}"] = oo.Runner(
        lambda s, g, lib=lib: adam.update(lib.microbatch_mean(g), s),
        adam.init(params), (grads,))
  for name in schemes:
    cf, ic = SCHEMES[name]
    if cf in ("twofold", "symmetric") and ic and m < 4:
      continue
    for tag, lib in (("", bcopt), (" @ref", lib_ref)):
      tx = lib.scale_by_adam_bc(cross_fit=cf, inverse_correction=ic)
      runners[f"Adam-BC {name}{tag}"] = oo.Runner(
          lambda s, g, tx=tx: tx.update(g, s), tx.init(params), (grads,))
  samples = oo.time_interleaved(runners, reps, max_seconds, warmup=warmup)
  stats = {k: oo.summarize(s, runners[k].cpu_samples)
           for k, s in samples.items()}
  base = stats[BASE]
  return {"size": size, "M": m, "variants": {
      k: {**v, **oo.ratios(v, base, "b")} for k, v in stats.items()}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  csv = lambda t: lambda s: [t(x) for x in s.split(",") if x]
  p.add_argument("--ref", required=True, help="git commit to compare with")
  p.add_argument("--sizes", type=csv(str), default=["2M"])
  p.add_argument("--microbatches", type=csv(int), default=[8])
  p.add_argument("--schemes", type=lambda s: s.split(";"),
                 default=list(SCHEMES),
                 help=f"';'-separated subset of {list(SCHEMES)}")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--max-seconds", type=float, default=120.0)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=os.path.join(oo.RESULTS_DIR,
                                               "update_ab.json"))
  args = p.parse_args(argv)
  env = oo.environment()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    lib_ref, commit = import_ref(args.ref, tmp)
    head = subprocess.run(["git", "-C", REPO, "describe", "--always",
                           "--dirty"], capture_output=True, text=True
                          ).stdout.strip()
    cells = [cell(s, m, lib_ref, args.schemes, args.reps, args.max_seconds,
                  args.warmup)
             for s in args.sizes for m in args.microbatches]
  env["loadavg_end"] = list(os.getloadavg())
  env["wall_seconds"] = round(time.perf_counter() - t0, 1)
  lines = []
  for c in cells:
    lines.append(f"\n### {c['size']} params, M={c['M']} (ratios to (b))\n")
    lines.append(oo.markdown_table(
        ["update", "median ms", "x(b)", "min x(b)", "CPU ms", "CPU x(b)"],
        [[k, f"{v['median_ms']:.1f}", f"{v['ratio_vs_b']:.2f}x",
          f"{v['ratio_min_vs_b']:.2f}x", f"{v['cpu_median_ms']:.1f}",
          f"{v['ratio_cpu_vs_b']:.2f}x"] for k, v in c["variants"].items()]))
  table = "\n".join(lines)
  print(table)
  oo.write_json(args.out, {
      "command": oo.command_line(), "environment": env,
      "ref_commit": commit, "working_tree": head, "cells": cells,
      "markdown": table})


if __name__ == "__main__":
  main()
